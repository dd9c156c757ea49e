"""Issue 21: a small allreduce's payload travels in its check's own message (one MPI call in all).

Values against a NumPy reference for every dtype and op around the size limit, in place and out
of place, through the general path and the cached plan; the same bits on every rank; NaN kept by
Min/Max; mismatches between a carried and an uncarried message caught on every rank; and all of
it again with the check as a MIN allreduce (the form used above ``GATHER_RANKS`` ranks).
"""
import numpy
import pytest
from mpi4py import MPI

import mpidp
from mpidp.backend import bfloat16
from mpidp.comm import check, engine as engine_mod, runtime
from mpidp.errors import MismatchError

OPS = {"Sum": numpy.add, "Average": numpy.add, "Min": numpy.minimum, "Max": numpy.maximum,
       "Product": numpy.multiply}
DTYPES = ["float32", "float64", "int32", "int64", "uint8", "bool", "complex64", "complex128"]


def _valid(dtype, op):
    kind = numpy.dtype(dtype).kind
    return not ((kind in "iub" and op == "Average") or (kind == "c" and op in ("Min", "Max")))


def _inputs(dtype, count, size, op):
    """Every rank's input (different on every rank, exact in the dtype for the reference)."""
    rng = numpy.random.default_rng(count * 31 + len(op))
    dtype = numpy.dtype(dtype)
    if dtype.kind == "b":
        return [rng.integers(0, 2, count).astype(bool) for _ in range(size)]
    low, high = (1, 3) if op == "Product" else (-8, 9) if dtype.kind != "u" else (0, 9)
    parts = [rng.integers(low, high, count).astype(numpy.float64) for _ in range(size)]
    if dtype.kind == "c":
        parts = [p + 1j * rng.integers(low, high, count) for p in parts]
    return [p.astype(dtype) for p in parts]


def _reference(parts, op, dtype):
    want = parts[0]
    for p in parts[1:]:
        want = OPS[op](want, p)
    return want / len(parts) if op == "Average" else want


def _counts(dtype):
    """Element counts just under, at and just over what the check carries."""
    item, room = numpy.dtype(dtype).itemsize, check.ROW - 8
    return sorted({1, room // item - 1, room // item, room // item + 1})


def _same_everywhere(out):
    rows = MPI.COMM_WORLD.allgather(out.tobytes())
    assert all(r == rows[0] for r in rows), "ranks got different bits"


@pytest.fixture(params=["gather", "min allreduce"])
def check_form(request):
    """Run with the check as an Allgather (up to GATHER_RANKS ranks) and as a MIN Allreduce."""
    eng = engine_mod.engine_for(runtime.get_comm())
    eng.drain()  # nothing of an earlier test may run while the check's form changes
    old = check.GATHER_RANKS
    if request.param == "min allreduce":
        check.GATHER_RANKS = 0
    eng.meeting, eng.plans = None, {}
    yield request.param
    eng.drain()
    check.GATHER_RANKS = old
    eng.meeting, eng.plans = None, {}


@pytest.mark.parametrize("inplace", [False, True], ids=["out", "in place"])
@pytest.mark.parametrize("op", list(OPS))
@pytest.mark.parametrize("dtype", DTYPES)
def test_small_allreduce_matches_numpy(rank, size, dtype, op, inplace, check_form):
    if not _valid(dtype, op):
        pytest.skip(f"{op} of {dtype} is refused (tested in test_collective_errors)")
    for count in _counts(dtype):
        parts = _inputs(dtype, count, size, op)
        want = _reference(parts, op, dtype)
        for call in range(2):  # the first call makes the plan, the second uses it
            x = parts[rank].copy()
            fn = mpidp.allreduce_ if inplace else mpidp.allreduce
            out = fn(x, op=getattr(mpidp, op), name=f"carried.{dtype}.{op}.{inplace}.{count}")
            assert out.dtype == numpy.dtype(dtype) and out.shape == (count,)
            if inplace:
                assert out is x
            else:
                assert numpy.array_equal(x, parts[rank]), "the input changed"
            if numpy.dtype(dtype).kind in "fc":
                numpy.testing.assert_allclose(out, want, rtol=1e-6, err_msg=f"{count} elements, call {call}")
            else:
                assert numpy.array_equal(out, want), f"{count} elements, call {call}: {out} != {want}"
            _same_everywhere(out)


@pytest.mark.parametrize("op", ["Min", "Max"])
def test_nan_survives_min_and_max(rank, size, op, check_form):
    x = numpy.arange(6, dtype=numpy.float32) + rank
    x[rank % 6] = numpy.nan
    out = mpidp.allreduce(x, op=getattr(mpidp, op), name=f"nan.{op}")
    want = _reference([numpy.where(numpy.arange(6) == r % 6, numpy.nan, numpy.arange(6) + r).astype(numpy.float32)
                       for r in range(size)], op, "float32")
    numpy.testing.assert_array_equal(out, want)


def test_repeated_scalar_average_with_scales(rank, size, check_form):
    for step in range(20):
        x = numpy.float64(rank + step)
        out = mpidp.allreduce(x, name="loss", postscale_factor=2.0)
        assert out == pytest.approx(2.0 * (sum(range(size)) / size + step))


def test_carried_against_uncarried_message_is_a_mismatch_everywhere(rank, size, check_form):
    """Rank 0's message fits in the check's row, the others' do not: every rank raises, none waits
    in an MPI call the others never make."""
    if size < 2:
        pytest.skip("needs two ranks")
    room = (check.ROW - 8) // 4
    x = numpy.ones(room if rank == 0 else room + 1, dtype=numpy.float32)
    with pytest.raises(MismatchError) as info:
        mpidp.allreduce(x, name="edge")
    assert info.value.field == "shape"
    out = mpidp.allreduce(numpy.full(3, rank, dtype=numpy.float32), op=mpidp.Sum, name="after")
    assert numpy.array_equal(out, numpy.full(3, sum(range(size)), dtype=numpy.float32))


def test_carried_allreduce_against_another_kind_is_a_mismatch_everywhere(rank, size, check_form):
    if size < 2:
        pytest.skip("needs two ranks")
    x = numpy.ones(4, dtype=numpy.float32)
    with pytest.raises(MismatchError) as info:
        if rank == 0:
            mpidp.allreduce(x, name="kind")
        else:
            mpidp.allgather(x, name="kind")
    assert info.value.field == "collective"


def test_async_small_allreduces_in_order(rank, size, check_form):
    handles = [mpidp.allreduce_async(numpy.full(2, rank * 10 + i, dtype=numpy.int64), op=mpidp.Sum,
                                     name=f"async.{i % 3}") for i in range(30)]
    for i, h in enumerate(handles):
        assert mpidp.synchronize(h).tolist() == [sum(r * 10 + i for r in range(size))] * 2


BCAST_DTYPES = ["float16", "float32", "float64", "int8", "bool", "complex128"] + (
    ["bfloat16"] if bfloat16 is not None else [])


@pytest.mark.parametrize("inplace", [False, True], ids=["out", "in place"])
@pytest.mark.parametrize("dtype", BCAST_DTYPES)
def test_small_broadcast_from_every_root(rank, size, dtype, inplace, check_form):
    dtype = bfloat16 if dtype == "bfloat16" else numpy.dtype(dtype)
    item = dtype.itemsize
    for count in sorted({1, (check.ROW - 8) // item, (check.ROW - 8) // item + 1}):
        for root in range(size):
            mine = (numpy.arange(count) % 7 + 10 * rank + 1).astype(dtype)  # differs on every rank
            want = (numpy.arange(count) % 7 + 10 * root + 1).astype(dtype)
            x = mine.copy()
            out = (mpidp.broadcast_ if inplace else mpidp.broadcast)(x, root, name=f"b.{count}")
            assert out.dtype == dtype and out.shape == (count,)
            assert out.tobytes() == want.tobytes(), f"{count} elements from root {root}"
            if inplace:
                assert out is x
            else:
                assert x.tobytes() == mine.tobytes(), "the input changed"


@pytest.mark.parametrize("layout", ["all fit", "rank 0 too big", "some empty"])
@pytest.mark.parametrize("dtype", ["float32", "int64", "bool"])
def test_small_allgather_with_uneven_rows(rank, size, dtype, layout, check_form):
    """Rows travel with the check where every rank's fit; else the counts did and the rows follow."""
    room = (check.ROW - 16) // (numpy.dtype(dtype).itemsize * 2)  # rows of 2 elements that fit
    def rows_of(r):
        if layout == "rank 0 too big" and r == 0:
            return room + 1
        if layout == "some empty" and r % 2:
            return 0
        return min(room, r + 1)
    parts = [(numpy.arange(rows_of(r) * 2).reshape(-1, 2) + 100 * r).astype(dtype) for r in range(size)]
    for call in range(2):
        out = mpidp.allgather(parts[rank], name=f"g.{layout}")
        want = numpy.concatenate(parts)
        assert out.dtype == numpy.dtype(dtype) and out.shape == want.shape
        assert numpy.array_equal(out, want), f"call {call}"


def test_allgather_of_scalars(rank, size, check_form):
    out = mpidp.allgather(numpy.float64(rank * 1.5), name="scalars")
    assert out.tolist() == [r * 1.5 for r in range(size)]


def test_carried_broadcast_with_another_root_is_a_mismatch_everywhere(rank, size, check_form):
    if size < 2:
        pytest.skip("needs two ranks")
    with pytest.raises(MismatchError) as info:
        mpidp.broadcast(numpy.ones(2), root_rank=rank % 2, name="roots")
    assert info.value.field == "root_rank"
