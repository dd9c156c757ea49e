"""Review of the grouped plan, set_check and the hierarchical allgather: cases that went wrong."""
import threading
import time

import numpy
import pytest

import mpidp
from mpidp.comm import collectives

from test_hierarchical import topo  # noqa: F401  (the fixture: one host's ranks split into fake nodes)


@pytest.mark.parametrize("twice", ["same array", "two views of one array"])
@pytest.mark.parametrize("op", ["Sum", "Average"])
def test_grouped_in_place_with_one_big_tensor_twice_reduces_it_once(rank, size, twice, op):
    """A big ("alone") tensor listed twice, or two contiguous views of its memory: each is reduced
    (and prescaled) once, as the small ones are, not once per listing in the same memory."""
    n = collectives.ALONE_BYTES // 8 + 5
    for _ in range(2):  # the second call through the grouped plan
        big = numpy.full(n, float(rank + 1))
        other = big if twice == "same array" else big.reshape(1, n)
        small = numpy.full(3, float(rank + 1))
        mpidp.grouped_allreduce_([big, small, other], op=getattr(mpidp, op), prescale_factor=2.0, name="twice")
        total = 2.0 * size * (size + 1) / 2
        want = total / size if op == "Average" else total
        numpy.testing.assert_array_equal(big, numpy.full(n, want))
        numpy.testing.assert_array_equal(small, numpy.full(3, want))


@pytest.mark.mpi(min_size=3)
def test_set_check_lets_collectives_on_process_sets_finish_with_the_old_setting(rank, size, monkeypatch):
    """An async collective on a process set, started before set_check(False) on every rank, runs with
    the check on every rank, however late its engine thread picks it up on one of them (rank 0's
    sleeps 1 s first; rank 1's has started its check when set_check is called). Otherwise rank 1
    is in the check's Allgather and rank 0 in the Allreduce: a hang or garbage."""
    ps = mpidp.add_process_set([0, 1])  # (a set of every rank is the global one)
    real_job, started = collectives._job, threading.Event()

    def job(*args, **kwargs):
        run = real_job(*args, **kwargs)

        def slow():
            if rank == 0:
                time.sleep(1.0)
            started.set()
            return run()
        return slow

    monkeypatch.setattr(collectives, "_job", job)
    x = numpy.full(8, float(rank + 1))
    handle = mpidp.allreduce_async(x, op=mpidp.Sum, name="before", process_set=ps) if rank < 2 else None
    if rank == 1:
        assert started.wait(30)
    old = collectives.set_check(False)
    try:
        if handle is not None:
            numpy.testing.assert_array_equal(mpidp.synchronize(handle), numpy.full(8, 3.0))
    finally:
        collectives.set_check(old)


def test_grouped_plan_follows_alone_bytes(monkeypatch):
    """A plan made before ALONE_BYTES changed (tests lower it) is not reused with the old layout: the
    lowered threshold sends each tensor by itself (test_grouped_mixed_dtypes_shapes_and_layouts
    with big ones alone otherwise ran the fused plan its fused variant had left, under the same key)."""
    sizes = []
    real = collectives._reduce
    monkeypatch.setattr(collectives, "_reduce", lambda comm, path, send, recv, *a: sizes.append(recv.size)
                        or real(comm, path, send, recv, *a))
    ins = [numpy.ones((3, 4), numpy.float32), numpy.ones(5, numpy.float32)]
    mpidp.grouped_allreduce_(ins, op=mpidp.Sum, name="alone bytes")
    assert sizes == [17]
    sizes.clear()
    monkeypatch.setattr(collectives, "ALONE_BYTES", 16)
    mpidp.grouped_allreduce_(ins, op=mpidp.Sum, name="alone bytes")
    assert sizes == [12, 5]


class _DeviceArray:
    """What the hierarchical allgather is given for a CuPy array under a CUDA-aware MPI (Staged keeps
    device memory): NumPy cannot convert it implicitly, as CuPy refuses; ``get()`` copies it to the host."""
    __module__ = "cupy._review4"  # backend.xp.is_cupy goes by the module

    def __init__(self, a):
        self._a, self.dtype, self.shape, self.size = a, a.dtype, a.shape, a.size

    def __array__(self, *args, **kwargs):
        raise TypeError("Implicit conversion to a NumPy array is not allowed. Please use `.get()`")

    def get(self, stream=None, out=None, blocking=True):
        if out is None:
            return self._a.copy()
        out[...] = self._a
        return out


def test_hierarchical_allgather_takes_device_memory_under_a_cuda_aware_mpi(topo, monkeypatch):
    """Through the nodes, a rank's own block is copied into the host result first: from device memory
    (a CUDA-aware MPI leaves the send buffer there) it must go by ``get()``; a TypeError there came after
    the ranks agreed, and ended the job."""
    import sys
    import types
    from mpi4py import MPI
    from mpidp.comm import _hierarchical
    if topo.gathers() is None:
        pytest.skip(f"layout {topo.describe()} gathers flat (MPI takes device memory itself there)")
    monkeypatch.setitem(sys.modules, "cupy", sys.modules.get("cupy") or types.ModuleType("cupy"))
    comm = topo.comm
    size, rank = comm.Get_size(), comm.Get_rank()
    counts = numpy.array([r + 2 for r in range(size)], dtype=numpy.int64) * 3
    displs = numpy.concatenate(([0], numpy.cumsum(counts)[:-1]))
    out = numpy.full(int(counts.sum()), numpy.nan)
    send = _DeviceArray(numpy.full(int(counts[rank]), float(rank)))
    _hierarchical.allgatherv(comm, topo, 0, send, out, counts, displs, MPI.DOUBLE)
    numpy.testing.assert_array_equal(out, numpy.concatenate([numpy.full(int(c), float(r))
                                                             for r, c in enumerate(counts)]))
