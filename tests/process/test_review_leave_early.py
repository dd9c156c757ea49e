"""A rank that leaves the job early (shutdown() or exit while its peers still run a collective)
gives those peers a MismatchError naming the collective at once, not a wait for the stall
bound (300 s by default) or the exit timeout (60 s), and a shutdown() called on some ranks
only is an error too. Default stall and exit bounds throughout: the job must end well before them.
"""
import re
import textwrap

import pytest

from _mpirun import python, run

pytestmark = pytest.mark.spawns

BOUND_S = 25  # the job, start-up included; the defaults would take 60 s (exit) or 300 s (stall)


def job(tmp_path, body, np=3):
    script = tmp_path / "job.py"
    script.write_text("import os, sys, time\nimport numpy\nimport mpidp\nmpidp.init()\n"
                      "r = mpidp.rank()\n" + textwrap.dedent(body))
    return run(python(script), np=np, timeout=BOUND_S + 30)


def assert_reported(rc, out, seconds, left):
    assert rc not in (0, None), f"rc={rc}\n{out[-3000:]}"
    assert seconds < BOUND_S, f"took {seconds:.1f} s\n{out[-3000:]}"
    # every rank's MismatchError names both sides: the collective the peers wait in, and the leaving
    assert re.search(rf"MismatchError: mismatched \w+ of tensor .*'loss'.*collective differs .*'{left}'", out), \
        out[-3000:]


@pytest.mark.parametrize("np_", [2, 3])
def test_shutdown_one_step_early(tmp_path, np_):
    rc, out, seconds = job(tmp_path, """
        for step in range(3 if r == 1 else 4):
            mpidp.allreduce(numpy.ones(4), name="loss")
        mpidp.shutdown()
        print(f"[rank {r}] finished", flush=True)
    """, np=np_)
    assert_reported(rc, out, seconds, "shutdown")


def test_exit_one_step_early(tmp_path):
    rc, out, seconds = job(tmp_path, """
        for step in range(3 if r == 1 else 4):
            mpidp.allreduce(numpy.ones(4), name="loss")
    """)
    assert_reported(rc, out, seconds, "exit")


def test_exit_after_a_local_error_on_one_rank(tmp_path):
    # rank 1's allreduce_ fails before any communication (read-only output); it leaves, rank 0
    # gets MismatchError from the check of its allreduce; both then exit 1 at once (no abort, no
    # wait for a bound: the exit checks meet whatever each rank did before)
    rc, out, seconds = job(tmp_path, """
        x = numpy.ones(4)
        x.flags.writeable = r != 1
        try:
            mpidp.allreduce_(x, name="loss")
        except (ValueError, mpidp.MismatchError) as exc:
            print(f"[rank {r}] {type(exc).__name__}: {exc}", flush=True)
            sys.exit(1)
    """, np=2)
    assert rc == 1 and seconds < BOUND_S, f"rc={rc} {seconds:.1f} s\n{out[-3000:]}"
    assert "[rank 1] ValueError: allreduce_ of tensor 'loss'" in out, out[-3000:]
    assert re.search(r"\[rank 0\] MismatchError: .*collective differs \(rank 0 has 'allreduce'; rank 1 has 'exit'\)",
                     out), out[-3000:]
    assert "Abort" not in out and "stall" not in out, out[-3000:]


def test_shutdown_on_one_rank_only(tmp_path):
    rc, out, seconds = job(tmp_path, """
        mpidp.allreduce(numpy.ones(4), name="loss")
        if r == 0:
            mpidp.shutdown()
    """, np=2)
    assert rc not in (0, None) and seconds < BOUND_S, f"rc={rc} {seconds:.1f} s\n{out[-3000:]}"
    assert re.search(r"MismatchError: .*collective differs \(rank 0 has 'shutdown'; rank 1 has 'exit'\)", out), \
        out[-3000:]


def test_leave_a_process_set_early(tmp_path):
    rc, out, seconds = job(tmp_path, """
        s = mpidp.add_process_set([0, 1])
        if s.included():
            for step in range(3 if r == 1 else 4):
                mpidp.allreduce(numpy.ones(4), name="loss", process_set=s)
        mpidp.shutdown()
    """)
    assert_reported(rc, out, seconds, "shutdown")


def test_clean_end_still_exits_zero(tmp_path):
    rc, out, _ = job(tmp_path, """
        s = mpidp.add_process_set([0, 1])
        hs = [mpidp.allreduce_async(numpy.ones(4), op=mpidp.Sum, name=f"g{i}") for i in range(3)]
        if s.included():
            hs.append(mpidp.allreduce_async(numpy.ones(4), op=mpidp.Sum, process_set=s))
        mpidp.shutdown()
        print(f"[rank {r}] sums {[float(h.wait()[0]) for h in hs]}", flush=True)
        mpidp.init(process_sets=[s])
        if s.included():
            mpidp.allreduce(numpy.ones(4), process_set=s)
        # then every rank exits without shutdown()
    """)
    assert rc == 0, out[-3000:]
    assert out.count("sums [3.0, 3.0, 3.0, 2.0]") == 2 and "[rank 2] sums [3.0, 3.0, 3.0]" in out, out[-3000:]


def test_shutdown_after_a_mismatch_meets_the_peers_shutdown(tmp_path):
    # rank 1's allreduce_ fails locally; each rank catches what it gets and shuts down (rank 1's
    # first shutdown() meets rank 0's allreduce and raises too; its second one meets rank 0's)
    rc, out, seconds = job(tmp_path, """
        x = numpy.ones(4)
        x.flags.writeable = r != 1
        try:
            mpidp.allreduce_(x, name="loss")
        except (ValueError, mpidp.MismatchError) as exc:
            print(f"[rank {r}] {type(exc).__name__}", flush=True)
        for attempt in range(3):
            try:
                mpidp.shutdown()
                break
            except mpidp.MismatchError as exc:
                print(f"[rank {r}] shutdown: {exc}", flush=True)
        print(f"[rank {r}] shut down: {not mpidp.is_initialized()}", flush=True)
    """, np=2)
    assert rc == 0 and seconds < BOUND_S, f"rc={rc} {seconds:.1f} s\n{out[-3000:]}"
    assert "[rank 0] shut down: True" in out and "[rank 1] shut down: True" in out, out[-3000:]
