"""init, shutdown and exit with work in flight, fork, re-init, the thread level, the default stall bound.

Each test is a real mpiexec job with a timeout; it asserts the exit code, the seconds and the output.
"""
import textwrap

import pytest

from _mpirun import python, run

pytestmark = pytest.mark.spawns

HEAD = "import os, sys, time\nimport numpy\nimport mpidp\n"


# start async allreduces big enough to still be running (the ring, several pieces) when the
# next line runs
IN_FLIGHT = """
    def in_flight(n=6):
        return [mpidp.allreduce_async(numpy.full(1 << 20, float(i)), op=mpidp.Sum, name=f"g{i}")
                for i in range(n)]
"""


def job(tmp_path, body, np=2, env=None, timeout=60, head=HEAD + "mpidp.init()\nr = mpidp.rank()\n"):
    script = tmp_path / "job.py"
    script.write_text(head + textwrap.dedent(IN_FLIGHT) + textwrap.dedent(body))
    return run(python(script), np=np, timeout=timeout, env=env)


def test_shutdown_with_handles_in_flight_drains_them(tmp_path):
    rc, out, seconds = job(tmp_path, """
        for round in range(4):             # and init() again after each shutdown
            mpidp.init()
            handles = in_flight()
            mpidp.shutdown()
            values = [h.wait()[0] for h in handles]
            assert values == [i * 2.0 for i in range(6)], values
        print(f"rank {r} done", flush=True)
    """)
    assert rc == 0 and seconds < 40, out[-3000:]
    assert "rank 0 done" in out and "rank 1 done" in out
    assert "double free" not in out


def test_shutdown_with_process_set_handles_in_flight_drains_them(tmp_path):
    # each process set has its own engine thread: shutdown must let it finish before freeing
    rc, out, seconds = job(tmp_path, """
        for round in range(4):
            mpidp.init()
            ps = mpidp.add_process_set([0, 1])
            handles = [mpidp.allreduce_async(numpy.full(1 << 20, float(i)), op=mpidp.Sum, name=f"s{i}",
                                             process_set=ps) for i in range(6)] if ps.included() else []
            mpidp.shutdown()
            values = [h.wait()[0] for h in handles]
            assert values == [i * 2.0 for i in range(len(handles))], values
        print(f"rank {r} done", flush=True)
    """, np=3)
    assert rc == 0 and seconds < 40, out[-3000:]
    assert all(f"rank {k} done" in out for k in range(3))


def test_exit_without_shutdown_with_handles_in_flight(tmp_path):
    for attempt in range(3):
        rc, out, seconds = job(tmp_path, """
            handles = in_flight()
            print(f"rank {r} leaving", flush=True)
        """)
        assert rc == 0 and seconds < 30, f"attempt {attempt}: rc={rc}, {seconds:.1f} s\n{out[-3000:]}"
        assert "Segmentation" not in out and "signal" not in out.lower()


@pytest.mark.parametrize("when", ["initialised", "after_shutdown"])
def test_forked_child_that_exits_normally_leaves_the_job_alone(tmp_path, when):
    rc, out, seconds = job(tmp_path, """
        BEFORE
        pid = os.fork()
        if pid == 0:
            print(f"child of rank {r} exits", flush=True)
            sys.exit(0)                    # atexit handlers run here: no exit barrier, no MPI_Finalize
        os.waitpid(pid, 0)
        mpidp.init()
        assert mpidp.allreduce(numpy.ones(3), op=mpidp.Sum)[0] == mpidp.size()
        mpidp.shutdown()
        print(f"rank {r} done", flush=True)
    """.replace("BEFORE", "mpidp.shutdown()" if when == "after_shutdown" else "pass"),
        env={"MPIDP_EXIT_TIMEOUT_S": "10"})
    assert rc == 0 and seconds < 9, f"rc={rc}, {seconds:.1f} s\n{out[-3000:]}"
    assert "child of rank 1 exits" in out and "rank 1 done" in out
    assert "exited without mpidp.shutdown()" not in out


def test_forked_child_exception_does_not_abort_the_parents_job(tmp_path):
    rc, out, seconds = job(tmp_path, """
        pid = os.fork()
        if pid == 0:
            raise RuntimeError("child fails on purpose")
        os.waitpid(pid, 0)
        assert mpidp.allreduce(numpy.ones(3), op=mpidp.Sum)[0] == mpidp.size()
        mpidp.shutdown()
        print(f"rank {r} done", flush=True)
    """)
    assert rc == 0 and seconds < 20, f"rc={rc}, {seconds:.1f} s\n{out[-3000:]}"
    assert "child fails on purpose" in out and "rank 1 done" in out


def test_reinit_keeps_the_abort_hook_on_the_new_communicator(tmp_path):
    rc, out, seconds = job(tmp_path, """
        mpidp.shutdown()
        mpidp.init()
        if r == 1:
            time.sleep(0.3)
            raise RuntimeError("planted failure after re-init")
        mpidp.barrier()                    # rank 0 waits here forever unless rank 1's hook aborts
    """, timeout=40)
    assert rc not in (0, None) and seconds < 15, f"rc={rc}, {seconds:.1f} s\n{out[-3000:]}"
    assert "[rank 1/2] RuntimeError: planted failure after re-init" in out


@pytest.mark.parametrize("how", ["rc", "init_thread"])
def test_thread_level_below_multiple_is_refused(tmp_path, how):
    head = ("import mpi4py\nmpi4py.rc.thread_level = 'funneled'\n" if how == "rc" else
            "import mpi4py\nmpi4py.rc.initialize = False\nfrom mpi4py import MPI\n"
            "MPI.Init_thread(MPI.THREAD_SERIALIZED)\n") + HEAD
    rc, out, seconds = job(tmp_path, """
        try:
            mpidp.init()
        except mpidp.MpidpError as exc:
            print(f"rank {os.environ.get('PMI_RANK')} refused: {exc}", flush=True)
        else:
            print("init went ahead", flush=True)
        from mpi4py import MPI
        MPI.COMM_WORLD.Barrier()           # both ranks have printed
        MPI.Finalize()                     # (mpi4py does not when the script initialised MPI)
    """, head=head)
    assert rc == 0 and seconds < 20, out[-3000:]
    level = "funneled" if how == "rc" else "serialized"
    for r in (0, 1):
        assert f"rank {r} refused: MPI was initialised with thread level {level}" in out, out[-3000:]
    assert "init went ahead" not in out


def test_a_skipped_collective_ends_the_job_by_default(tmp_path):
    """No MPIDP_STALL_ABORT_S given: the default bound ends the job (made short through the default's
    own variable would hide the default, so only the warning time is shortened and the test reads it)."""
    rc, out, seconds = job(tmp_path, """
        from mpidp import _env
        assert _env.get("MPIDP_STALL_ABORT_S") == 300.0
        os.environ["MPIDP_STALL_ABORT_S"] = "3"   # (read at init: the inspector runs with it below)
        mpidp.shutdown(); mpidp.init()
        if r == 1:
            time.sleep(60)                 # leaves the loop early: never joins the last allreduce
        mpidp.allreduce(numpy.ones(4), name="loss")
    """, np=3, env={"MPIDP_STALL_WARNING_S": "1"})
    assert rc not in (0, None) and seconds < 20, f"rc={rc}, {seconds:.1f} s\n{out[-3000:]}"
    assert "stall: waiting" in out and "in loss" in out and "ranks not in it: 1 (" in out
    assert "aborting after MPIDP_STALL_ABORT_S=3" in out


def test_a_long_but_progressing_collective_is_not_a_stall(tmp_path):
    rc, out, seconds = job(tmp_path, """
        from mpidp.comm import stall
        from mpidp.comm.engine import engine

        def slow_exchange():               # 5 s in one collective, reporting progress every 0.2 s
            for _ in range(25):
                time.sleep(0.2)
                stall.tick()

        engine.run(slow_exchange, "slow exchange", stall.started())
        mpidp.allreduce(numpy.ones(4))
        mpidp.shutdown()
        print(f"rank {r} done", flush=True)
    """, np=3, env={"MPIDP_STALL_WARNING_S": "1", "MPIDP_STALL_ABORT_S": "2"})
    assert rc == 0, f"rc={rc}, {seconds:.1f} s\n{out[-3000:]}"
    assert out.count("done") == 3
