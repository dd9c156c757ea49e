"""A failing, exiting or stalled rank ends the whole job quickly, saying which rank and why."""

import pytest

from _mpirun import mpidp_job

pytestmark = pytest.mark.spawns


job = mpidp_job


def test_exception_on_one_rank_aborts_everyone(tmp_path):
    rc, out, seconds = job(tmp_path, """
        if r == 1:
            time.sleep(0.3)
            raise RuntimeError("planted failure")
        mpidp.barrier()      # the others wait here forever without the abort hook
    """)
    assert rc not in (0, None), out
    assert seconds < 15, f"took {seconds:.1f} s"
    assert "[rank 1/3] RuntimeError: planted failure" in out
    assert "[rank 1/3] Traceback" in out


def test_exception_in_a_thread_aborts(tmp_path):
    rc, out, seconds = job(tmp_path, """
        import threading
        if r == 2:
            t = threading.Thread(target=lambda: 1 / 0, name="loader")
            t.start(); t.join()
        mpidp.barrier()
    """)
    assert rc not in (0, None) and seconds < 15, out
    assert "[rank 2/3] uncaught exception in thread loader" in out and "ZeroDivisionError" in out


def test_exit_without_shutdown_while_others_wait(tmp_path):
    rc, out, seconds = job(tmp_path, """
        if r == 0:
            sys.exit(0)          # a clean exit: MPI alone would leave ranks 1, 2 in the barrier
        mpidp.barrier()
    """, env={"MPIDP_EXIT_TIMEOUT_S": "2"})
    assert rc not in (0, None), out
    assert seconds < 20
    assert "[rank 0] exited without mpidp.shutdown()" in out


def test_clean_runs_exit_zero_with_or_without_shutdown(tmp_path):
    rc, out, _ = job(tmp_path, """
        mpidp.allreduce(numpy.ones(3))
        if r == 0:
            mpidp.shutdown()
        else:
            mpidp.shutdown()
    """)
    assert rc == 0, out
    rc, out, _ = job(tmp_path, "mpidp.allreduce(numpy.ones(3))\n")
    assert rc == 0, out


def test_stall_inspector_names_the_missing_rank_then_aborts(tmp_path):
    rc, out, seconds = job(tmp_path, """
        if r == 2:
            time.sleep(30)       # computing, never joins the allreduce
        mpidp.allreduce(numpy.ones(4), name="grad.w1")
    """, env={"MPIDP_STALL_WARNING_S": "1", "MPIDP_STALL_ABORT_S": "4"})
    assert rc not in (0, None), out
    assert seconds < 20
    assert "stall: waiting" in out and "grad.w1" in out
    assert "ranks not in it: 2 (not in a collective" in out
    assert "aborting after MPIDP_STALL_ABORT_S=4" in out


def test_stall_warning_then_the_late_rank_joins(tmp_path):
    rc, out, seconds = job(tmp_path, """
        if r == 1:
            time.sleep(3)
        mpidp.allreduce(numpy.ones(4), name="late")
        mpidp.shutdown()
    """, np=2, env={"MPIDP_STALL_WARNING_S": "1"})
    assert rc == 0, out
    assert "stall: waiting" in out and "late" in out and "ranks not in it: 1" in out
