"""Whole jobs for the comm core's promises (issue 17): the stall report is right per process set,
and a collective that fails on one rank after the ranks agreed ends the job instead of leaving a
silently wrong result or a hang."""

import pytest

from _mpirun import mpidp_job

pytestmark = pytest.mark.spawns


job = mpidp_job


def test_stall_report_compares_the_sets_own_collectives(tmp_path):
    # rank 0 waits in set [0, 1]; rank 1 is busy in set [1, 2], where rank 2 comes late. Counted
    # over the whole job, rank 1 sits in "collective #1" as rank 0 does, and the report used to
    # blame rank 2 (not in set [0, 1] at all) instead of rank 1
    rc, out, seconds = job(tmp_path, """
        a, b = mpidp.ProcessSet([0, 1]), mpidp.ProcessSet([1, 2])
        if r == 0:
            mpidp.allreduce(numpy.ones(2), name="in a", process_set=a)
        if r == 1:
            mpidp.allreduce(numpy.ones(2), name="in b", process_set=b)
            mpidp.allreduce(numpy.ones(2), name="in a", process_set=a)
        if r == 2:
            time.sleep(4)
            mpidp.allreduce(numpy.ones(2), name="in b", process_set=b)
        print(f"rank {r} done", flush=True)
        mpidp.shutdown()
    """, env={"MPIDP_STALL_WARNING_S": "1"})
    assert rc == 0, out
    lines = [line for line in out.splitlines() if line.startswith("[rank 0] stall:")]
    assert lines, out
    assert "in a (collective #1 on process set [0, 1])" in lines[0], out
    assert "ranks not in it: 1 (no collective on this set yet)" in lines[0], out
    assert "2 (" not in lines[0], out


def test_a_collective_that_fails_after_the_check_ends_the_job(tmp_path):
    # with the check off, ranks disagree on the dtype of a ring allreduce: the rank whose receive
    # is too small fails inside the ring. Its peers must not wait for ever, and no rank may go on
    # with a wrong sum (the ring's fixed tag once matched the next ring's messages)
    rc, out, seconds = job(tmp_path, """
        n = 1 << 18
        x = numpy.ones(n, dtype="float16" if r == 0 else "float32")
        try:
            mpidp.allreduce(x, op=mpidp.Sum, name="mixed")
        except Exception as exc:
            print(f"rank {r} caught {type(exc).__name__}", flush=True)
        y = mpidp.allreduce(numpy.ones(n, dtype="float32"), op=mpidp.Sum, name="next")
        print(f"rank {r} next {'right' if (y == 2).all() else 'WRONG'}", flush=True)
        mpidp.shutdown()
    """, np=2, env={"MPIDP_CHECK": "0"}, timeout=60)
    assert rc not in (0, None), out
    assert seconds < 30, f"took {seconds:.0f} s\n{out}"
    assert "failed on this rank after the ranks had agreed to run it" in out, out
    assert "WRONG" not in out and " caught " not in out, out
