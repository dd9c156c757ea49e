"""Collectives on arrays of other frameworks through DLPack: PyTorch CPU tensors in, tensors out,
in-place ops write the caller's memory; any __dlpack__ object is accepted."""
import numpy
import pytest

import mpidp
from mpidp.backend import interop

from conftest import data

torch = pytest.importorskip("torch", reason="PyTorch is not installed (pip install 'mpidp[torch]')")

DTYPES = {"float32": torch.float32, "float64": torch.float64, "float16": torch.float16, "int64": torch.int64}


def everyone(shape, dtype, size, salt=0):
    return [data(shape, dtype, 1000 * salt + r) for r in range(size)]


def tensor(a):
    return torch.from_numpy(numpy.ascontiguousarray(a).copy())


def same(got, want):
    assert isinstance(got, torch.Tensor), type(got)
    numpy.testing.assert_allclose(got.numpy().astype(numpy.float64), want.astype(numpy.float64), rtol=1e-2 if
                                  got.dtype == torch.float16 else 1e-6)


def test_native_view_shares_the_tensors_memory():
    t = torch.arange(12.0).reshape(3, 4)[:, ::2]  # strided, too
    view = interop.native(t)
    assert isinstance(view, numpy.ndarray) and view.ctypes.data == t.data_ptr()
    view[0, 0] = 42.0
    assert t[0, 0] == 42.0
    back = interop.restore(t, view)
    assert isinstance(back, torch.Tensor) and back.data_ptr() == view.ctypes.data
    with pytest.raises(TypeError, match="float32 first"):
        interop.native(torch.ones(2, dtype=torch.bfloat16), "allreduce")


@pytest.mark.parametrize("dtype", list(DTYPES))
def test_allreduce_family(rank, size, dtype):
    arrays = everyone((5, 3), dtype, size)
    op = mpidp.Sum if dtype == "int64" else mpidp.Average
    want = numpy.sum(arrays, axis=0, dtype=numpy.float64) / (1 if op is mpidp.Sum else size)
    t = tensor(arrays[rank])
    got = mpidp.allreduce(t, op=op)
    same(got, want)
    assert got.dtype == DTYPES[dtype]
    same(t, arrays[rank])  # untouched
    same(mpidp.synchronize(mpidp.allreduce_async(t, op=op)), want)
    u = tensor(arrays[rank])
    ptr = u.data_ptr()
    assert mpidp.allreduce_(u, op=op) is u and u.data_ptr() == ptr
    same(u, want)
    v = tensor(arrays[rank])
    assert mpidp.synchronize(mpidp.allreduce_async_(v, op=op)) is v
    same(v, want)
    w = tensor(numpy.asfortranarray(arrays[rank]))[:, ::2]  # a strided view of a bigger tensor, in place
    assert mpidp.allreduce_(w, op=op) is w
    same(w, want[:, ::2])


def test_tensors_that_require_grad_and_grads(rank, size):
    p = torch.nn.Parameter(torch.full((4,), float(rank)))
    got = mpidp.allreduce(p, op=mpidp.Sum)
    same(got, numpy.full(4, sum(range(size)), dtype=numpy.float64))
    (p * 2).sum().backward()
    assert mpidp.allreduce_(p.grad) is p.grad  # a gradient averaged in place, as the example does
    same(p.grad, numpy.full(4, 2.0))


def test_allgather_broadcast_alltoall_reducescatter(rank, size):
    mine = tensor(data((rank + 1, 2), "float32", rank))
    want = numpy.concatenate([data((r + 1, 2), "float32", r) for r in range(size)])
    same(mpidp.allgather(mine), want)
    same(mpidp.synchronize(mpidp.allgather_async(mine)), want)
    for root in range(size):
        b = tensor(data((3,), "float64", rank))
        same(mpidp.broadcast(b, root_rank=root), data((3,), "float64", root))
        assert mpidp.broadcast_(b, root_rank=root) is b
        same(b, data((3,), "float64", root))
    rows = tensor(numpy.arange(size * 2 * 3, dtype=numpy.float32).reshape(size * 2, 3) + 100 * rank)
    got, received = mpidp.alltoall(rows)
    want = numpy.concatenate([numpy.arange(size * 6, dtype=numpy.float32).reshape(size * 2, 3)[2 * rank:2 * rank + 2]
                              + 100 * r for r in range(size)])
    same(got, want)
    assert isinstance(received, torch.Tensor) and received.tolist() == [2] * size
    arrays = everyone((size + 1, 2), "float64", size, salt=3)
    total = numpy.sum(arrays, axis=0)
    lo = rank + (rank > 0)  # rank 0 gets two rows, the others one
    same(mpidp.reducescatter(tensor(arrays[rank]), op=mpidp.Sum), total[lo:lo + 1 + (rank == 0)])


def test_grouped(rank, size):
    arrays = everyone((4,), "float32", size), everyone((2, 2), "float64", size, salt=1)
    mine = [tensor(a[rank]) for a in arrays]
    want = [numpy.mean(a, axis=0) for a in arrays]
    for got, w in zip(mpidp.grouped_allreduce(mine), want):
        same(got, w)
    got = mpidp.synchronize(mpidp.grouped_allreduce_async_(mine))
    assert all(g is m for g, m in zip(got, mine))
    for m, w in zip(mine, want):
        same(m, w)
    gathered = mpidp.grouped_allgather([tensor(a[rank]) for a in arrays])
    for g, a in zip(gathered, arrays):
        same(g, numpy.concatenate(a))


class Exported:
    """An array of a framework mpidp has never heard of: it only speaks DLPack."""

    def __init__(self, array):
        self._array = array

    def __dlpack__(self, **kwargs):
        return self._array.__dlpack__(**kwargs)

    def __dlpack_device__(self):
        return self._array.__dlpack_device__()


def test_any_dlpack_object(rank, size):
    x = Exported(numpy.full(3, float(rank)))
    got = mpidp.allreduce(x, op=mpidp.Sum)  # no from_dlpack to go back through: NumPy
    assert isinstance(got, numpy.ndarray) and got.tolist() == [float(sum(range(size)))] * 3
    assert mpidp.allreduce_(x, op=mpidp.Sum) is x
    assert x._array.tolist() == [float(sum(range(size)))] * 3  # written in place, no copy
