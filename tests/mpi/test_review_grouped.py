"""Grouped collectives keep the handle promises of their members: a group whose member raised
still finishes every other member (staging buffers go back to the pool), and every rank sees
the same error."""
import numpy
import pytest

import mpidp
from mpidp.comm import _buffers, collectives, runtime

from conftest import count_pool


class _FakeDevice(numpy.ndarray):
    """A host array the staging code treats as device memory, so the pool's bookkeeping runs without a GPU."""

    def get(self, out):
        out[...] = self

    def set(self, host):
        self.view(numpy.ndarray)[...] = host


class _FakeXP:
    """The array module of _FakeDevice arrays: results stay 'device' arrays, as CuPy's do."""

    @staticmethod
    def ascontiguousarray(a):
        return numpy.ascontiguousarray(a).view(_FakeDevice)

    @staticmethod
    def empty(shape, dtype):
        return numpy.empty(shape, dtype).view(_FakeDevice)

    @staticmethod
    def asarray(a):
        return numpy.asarray(a).view(_FakeDevice)


@pytest.fixture
def counted_pool(monkeypatch):
    monkeypatch.setattr(_buffers, "is_cupy", lambda a: isinstance(a, _FakeDevice))
    monkeypatch.setattr(runtime, "cuda_aware", lambda *a, **k: False)
    real_module = collectives.get_array_module
    monkeypatch.setattr(collectives, "get_array_module",
                        lambda *a: _FakeXP if any(isinstance(x, _FakeDevice) for x in a) else real_module(*a))
    counts = count_pool(monkeypatch)
    return counts


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("kind", ["reducescatter", "allgather"])
def test_a_group_with_a_failing_member_finishes_the_others(rank, size, counted_pool, kind):
    def tensors(bad):
        # the middle member's dtype differs on rank 1: that member raises MismatchError on every
        # rank; the members before and after it run (their checks agree) and must be finished too
        dtype = numpy.float32 if bad and rank == 1 else numpy.float64
        return [numpy.full((size, 3), 1.0).view(_FakeDevice), numpy.full((size, 2), 2.0, dtype).view(_FakeDevice),
                numpy.full((size, 4), 3.0).view(_FakeDevice)]

    def group(ts):
        if kind == "reducescatter":
            return mpidp.grouped_reducescatter_async(ts, op=mpidp.Sum, name="g")
        return mpidp.grouped_allgather_async(ts, name="g")

    for _ in range(3):
        with pytest.raises(mpidp.MismatchError) as info:
            mpidp.synchronize(group(tensors(bad=True)))
        assert info.value.tensor == "g[1]"
    got = mpidp.synchronize(group(tensors(bad=False)))
    expect = [numpy.full((1 if kind == "reducescatter" else size * size, w), v * (size if kind == "reducescatter" else 1))
              for w, v in ((3, 1.0), (2, 2.0), (4, 3.0))]
    for g, e in zip(got, expect):
        numpy.testing.assert_array_equal(numpy.asarray(g), e)
    assert counted_pool["acquire"] > 0 and counted_pool["acquire"] == counted_pool["release"], counted_pool
