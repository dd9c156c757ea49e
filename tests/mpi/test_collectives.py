"""Every collective against a NumPy reference: dtypes x shape classes x ops x array modules."""
import numpy
import pytest

import mpidp
from mpidp.backend import asnumpy

from conftest import FLOATS, INTS, SHAPES, data, tol

ALL = FLOATS + INTS


def inputs(shape, dtype, n, salt=0, xp=numpy):
    """Every rank's input (the same function on every rank: each can compute the reference)."""
    return [data(shape, dtype, 1000 * salt + r, xp) for r in range(n)]


def close(got, want, dtype):
    got = asnumpy(got)
    assert got.dtype == numpy.dtype(dtype), (got.dtype, dtype)
    assert got.shape == want.shape, (got.shape, want.shape)
    numpy.testing.assert_allclose(got.astype(numpy.float64), want.astype(numpy.float64),
                                  rtol=tol(dtype), atol=tol(dtype))


def reference(arrays, op):
    stack = numpy.stack([a.astype(numpy.float64) for a in arrays])
    return {"Sum": stack.sum(0), "Average": stack.mean(0), "Min": stack.min(0),
            "Max": stack.max(0), "Product": stack.prod(0)}[op]


@pytest.mark.parametrize("shape", list(SHAPES), ids=list(SHAPES))
@pytest.mark.parametrize("dtype", ALL)
@pytest.mark.parametrize("op", ["Sum", "Average", "Min", "Max", "Product"])
def test_allreduce(xp, rank, size, dtype, shape, op):
    if op == "Average" and dtype in INTS:
        pytest.skip("integer Average is a TypeError (tested below)")
    if op == "Product" and shape == "large":
        pytest.skip("products of many values overflow float16; covered by the smaller shapes")
    arrays = inputs(SHAPES[shape], dtype, size)
    want = reference(arrays, op)
    x = xp.asarray(arrays[rank])
    before = asnumpy(x).copy()
    close(mpidp.allreduce(x, op=getattr(mpidp, op)), want, dtype)
    numpy.testing.assert_array_equal(asnumpy(x), before)  # allreduce leaves its input alone
    y = xp.asarray(arrays[rank]).copy()
    assert mpidp.allreduce_(y, op=getattr(mpidp, op)) is y
    close(y, want, dtype)
    close(mpidp.synchronize(mpidp.allreduce_async(x, op=getattr(mpidp, op))), want, dtype)


@pytest.mark.parametrize("dtype", ["float32", "float64", "float16"])
def test_allreduce_scaling_and_noncontiguous(xp, rank, size, dtype):
    arrays = inputs((6, 8), dtype, size)
    want = reference(arrays, "Sum") * 0.5 * 3.0
    x = xp.asarray(arrays[rank])
    close(mpidp.allreduce(x, op=mpidp.Sum, prescale_factor=0.5, postscale_factor=3.0), want, dtype)
    t = xp.asarray(numpy.asfortranarray(arrays[rank]))[:, ::2]  # neither C- nor F-contiguous
    close(mpidp.allreduce(t, op=mpidp.Sum), reference(arrays, "Sum")[:, ::2], dtype)
    mpidp.allreduce_(t, op=mpidp.Max)
    close(t, reference(arrays, "Max")[:, ::2], dtype)


@pytest.mark.parametrize("piece", [2, 64, 4096, 1 << 20])
@pytest.mark.parametrize("dtype", ["float32", "float16", "float64", "int32", "int64"])
def test_allreduce_in_pieces(rank, size, piece, dtype):
    """The ring (and in-place Allreduce pieces) give the same result whatever the piece size:
    a ragged last piece, a remainder that does not split over the ranks, fewer elements than
    ranks, and a piece smaller than one element; every rank gets bitwise the same result."""
    from mpidp.comm import _buffers
    old = _buffers.piece_bytes(), _buffers.RING_FROM
    _buffers.set_piece_bytes(piece)
    _buffers.RING_FROM = 1  # the ring for every message, however small
    # pieces of one element (piece <= itemsize) take a ring step per element: there 17 and 18 leave
    # the same remainders over 2, 3 and 4 ranks as 2345 and 2346 (5 and 6 mod 12), with several
    # pieces per part and a ragged last one, in 1/130 of the steps
    sizes = (2345, 2346) if piece > numpy.dtype(dtype).itemsize else (17, 18)
    try:
        for n in sizes + (1, 3, 0):
            arrays = inputs((n,), dtype, size, salt=n)
            got = mpidp.allreduce(arrays[rank], op=mpidp.Sum)
            close(got, reference(arrays, "Sum"), dtype)
            assert got.tobytes() == mpidp.broadcast(got, 0).tobytes()  # bitwise the same on every rank
            for op in ("Min", "Max", "Product"):
                y = arrays[rank].copy()
                assert mpidp.allreduce_(y, op=getattr(mpidp, op)) is y
                close(y, reference(arrays, op), dtype)
                assert y.tobytes() == mpidp.broadcast(y, 0).tobytes()
            if dtype.startswith("float"):  # the ring scales each part it completes; the rest after
                y = arrays[rank].copy()
                close(mpidp.allreduce_(y), reference(arrays, "Sum") / size, dtype)
                close(mpidp.allreduce(arrays[rank], postscale_factor=3.0), reference(arrays, "Sum") * 3.0 / size,
                      dtype)
                a, b = mpidp.grouped_allreduce([arrays[rank], arrays[rank][::-1].copy()])
                close(a, reference(arrays, "Sum") / size, dtype)
                close(b, reference(arrays, "Sum")[::-1] / size, dtype)
    finally:
        _buffers.set_piece_bytes(old[0])
        _buffers.RING_FROM = old[1]


def test_ring_path_is_checked(rank, size):
    """A rank whose allreduce would take another path (the ring here, MPI Allreduce there)
    raises MismatchError on every rank instead of hanging; the next allreduce works."""
    from mpidp.comm import _buffers, runtime
    if size == 1:
        pytest.skip("needs two ranks")
    topo = runtime.topology(runtime.get_comm())
    if topo is not None and topo.from_bytes is not None:  # (a simulated cluster)
        pytest.skip("on several nodes a host message takes MPI's own allreduce or the hierarchical path, "
                    "never the flat ring whose threshold this test makes differ per rank")
    old = _buffers.RING_FROM
    _buffers.RING_FROM = 1 if rank == 0 else 1 << 40  # as if rank 0 held host memory, the rest device memory
    try:
        with pytest.raises(mpidp.MismatchError, match="path"):
            mpidp.allreduce(numpy.ones(64, numpy.float32), name="grads")
    finally:
        _buffers.RING_FROM = old
    numpy.testing.assert_array_equal(mpidp.allreduce(numpy.ones(64, numpy.float32), op=mpidp.Sum),
                                     numpy.full(64, size, numpy.float32))


@pytest.mark.parametrize("dtype", ["float32", "float16", "int64"])
def test_grouped_allreduce(xp, rank, size, dtype):
    shapes = [(3,), (), (0, 2), (4, 5), (1000,)]
    per_rank = [inputs(s, dtype, size, salt=i) for i, s in enumerate(shapes)]
    mine = [xp.asarray(arrays[rank]).copy() for arrays in per_rank]
    mixed = mine + [xp.asarray(data((5,), "float64", rank))]  # a second dtype in the same call
    out = mpidp.grouped_allreduce(mixed, op=mpidp.Sum)
    for got, arrays in zip(out, per_rank):
        close(got, reference(arrays, "Sum"), dtype)
    close(out[-1], reference([data((5,), "float64", r) for r in range(size)], "Sum"), "float64")
    mpidp.grouped_allreduce_(mine, op=mpidp.Max)
    for got, arrays in zip(mine, per_rank):
        close(got, reference(arrays, "Max"), dtype)
    h = mpidp.grouped_allreduce_async([xp.asarray(a[rank]) for a in per_rank], op=mpidp.Min)
    for got, arrays in zip(mpidp.synchronize(h), per_rank):
        close(got, reference(arrays, "Min"), dtype)
    assert mpidp.grouped_allreduce([]) == []


@pytest.mark.parametrize("dtype", ALL)
@pytest.mark.parametrize("tail", [(), (3,), (2, 5)], ids=["rows", "rows3", "rows2x5"])
def test_allgather_ragged(xp, rank, size, dtype, tail):
    rows = [(r * 3 + 1) % 4 for r in range(size)]  # includes 0 rows on some ranks
    arrays = [data((rows[r],) + tail, dtype, r) for r in range(size)]
    got = mpidp.allgather(xp.asarray(arrays[rank]))
    close(got, numpy.concatenate(arrays), dtype)
    close(mpidp.synchronize(mpidp.allgather_async(xp.asarray(arrays[rank]))), numpy.concatenate(arrays), dtype)


def test_allgather_scalar_and_large(xp, rank, size):
    close(mpidp.allgather(xp.asarray(numpy.float32(rank))), numpy.arange(size, dtype=numpy.float32), "float32")
    arrays = inputs((300, 257), "float64", size)
    close(mpidp.allgather(xp.asarray(arrays[rank])), numpy.concatenate(arrays), "float64")


@pytest.mark.parametrize("shape", list(SHAPES), ids=list(SHAPES))
@pytest.mark.parametrize("dtype", ALL)
def test_broadcast(xp, rank, size, dtype, shape):
    arrays = inputs(SHAPES[shape], dtype, size)
    for root in range(size):
        x = xp.asarray(arrays[rank])
        close(mpidp.broadcast(x, root_rank=root), arrays[root], dtype)
        close(x, arrays[rank], dtype)  # untouched
        y = xp.asarray(arrays[rank]).copy()
        assert mpidp.broadcast_(y, root) is y
        close(y, arrays[root], dtype)
        close(mpidp.synchronize(mpidp.broadcast_async(x, root)), arrays[root], dtype)


@pytest.mark.parametrize("dtype", ALL)
def test_alltoall_even_and_splits(xp, rank, size, dtype):
    arrays = inputs((2 * size, 3), dtype, size)
    got, splits = mpidp.alltoall(xp.asarray(arrays[rank]))
    want = numpy.concatenate([arrays[r][2 * rank:2 * rank + 2] for r in range(size)])
    close(got, want, dtype)
    assert list(splits) == [2] * size
    # uneven: rank r sends (r + d) % 3 rows to rank d
    send = [[(r + d) % 3 for d in range(size)] for r in range(size)]
    arrays = [data((sum(send[r]), 2), dtype, 7 + r) for r in range(size)]
    h = mpidp.alltoall_async(xp.asarray(arrays[rank]), splits=send[rank])
    got, splits = mpidp.synchronize(h)
    parts = []
    for r in range(size):
        start = sum(send[r][:rank])
        parts.append(arrays[r][start:start + send[r][rank]])
    close(got, numpy.concatenate(parts), dtype)
    assert list(splits) == [send[r][rank] for r in range(size)]


@pytest.mark.parametrize("dtype", FLOATS + INTS)
@pytest.mark.parametrize("rows", [0, 1, 5, 16])
def test_reducescatter(xp, rank, size, dtype, rows):
    op = "Average" if dtype in FLOATS else "Sum"
    arrays = inputs((rows, 3), dtype, size)
    full = reference(arrays, op)
    base, extra = divmod(rows, size)
    start = rank * base + min(rank, extra)
    mine = base + (rank < extra)
    got = mpidp.reducescatter(xp.asarray(arrays[rank]), op=getattr(mpidp, op))
    close(got, full[start:start + mine], dtype)
    got = mpidp.synchronize(mpidp.reducescatter_async(xp.asarray(arrays[rank]), op=mpidp.Max))
    close(got, reference(arrays, "Max")[start:start + mine], dtype)


@pytest.mark.parametrize("piece", [4, 64, 1 << 20])
@pytest.mark.parametrize("dtype", ["float32", "float16", "float64", "int32", "int64"])
def test_reducescatter_on_the_ring(rank, size, piece, dtype):
    """reducescatter around the ring: uneven parts (the first ranks get a row more), parts of
    zero rows, pieces smaller than a part, the average and a postscale folded in."""
    from mpidp.comm import _buffers
    old = _buffers.piece_bytes(), _buffers.RING_FROM
    _buffers.set_piece_bytes(piece)
    _buffers.RING_FROM = 1
    try:
        for rows in (7 * size + 3, 2 * size, size - 1, 1):
            arrays = inputs((rows, 5), dtype, size, salt=rows)
            base, extra = divmod(rows, size)
            start, mine = rank * base + min(rank, extra), base + (rank < extra)
            for op in ("Sum", "Min", "Max"):
                got = mpidp.reducescatter(arrays[rank], op=getattr(mpidp, op))
                close(got, reference(arrays, op)[start:start + mine], dtype)
            if dtype.startswith("float"):
                got = mpidp.reducescatter(arrays[rank], postscale_factor=2.0)
                close(got, reference(arrays, "Average")[start:start + mine] * 2.0, dtype)
    finally:
        _buffers.set_piece_bytes(old[0])
        _buffers.RING_FROM = old[1]


def test_objects_and_barrier(rank, size):
    assert mpidp.broadcast_object({"rank": rank, "blob": b"x" * 1000}, root_rank=size - 1) == \
        {"rank": size - 1, "blob": b"x" * 1000}
    assert mpidp.allgather_object(("r", rank)) == [("r", r) for r in range(size)]
    mpidp.barrier()


def test_async_handles_complete_in_order(rank, size):
    handles = [mpidp.allreduce_async(numpy.full(1000, float(rank + i)), op=mpidp.Sum, name=f"t{i}")
               for i in range(20)]
    expected = [sum(r + i for r in range(size)) for i in range(20)]
    for h, e in zip(reversed(handles), reversed(expected)):  # wait out of order on purpose
        assert (mpidp.synchronize(h) == e).all()
        assert mpidp.poll(h)


def test_process_set(rank, size):
    evens = mpidp.ProcessSet(range(0, size, 2))
    assert evens.included() == (rank % 2 == 0)
    if evens.included():
        got = mpidp.allreduce(numpy.array([float(rank)]), op=mpidp.Sum, process_set=evens)
        assert got[0] == sum(range(0, size, 2))
        root = evens.ranks[-1]
        assert mpidp.broadcast(numpy.array([rank]), root_rank=root, process_set=evens)[0] == root
        assert mpidp.allgather(numpy.array([rank]), process_set=evens).tolist() == evens.ranks
    else:
        with pytest.raises(ValueError, match="not in process set"):
            mpidp.allreduce(numpy.ones(1), process_set=evens)
    # the world communicator still works after set traffic
    assert mpidp.allreduce(numpy.ones(1), op=mpidp.Sum)[0] == size


def test_runtime_queries(rank, size):
    assert mpidp.is_initialized()
    assert 0 <= mpidp.local_rank() < mpidp.local_size() <= size
    if mpidp.is_homogeneous():  # even layouts (one host, or a simulated NxR); 2+1 is not
        assert mpidp.cross_size() * mpidp.local_size() == size
    assert 0 <= mpidp.cross_rank() < mpidp.cross_size()
    places = mpidp.allgather_object((mpidp.local_rank(), mpidp.cross_rank()))
    assert len(set(places)) == size  # each rank its own (local rank, node) place
    assert mpidp.mpi_threads_supported() in (True, False)
    aware, how = mpidp.cuda_aware(verbose=True)
    assert aware in (True, False) and how


def test_recycled_results_are_never_shared(rank, size):
    """Big results borrow pooled buffers: a live result (or a view of it) keeps its own."""
    n = 1 << 17  # 512 KiB of float32: above the recycling size
    a = mpidp.allreduce(numpy.ones(n, numpy.float32), op=mpidp.Sum)
    view = a[5:10]
    del a
    b = mpidp.allreduce(numpy.full(n, 2.0, numpy.float32), op=mpidp.Sum)
    c = mpidp.synchronize(mpidp.allgather_async(numpy.full(n, 3.0, numpy.float32)))
    assert (view == size).all() and (b == 2 * size).all() and (c == 3).all()
    addresses = {view.ctypes.data - 20, b.ctypes.data, c.ctypes.data}
    assert len(addresses) == 3
