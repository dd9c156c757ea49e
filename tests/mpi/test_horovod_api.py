"""Horovod's names with Horovod's meaning: grouped collectives, process sets, timeline, topology."""
import json
import os
import shutil
import tempfile

import numpy
import pytest

import mpidp
from mpidp.backend import asnumpy

from conftest import data, tol


def close(got, want, dtype):
    got = asnumpy(got)
    assert got.dtype == numpy.dtype(dtype) and got.shape == want.shape, (got.dtype, got.shape, want.shape)
    numpy.testing.assert_allclose(got.astype(numpy.float64), want.astype(numpy.float64),
                                  rtol=tol(dtype), atol=tol(dtype))


def rows(r, base=2):
    return base + r % 3  # a different first dimension on neighbouring ranks


@pytest.mark.parametrize("asynchronous", [False, True])
def test_grouped_allgather(xp, rank, size, asynchronous):
    shapes = [lambda r: (rows(r), 3), lambda r: (rows(r, 0),), lambda r: (1, 2, 2)]
    dtypes = ["float32", "int64", "float64"]
    mine = [xp.asarray(data(s(rank), d, 10 * rank + i)) for i, (s, d) in enumerate(zip(shapes, dtypes))]
    if asynchronous:
        got = mpidp.synchronize(mpidp.grouped_allgather_async(mine, name="ga"))
    else:
        got = mpidp.grouped_allgather(mine)
    assert isinstance(got, list) and len(got) == 3
    for i, (s, d) in enumerate(zip(shapes, dtypes)):
        want = numpy.concatenate([data(s(r), d, 10 * r + i) for r in range(size)])
        close(got[i], want, d)
        assert type(got[i]) is type(mine[i])
    assert mpidp.grouped_allgather([]) == []


@pytest.mark.parametrize("op", ["Sum", "Average"])
@pytest.mark.parametrize("asynchronous", [False, True])
def test_grouped_reducescatter(xp, rank, size, op, asynchronous):
    shapes = [(2 * size + 1, 3), (size,), (1, 4)]  # uneven rows, one row each, fewer rows than ranks
    dtypes = ["float32", "float64", "float32"]
    everyone = [[data(s, d, 100 * r + i) for i, (s, d) in enumerate(zip(shapes, dtypes))] for r in range(size)]
    mine = [xp.asarray(a) for a in everyone[rank]]
    kw = dict(op=getattr(mpidp, op), postscale_factor=2.0)
    if asynchronous:
        got = mpidp.synchronize(mpidp.grouped_reducescatter_async(mine, **kw))
    else:
        got = mpidp.grouped_reducescatter(mine, **kw)
    for i, d in enumerate(dtypes):
        total = numpy.sum([everyone[r][i].astype(numpy.float64) for r in range(size)], axis=0) * 2.0
        if op == "Average":
            total /= size
        base, extra = divmod(shapes[i][0], size)
        start = rank * base + min(rank, extra)
        close(got[i], total[start:start + base + (rank < extra)].astype(d), d)


def test_grouped_allreduce_async_in_place(xp, rank, size):
    everyone = [[data((5, 3), "float32", 7 * r), data((4,), "float64", 7 * r + 1)] for r in range(size)]
    mine = [xp.asarray(a).copy() for a in everyone[rank]]
    handle = mpidp.grouped_allreduce_async_(mine, op=mpidp.Sum)
    got = mpidp.synchronize(handle)
    for i, d in enumerate(["float32", "float64"]):
        assert got[i] is mine[i]
        close(mine[i], numpy.sum([everyone[r][i] for r in range(size)], axis=0, dtype=numpy.float64).astype(d), d)


def test_grouped_ops_on_a_process_set(rank, size):
    odd = mpidp.add_process_set([r for r in range(size) if r % 2]) if size > 2 else None
    if odd is None:
        pytest.skip("needs 3 ranks for a set that is neither empty nor the whole job")
    try:
        if odd.included():
            got = mpidp.grouped_allgather([numpy.array([rank])], process_set=odd)
            assert got[0].tolist() == odd.ranks
        else:
            with pytest.raises(ValueError, match="not in process set"):
                mpidp.grouped_allgather([numpy.array([rank])], process_set=odd)
    finally:
        assert mpidp.remove_process_set(odd)


def test_add_and_remove_process_set(rank, size):
    if size == 1:
        with pytest.raises(ValueError, match="exists already"):
            mpidp.add_process_set([0])  # the global set
        assert mpidp.remove_process_set(mpidp.global_process_set) is False
        return
    pair = [size - 1, 0] if size > 2 else [1]  # any order; kept sorted as in Horovod
    first = mpidp.add_process_set(pair)
    assert first.ranks == sorted(pair) and first.process_set_id > 0
    assert first.included() == (rank in pair)
    with pytest.raises(ValueError, match="exists already"):
        mpidp.add_process_set(sorted(pair))
    tail = mpidp.add_process_set(range(1, size) if size > 2 else [0])
    assert tail.process_set_id not in (0, first.process_set_id)
    if tail.included():
        got = mpidp.allreduce(numpy.array([float(rank)]), op=mpidp.Sum, process_set=tail)
        assert got[0] == sum(tail.ranks)
    assert mpidp.remove_process_set(first) and mpidp.remove_process_set(tail)
    assert mpidp.remove_process_set(first) is False  # already gone
    with pytest.raises(ValueError, match="not registered"):
        mpidp.allreduce(numpy.ones(1), process_set=first)
    again = mpidp.add_process_set(pair)  # its ranks are free again
    assert mpidp.remove_process_set(again)


@pytest.mark.mpi(min_size=2)
def test_init_again_registers_the_process_sets_given(rank, size):
    late = mpidp.ProcessSet([0])  # after init: registered at once, and init() leaves it as it is
    mpidp.init(process_sets=[late, [size - 1]])
    last = [ps for ps in mpidp.comm.process_set._created if ps.ranks == [size - 1]]
    assert late.process_set_id is not None and len(last) == 1
    if rank == 0:
        assert mpidp.allgather(numpy.array([rank]), process_set=late).tolist() == [0]
    assert mpidp.remove_process_set(late) and mpidp.remove_process_set(last[0])


def test_start_and_stop_timeline(rank, size):
    directory = mpidp.broadcast_object(tempfile.mkdtemp(prefix="mpidp-hvd-tl-") if rank == 0 else None)
    path = os.path.join(directory, "timeline.json")
    try:
        mpidp.start_timeline(path, mark_cycles=True)
        mpidp.allreduce(numpy.ones(4), name="recorded.allreduce")
        assert mpidp.stop_timeline() == path
        mpidp.allreduce(numpy.ones(4), name="after.stop")  # not recorded
        assert mpidp.stop_timeline() is None  # nothing on: no file, no collective
        if rank == 0:
            with open(path) as f:
                events = json.load(f)["traceEvents"]
            names = {(e["pid"], e["name"]) for e in events if e.get("ph") == "X"}
            assert {(r, "recorded.allreduce") for r in range(size)} <= names
            assert not any(n == "after.stop" for _, n in names)
        with pytest.raises(ValueError, match="file path"):
            mpidp.start_timeline("")
    finally:
        mpidp.timeline.stop()
        mpidp.barrier()
        if rank == 0:
            shutil.rmtree(directory, ignore_errors=True)


def test_is_homogeneous(size):
    local_sizes = mpidp.allgather(numpy.array([mpidp.local_size()]))  # every node's rank count, per rank
    assert mpidp.is_homogeneous() is (len(set(local_sizes.tolist())) == 1)
