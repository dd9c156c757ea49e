"""Every listed dtype with every op, on every path, against NumPy; NaN in, NaN out for Min and Max.

bool: Sum and Max are logical or, Min and Product logical and; Average is a TypeError.
complex: Sum, Average, Product; Min and Max are a TypeError. Integers: Average is a TypeError.
Each TypeError comes before any communication (only rank 0 makes the call, the others go on).
"""
import numpy
import pytest

import mpidp
from mpidp.backend import bfloat16
from mpidp.comm import _buffers

DTYPES = (["bool", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64",
           "float16", "float32", "float64", "complex64", "complex128"] + (["bfloat16"] if bfloat16 else []))
OPS = ["Sum", "Average", "Min", "Max", "Product"]
REFUSED = {("bool", "Average"), ("complex64", "Min"), ("complex64", "Max"), ("complex128", "Min"),
           ("complex128", "Max")}
FLOATS = ["float16", "float32", "float64"] + (["bfloat16"] if bfloat16 else [])


def dtype_of(name):
    return bfloat16 if name == "bfloat16" else numpy.dtype(name)


def refused(dtype, op):
    kind = numpy.dtype(dtype_of(dtype)).kind
    return (dtype, op) in REFUSED or (op == "Average" and kind in "iu")


def values(dtype, op, rank, n):
    """This rank's data: exact in the dtype for any op over 4 ranks (no overflow, no rounding)."""
    rng = numpy.random.default_rng(1000 + rank)
    dt = dtype_of(dtype)
    if dtype == "bool":
        return rng.integers(0, 2, n).astype(bool)
    lo, hi = (1, 3) if op == "Product" else (0, 4) if numpy.dtype(dt).kind == "u" else (-3, 4)
    a = rng.integers(lo, hi, n).astype(numpy.float64)
    if numpy.dtype(dt).kind == "c":
        a = a + 1j * rng.integers(lo, hi, n)
    return a.astype(dt)


def reference(dtype, op, size, n):
    parts = [values(dtype, op, r, n).astype(numpy.complex128 if "complex" in dtype else numpy.float64)
             for r in range(size)]
    if dtype == "bool":
        parts = [p.astype(bool) for p in parts]
        fn = {"Sum": numpy.logical_or, "Max": numpy.logical_or, "Min": numpy.logical_and,
              "Product": numpy.logical_and}[op]
    else:
        fn = {"Sum": numpy.add, "Average": numpy.add, "Min": numpy.minimum, "Max": numpy.maximum,
              "Product": numpy.multiply}[op]
    out = parts[0]
    for p in parts[1:]:
        out = fn(out, p)
    return out / size if op == "Average" else out


@pytest.fixture(params=["mpi", "ring"])
def path(request, monkeypatch):
    """The ring for every float/int message (RING_FROM=1), or MPI Allreduce calls only."""
    monkeypatch.setattr(_buffers, "RING_FROM", 1 if request.param == "ring" else 1 << 62)
    return request.param


def check(got, want, dtype):
    """Exact, but for an Average's division (rounded in the dtype)."""
    got = numpy.asarray(got)
    assert got.dtype == dtype_of(dtype)
    rtol = 1e-2 if dtype == "bfloat16" else 8 * numpy.finfo(got.dtype).eps if got.dtype.kind in "fc" else 0
    numpy.testing.assert_allclose(got.astype(want.dtype), want, rtol=rtol, atol=0)


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_allreduce(rank, size, dtype, op, path):
    n = 1031
    x = values(dtype, op, rank, n)
    if refused(dtype, op):
        if rank == 0:  # alone: an error after any communication would leave rank 0 waiting
            with pytest.raises(TypeError, match=dtype if dtype != "bfloat16" else "bfloat16"):
                mpidp.allreduce(x, op=getattr(mpidp, op))
        assert mpidp.allreduce(numpy.ones(2), op=mpidp.Sum)[0] == size
        return
    want = reference(dtype, op, size, n)
    check(mpidp.allreduce(x, op=getattr(mpidp, op), name=f"{dtype}.{op}"), want, dtype)
    y = x.copy()
    mpidp.allreduce_(y, op=getattr(mpidp, op))
    check(y, want, dtype)
    a, b = mpidp.grouped_allreduce([x, x[:5]], op=getattr(mpidp, op))
    check(a, want, dtype)
    check(b, want[:5], dtype)


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_reducescatter(rank, size, dtype, op, path):
    n = 4 * size + 1
    x = values(dtype, op, rank, n * 3).reshape(n, 3)
    if refused(dtype, op):
        if rank == 0:
            with pytest.raises(TypeError):
                mpidp.reducescatter(x, op=getattr(mpidp, op))
        assert mpidp.allreduce(numpy.ones(2), op=mpidp.Sum)[0] == size
        return
    want = reference(dtype, op, size, n * 3).reshape(n, 3)
    base, extra = divmod(n, size)
    lo = rank * base + min(rank, extra)
    check(mpidp.reducescatter(x, op=getattr(mpidp, op)), want[lo:lo + base + (rank < extra)], dtype)


@pytest.mark.parametrize("op", ["Min", "Max"])
@pytest.mark.parametrize("n", [1, 7, 1031, 70000])
@pytest.mark.parametrize("dtype", FLOATS)
def test_nan_in_nan_out(rank, size, dtype, op, n, path):
    """A NaN on any one rank at any position comes out as NaN on every rank, as numpy.maximum/minimum."""
    dt = dtype_of(dtype)
    parts = []
    for r in range(size):
        a = values(dtype, "Sum", r, n)
        a[r % n] = numpy.nan            # each rank its own position
        a[(r * 7 + 3) % n] = numpy.nan  # and one more
        parts.append(a)
    fn = numpy.maximum if op == "Max" else numpy.minimum
    want = parts[0].astype(numpy.float64)
    for p in parts[1:]:
        want = fn(want, p.astype(numpy.float64))
    got = mpidp.allreduce(parts[rank], op=getattr(mpidp, op))
    assert numpy.isnan(got.astype(numpy.float64)).sum() == numpy.isnan(want).sum() > 0
    numpy.testing.assert_array_equal(got.astype(numpy.float64), want)
    y = parts[rank].copy()
    mpidp.allreduce_(y, op=getattr(mpidp, op))
    numpy.testing.assert_array_equal(y.astype(numpy.float64), want)
    assert y.dtype == dt
