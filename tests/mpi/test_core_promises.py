"""The comm core keeps its promises (issue 17): what every rank calls is checked whole, MPI runs
only inside the ordered engine of its communicator, failures after the check cannot strand a peer,
ring messages of different collectives never match, handles finish once, process sets do not
wait for each other."""
import signal
import threading
import time
import warnings

import numpy
import pytest
from mpi4py import MPI

import mpidp
from mpidp.comm import _buffers, check, collectives, engine as engine_mod, runtime

from conftest import count_pool

RING = 64 * 1024  # float64 elements per rank: over _buffers.RING_FROM, so large host reductions ride the ring


def _expect_mismatch_everywhere(call, field, tensor="w"):
    with pytest.raises(mpidp.MismatchError) as info:
        call()
    err = info.value
    assert err.field == field, str(err)
    assert err.tensor == tensor and tensor in str(err)
    assert 0 in err.ranks and 1 in err.ranks
    # nothing is left half-done: the next collective is in step and correct
    assert mpidp.allreduce(numpy.ones(2), op=mpidp.Sum).tolist() == [mpidp.size()] * 2


# --- defect 3: the fingerprint covers the whole call ------------------------------------------------

def _kind_calls(r):
    n = mpidp.size()
    return {
        "allreduce vs reducescatter": lambda: (mpidp.reducescatter if r == 1 else mpidp.allreduce)(
            numpy.ones((n, 2)), name="w"),
        "allgather vs allreduce": lambda: (mpidp.allgather if r == 1 else mpidp.allreduce)(
            numpy.ones((n, 2)), name="w"),
        "alltoall vs broadcast": lambda: mpidp.alltoall(numpy.ones(n), name="w") if r == 1 else
        mpidp.broadcast(numpy.ones(n), 0, name="w"),
        "grouped vs plain allreduce": lambda: mpidp.grouped_allreduce([numpy.ones(3)], name="w") if r == 1
        else mpidp.allreduce(numpy.ones(3), name="w"),
        "broadcast_object vs allgather_object": lambda: mpidp.broadcast_object(1, name="w") if r == 1
        else mpidp.allgather_object(1, name="w"),
    }


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("case", list(_kind_calls(0)))
def test_different_collectives_raise_on_every_rank(rank, case):
    _expect_mismatch_everywhere(_kind_calls(rank)[case], "collective")


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("field, kwargs", [
    ("name", lambda r: {"name": "w" if r != 1 else "v"}),
    ("prescale_factor", lambda r: {"name": "w", "prescale_factor": 1.0 + (r == 1)}),
    ("postscale_factor", lambda r: {"name": "w", "postscale_factor": 1.0 + (r == 1)}),
])
def test_name_and_scale_factors_are_checked(rank, field, kwargs):
    call = lambda: mpidp.allreduce_(numpy.ones(4), **kwargs(rank))  # noqa: E731
    with pytest.raises(mpidp.MismatchError) as info:
        call()
    assert info.value.field == field and 0 in info.value.ranks and 1 in info.value.ranks
    assert mpidp.allreduce(numpy.ones(2), op=mpidp.Sum).tolist() == [mpidp.size()] * 2


@pytest.mark.mpi(min_size=2)
def test_swapped_same_shape_tensors_are_caught(rank):
    a, b = numpy.full(5, 1.0), numpy.full(5, 2.0)
    order = [("a", a), ("b", b)] if rank != 1 else [("b", b), ("a", a)]
    handles = [mpidp.allreduce_async(t, name=n, op=mpidp.Sum) for n, t in order]
    for h in handles:
        with pytest.raises(mpidp.MismatchError, match="name differs"):
            h.wait()


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("kind", ["allreduce", "reducescatter"])
def test_piece_size_is_checked(rank, size, kind):
    old = _buffers.piece_bytes()
    _buffers.set_piece_bytes(old * (2 if rank == 1 else 1))
    try:
        with pytest.raises(mpidp.MismatchError) as info:
            getattr(mpidp, kind)(numpy.ones((size, RING)), name="w", op=mpidp.Sum)
    finally:
        _buffers.set_piece_bytes(old)
    assert info.value.field == "piece bytes" and 0 in info.value.ranks and 1 in info.value.ranks
    assert mpidp.allreduce(numpy.ones(2), op=mpidp.Sum).tolist() == [size] * 2


@pytest.mark.mpi(min_size=2)
def test_a_rank_that_skipped_a_collective_is_caught_by_its_number(rank, size):
    eng = engine_mod.engine_for(mpidp.comm.runtime.get_comm())
    if rank == 1:  # a collective numbered on this rank that the others never see
        eng.started()
    with pytest.raises(mpidp.MismatchError, match="sequence number differs") as info:
        mpidp.allreduce(numpy.ones(3), name="w")
    assert info.value.tensor == "w" and 0 in info.value.ranks and 1 in info.value.ranks
    if rank != 1:  # back in step
        eng.started()
    assert mpidp.allreduce(numpy.ones(1), op=mpidp.Sum)[0] == size


def test_auto_names_follow_the_communicators_own_order(rank, size):
    sets = [mpidp.ProcessSet([r]) for r in range(size)]  # every rank creates every set
    for _ in range(rank + 1):  # a different number of collectives on each rank's own set
        mpidp.allreduce(numpy.ones(1), process_set=sets[rank])
    h = mpidp.allreduce_async(numpy.ones(1))
    h.wait()
    assert len(set(mpidp.allgather_object(h.what))) == 1


# --- defect 2: every MPI call runs in its communicator's engine -------------------------------------

def test_check_outside_the_engine_is_refused():
    comm = runtime.get_comm()
    with pytest.raises(RuntimeError, match="outside the engine"):
        check.compare(comm, "allreduce", "w", (("a", 1),), 1)


def test_check_from_the_callers_thread_runs_behind_queued_collectives(rank, size):
    comm = runtime.get_comm()
    for i in range(20):
        x = numpy.full(8, float(rank + i))
        # odd ranks wake the engine thread, even ranks leave the work queued: without the order
        # the plan check overtakes the queued allreduce on some ranks and not on others
        h = collectives.fused_allreduce_async_(x, f"bucket{i}", wake=rank % 2 == 1)
        check.agree(comm, "plan", "plan", (("buckets", 1),))
        h.wait()
        assert x.tolist() == [sum(r + i for r in range(size))] * 8


# --- defect 4: local errors first; reductions ignore the caller's error state ------------------------

def test_read_only_outputs_fail_before_any_communication(size):
    ro = numpy.ones(4)
    ro.flags.writeable = False
    for call in (lambda: mpidp.allreduce_(ro, name="ro"), lambda: mpidp.broadcast_(ro, 0, name="ro"),
                 lambda: mpidp.grouped_allreduce_([numpy.ones(2), ro], name="ro"),
                 lambda: mpidp.allreduce_async_(ro, name="ro")):
        with pytest.raises(ValueError, match="read-only"):
            call()
    assert mpidp.allreduce(numpy.ones(1), op=mpidp.Sum)[0] == size


@pytest.mark.parametrize("dtype, n", [("float32", 2 * RING), ("float16", 4 * RING), ("float16", 8)])
@pytest.mark.parametrize("how", ["blocking", "async"])
def test_overflow_is_inf_everywhere_whatever_the_callers_error_state(rank, size, dtype, n, how):
    big = numpy.finfo(dtype).max
    x = numpy.zeros(n * size, dtype=dtype)
    x[::3] = big  # every rank's share overflows when summed (at np >= 2)
    expect = numpy.zeros(n * size, dtype=numpy.float64)
    expect[::3] = size * float(big)
    with numpy.errstate(over="ignore"):
        expect = expect.astype(dtype).astype(numpy.float64)
    with warnings.catch_warnings(), numpy.errstate(all="raise"):
        warnings.simplefilter("error", RuntimeWarning)
        if how == "blocking":
            out = mpidp.allreduce(x, op=mpidp.Sum, name="overflow")
        else:
            out = mpidp.synchronize(mpidp.allreduce_async(x, op=mpidp.Sum, name="overflow"))
    numpy.testing.assert_array_equal(out.astype(numpy.float64), expect)
    # bit-identical on every rank
    assert len(set(mpidp.allgather_object(out.tobytes()))) == 1


# --- defect 12: ring messages of different collectives never match -----------------------------------

@pytest.mark.mpi(min_size=2)
def test_a_stray_ring_message_cannot_match_the_next_ring(rank, size):
    comm = runtime.get_comm()
    x = numpy.arange(size * RING, dtype=numpy.float64) * (rank + 1)
    mpidp.allreduce(numpy.ones(1))  # the collective whose ring "was abandoned"
    eng = engine_mod.engine_for(comm)
    stale = getattr(_buffers, "_RING_TAG", None)  # before tags were per collective
    tag = stale if stale is not None else _buffers.ring_tag(eng.progress.seq)
    stray = numpy.full(1, -1.0)
    req = comm.Isend(stray, dest=(rank + 1) % size, tag=tag)  # what an abandoned ring leaves behind
    out = mpidp.allreduce(x, op=mpidp.Sum, name="next ring")
    numpy.testing.assert_array_equal(out, numpy.arange(size * RING, dtype=numpy.float64) * sum(range(1, size + 1)))
    got = numpy.zeros(1)
    comm.Recv(got, source=(rank - 1) % size, tag=tag)  # the stray is still there, unmatched
    req.Wait()
    assert got[0] == -1.0


# --- defect 11: handles ------------------------------------------------------------------------------

def test_two_threads_waiting_on_one_handle_finish_it_once(size):
    engine_mod.test_delay_s = 0.0005  # widen the windows between done, finish and return
    try:
        for i in range(60):
            h = mpidp.allreduce_async(numpy.full(3, 1.0 + i), postscale_factor=1.5)
            start = threading.Barrier(3)
            results = []

            def waiter():
                start.wait()
                results.append(h.wait())

            threads = [threading.Thread(target=waiter) for _ in range(2)]
            for t in threads:
                t.start()
            start.wait()
            results.append(h.wait())
            for t in threads:
                t.join()
            assert len(results) == 3 and all(r is results[0] for r in results)
            assert results[0].tolist() == [1.5 * (1.0 + i)] * 3
    finally:
        engine_mod.test_delay_s = 0.0


def test_work_queued_behind_a_waited_handle_completes_without_a_waiter(size):
    for i in range(50):
        h1 = mpidp.allreduce_async(numpy.ones(4), op=mpidp.Sum, name="waited")
        h2 = mpidp.allreduce_async(numpy.ones(4), op=mpidp.Sum, name="polled")
        h1.wait()
        deadline = time.monotonic() + 10
        while not mpidp.poll(h2):  # Horovod's poll loop: nobody waits, the engine thread must run it
            assert time.monotonic() < deadline, f"round {i}: a queued collective never ran"
            time.sleep(0.001)
        assert h2.wait().tolist() == [size] * 4


def test_keyboard_interrupt_reaches_the_waiter_not_the_job_it_was_running(size, sigint_raises):
    if threading.current_thread() is not threading.main_thread():
        pytest.skip("signals reach the main thread only")
    comm = runtime.get_comm()
    eng = engine_mod.engine_for(comm)
    eng.drain()
    sums = []

    def interrupted_job():  # the waiter runs this one while it waits for the next
        signal.raise_signal(signal.SIGINT)
        for _ in range(50):  # Python code and MPI calls after the signal arrived
            buf = numpy.ones(1)
            comm.Allreduce(MPI.IN_PLACE, buf)
        sums.append(buf[0])
        return "first"

    seq1, seq2 = eng.started(), None
    h1 = eng.submit(interrupted_job, "first", seq1, wake=False)
    seq2 = eng.started()
    h2 = eng.submit(lambda: "second", "second", seq2, wake=False)
    with pytest.raises(KeyboardInterrupt):
        h2.wait()
    assert h1.wait() == "first" and sums == [size]
    assert h2.wait() == "second"


class _FakeDevice(numpy.ndarray):
    """A host array that the staging code treats as device memory (get/set like CuPy), so that
    the pinned pool's bookkeeping is exercised without a GPU."""

    def get(self, out):
        out[...] = self

    def set(self, host):
        self.view(numpy.ndarray)[...] = host


@pytest.mark.mpi(min_size=2)
def test_a_handle_that_raises_gives_its_staging_buffers_back(rank, size, monkeypatch):
    monkeypatch.setattr(_buffers, "is_cupy", lambda a: isinstance(a, _FakeDevice))
    monkeypatch.setattr(runtime, "cuda_aware", lambda *a, **k: False)
    counts = count_pool(monkeypatch)
    for i in range(10):
        x = numpy.ones(3 + (rank == 1)).view(_FakeDevice)
        with pytest.raises(mpidp.MismatchError):
            mpidp.allreduce_(x, name="staged")
        with pytest.raises(mpidp.MismatchError):
            mpidp.synchronize(mpidp.allreduce_async_(x, name="staged"))
    x = numpy.ones(3).view(_FakeDevice)
    assert mpidp.allreduce_(x, op=mpidp.Sum).tolist() == [size] * 3
    assert counts["acquire"] >= 21 and counts["acquire"] == counts["release"], counts


# --- defect 8: overlapping process sets complete in any order -----------------------------------------

@pytest.mark.mpi(min_size=2)
def test_overlapping_process_sets_used_in_different_orders_complete(rank, size):
    # set k holds ranks k and k+1; rank r uses set r first, then set r-1: with one queue per
    # process every rank waits in its first set for a neighbour that waits in its own first set
    sets = [mpidp.ProcessSet([k, (k + 1) % size]) for k in range(size)]
    mine = [sets[rank], sets[(rank - 1) % size]]
    for step in range(3):
        handles = [mpidp.allreduce_async(numpy.full(4, float(rank + step)), op=mpidp.Sum, process_set=ps)
                   for ps in mine]
        for ps, h in zip(mine, handles):
            assert h.wait().tolist() == [float(sum(ps.ranks) + 2 * step)] * 4
    # and a collective of the whole job after it
    assert mpidp.allreduce(numpy.ones(1), op=mpidp.Sum)[0] == size
