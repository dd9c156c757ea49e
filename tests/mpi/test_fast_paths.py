"""Issue 21: the short paths (a repeated allreduce through its cached plan, grouped calls packed in one
copy) give the values of the general path and catch every mismatch it catches, on every rank, also
where some ranks take the short path and others the general one."""
import numpy
import pytest

import mpidp
from mpidp.comm import check, collectives, engine as engine_mod, runtime

from conftest import data, tol

OPS = [("Sum", numpy.add), ("Average", numpy.add), ("Min", numpy.minimum), ("Max", numpy.maximum),
       ("Product", numpy.multiply)]


def _plans():
    return engine_mod.engine_for(runtime.get_comm()).plans


def _reference(shape, dtype, op, ufunc, size, seed=3):
    parts = [data(shape, dtype, seed + r) for r in range(size)]
    want = parts[0].astype(numpy.float64)
    for p in parts[1:]:
        want = ufunc(want, p.astype(numpy.float64))
    return parts, want / size if op == "Average" else want


@pytest.mark.parametrize("inplace", [False, True], ids=["out", "in place"])
@pytest.mark.parametrize("dtype", ["float32", "float64", "int32", "float16"])
@pytest.mark.parametrize("op,ufunc", OPS, ids=[o for o, _ in OPS])
@pytest.mark.parametrize("shape", [(), (5,), (3, 4)], ids=["0d", "1d", "2d"])
def test_repeated_allreduce_matches_numpy(rank, size, shape, dtype, op, ufunc, inplace):
    if dtype == "int32" and op == "Average":
        pytest.skip("an integer average is refused (tested in test_collective_errors)")
    if op == "Product":  # small integers to the power of the ranks stay exact
        ufunc = numpy.multiply
    parts, want = _reference(shape, dtype, op, ufunc, size)
    name = f"fast.{dtype}.{op}.{inplace}.{len(shape)}"
    for _ in range(3):  # the first call makes the plan, the others use it
        x = parts[rank].copy()
        out = (mpidp.allreduce_ if inplace else mpidp.allreduce)(x, op=getattr(mpidp, op), name=name)
        assert out.shape == shape and out.dtype == numpy.dtype(dtype)
        if inplace:
            assert out is x
        else:
            assert numpy.array_equal(x, parts[rank])  # the input is untouched
        numpy.testing.assert_allclose(out.astype(numpy.float64), want, rtol=tol(dtype) * 4)


def test_plan_is_kept_and_used(size):
    x = numpy.arange(4, dtype=numpy.float32)
    mpidp.allreduce(x, op=mpidp.Sum, name="kept")
    topo = runtime.topology(runtime.get_comm())
    hierarchical = topo is not None and topo.uses(x)  # (MPIDP_HIERARCHICAL=on on many nodes: no plan)
    assert any(key[3] == "kept" for key in _plans()) != hierarchical
    for _ in range(3):
        assert mpidp.allreduce(x, op=mpidp.Sum, name="kept").tolist() == (x * size).tolist()


def test_non_contiguous_and_read_only_inputs_take_the_general_path(size):
    x = numpy.arange(12, dtype=numpy.float64).reshape(3, 4)
    mpidp.allreduce(numpy.ascontiguousarray(x[:, ::2]), op=mpidp.Sum, name="nc")  # plan for (3, 2)
    out = mpidp.allreduce(x[:, ::2], op=mpidp.Sum, name="nc")
    assert out.flags.c_contiguous and out.tolist() == (x[:, ::2] * size).tolist()
    ro = numpy.ones(3)
    mpidp.allreduce_(ro.copy(), op=mpidp.Sum, name="ro")  # plan for a writable (3,)
    ro.flags.writeable = False
    with pytest.raises(ValueError, match="read-only"):
        mpidp.allreduce_(ro, op=mpidp.Sum, name="ro")


def _expect_mismatch(call, field):
    with pytest.raises(mpidp.MismatchError) as info:
        call()
    assert info.value.field == field, str(info.value)
    assert 0 in info.value.ranks and 1 in info.value.ranks
    assert mpidp.allreduce(numpy.ones(2), op=mpidp.Sum).tolist() == [mpidp.size()] * 2


def test_fast_against_general_path_mismatch_raises_everywhere(rank, size):
    if size < 2:
        pytest.skip("needs two ranks")
    for _ in range(2):
        mpidp.allreduce(numpy.ones(3), op=mpidp.Sum, name="w")  # every rank has the (3,) plan
    # rank 1: a shape it never used (general path); the others: the cached plan
    _expect_mismatch(lambda: mpidp.allreduce(numpy.ones(4 if rank == 1 else 3), op=mpidp.Sum, name="w"),
                     "shape")


def test_fast_against_fast_mismatch_raises_everywhere(rank, size):
    if size < 2:
        pytest.skip("needs two ranks")
    for _ in range(2):  # every rank has all four plans
        for dtype in ("float32", "float64"):
            for op in (mpidp.Max, mpidp.Min):
                mpidp.allreduce_(numpy.ones(3, dtype), op=op, name="w")
    _expect_mismatch(lambda: mpidp.allreduce_(numpy.ones(3, "float64" if rank == 1 else "float32"),
                                              op=mpidp.Max, name="w"), "dtype")
    _expect_mismatch(lambda: mpidp.allreduce_(numpy.ones(3), op=mpidp.Max if rank == 1 else mpidp.Min,
                                              name="w"), "op")


def test_fast_path_against_another_collective_raises_everywhere(rank, size):
    if size < 2:
        pytest.skip("needs two ranks")
    for _ in range(2):
        mpidp.allreduce(numpy.ones(3), op=mpidp.Sum, name="w")
    _expect_mismatch(lambda: (mpidp.allgather if rank == 1 else
                              lambda x, name: mpidp.allreduce(x, op=mpidp.Sum, name=name))(numpy.ones(3), name="w"),
                     "collective")


def test_fast_path_skipped_collective_is_a_sequence_mismatch(rank, size):
    if size < 2:
        pytest.skip("needs two ranks")
    for _ in range(2):
        mpidp.allreduce(numpy.ones(3), op=mpidp.Sum, name="w")
    eng = engine_mod.engine_for(runtime.get_comm())
    if rank == 1:  # a collective numbered on rank 1 alone (one it started that the others skipped)
        eng.started()
    with pytest.raises(mpidp.MismatchError, match="sequence number differs") as info:
        mpidp.allreduce(numpy.ones(3), op=mpidp.Sum, name="w")  # the short path on every rank
    assert info.value.tensor == "w" and 0 in info.value.ranks and 1 in info.value.ranks
    if rank != 1:  # back in step
        eng.started()
    assert mpidp.allreduce(numpy.ones(3), op=mpidp.Sum, name="w").tolist() == [size] * 3


def test_ranks_on_both_paths_agree_on_the_same_call(rank, size):
    x = numpy.full(6, rank + 1.0, numpy.float32)
    want = numpy.full(6, size * (size + 1) / 2, numpy.float32)
    for inplace in (False, True):
        fn = mpidp.allreduce_ if inplace else mpidp.allreduce
        fn(x.copy(), op=mpidp.Sum, name="both")
        if rank % 2:
            _plans().clear()  # odd ranks forget the plan: they take the general path, the others the short one
        assert fn(x.copy(), op=mpidp.Sum, name="both").tolist() == want.tolist()
        assert fn(x.copy(), op=mpidp.Sum, name="both").tolist() == want.tolist()


def test_check_off_and_piece_size_change(size):
    from mpidp.comm import _buffers
    x = numpy.ones(64, numpy.float32)
    old = collectives.set_check(False)
    try:
        for _ in range(3):
            assert mpidp.allreduce(x, op=mpidp.Sum, name="nochk").tolist() == [size] * 64
    finally:
        collectives.set_check(old)
    try:
        _buffers.set_piece_bytes(64)  # 16 elements per in-place call: pieces, not one call
        for _ in range(3):
            y = x.copy()
            assert mpidp.allreduce_(y, op=mpidp.Sum, name="pieces").tolist() == [size] * 64
    finally:
        _buffers.set_piece_bytes(0)
    assert not any(key[3] == "pieces" for key in _plans())


@pytest.mark.parametrize("alone", [None, 16], ids=["fused", "big ones alone"])
@pytest.mark.parametrize("inplace", [False, True], ids=["out", "in place"])
def test_grouped_mixed_dtypes_shapes_and_layouts(rank, size, inplace, alone, monkeypatch):
    """Every tensor fused per dtype, or (ALONE_BYTES lowered) every tensor of 16 bytes or more
    reduced by itself: in the caller's tensor where it is contiguous, via a copy where not."""
    if alone:
        monkeypatch.setattr(collectives, "ALONE_BYTES", alone)
    shapes = [(3, 4), (), (0,), (5,), (2, 3, 2), (7,)]
    dtypes = ["float32", "float64", "float32", "float16", "float64", "float32"]
    base = [data(s, d, 10 + i + 100 * rank) for i, (s, d) in enumerate(zip(shapes, dtypes))]
    base[0] = numpy.asfortranarray(base[0])  # not C-contiguous
    for _ in range(2):
        ins = [b.copy(order="K") for b in base]
        ins[5] = numpy.repeat(base[5], 2)[::2]  # a strided view
        out = (mpidp.grouped_allreduce_ if inplace else mpidp.grouped_allreduce)(ins, op=mpidp.Average,
                                                                                   name="g")
        for i, (s, d) in enumerate(zip(shapes, dtypes)):
            parts = [data(s, d, 10 + i + 100 * r).astype(numpy.float64) for r in range(size)]
            want = sum(parts) / size
            assert out[i].shape == s and out[i].dtype == numpy.dtype(d)
            if inplace:
                assert out[i] is ins[i]
            numpy.testing.assert_allclose(out[i].astype(numpy.float64), want, rtol=tol(d) * 4, atol=tol(d))


@pytest.mark.parametrize("inplace", [False, True], ids=["out", "in place"])
def test_grouped_big_tensor_at_the_real_threshold(rank, size, inplace):
    """A tensor of ALONE_BYTES goes by itself (the ring, at this size), its neighbours fused."""
    shapes = [(5,), (collectives.ALONE_BYTES // 4,), (3, 3)]
    ins = [data(s, "float32", 7 + i + 100 * rank) for i, s in enumerate(shapes)]
    before = [x.copy() for x in ins]
    out = (mpidp.grouped_allreduce_ if inplace else mpidp.grouped_allreduce)(ins, op=mpidp.Sum, name="big")
    for i, s in enumerate(shapes):
        want = sum(data(s, "float32", 7 + i + 100 * r).astype(numpy.float64) for r in range(size))
        numpy.testing.assert_allclose(out[i], want, rtol=1e-5)
        assert (out[i] is ins[i]) == inplace
        if not inplace:
            assert numpy.array_equal(ins[i], before[i]), "the input changed"


def test_grouped_read_only_names_the_tensor():
    ts = [numpy.ones(3), numpy.ones(2), numpy.ones(4)]
    ts[1].flags.writeable = False
    with pytest.raises(ValueError, match=r"g\[1\]"):
        mpidp.grouped_allreduce_(ts, op=mpidp.Sum, name="g")
    with pytest.raises(TypeError, match=r"g\[2\]"):
        mpidp.grouped_allreduce([numpy.ones(3), numpy.ones(2), numpy.array(["a"])], op=mpidp.Sum, name="g")
    with pytest.raises(TypeError, match=r"g\[1\].*integer"):
        mpidp.grouped_allreduce([numpy.ones(3), numpy.ones(2, numpy.int32)], op=mpidp.Average, name="g")


def test_grouped_lists_and_scalars(size):
    out = mpidp.grouped_allreduce([[1.0, 2.0], 3.0, numpy.ones(2)], op=mpidp.Sum, name="lists")
    assert [o.tolist() for o in out] == [[size, 2.0 * size], 3.0 * size, [size, size]]


def test_repeated_async_allreduces_keep_their_order_and_values(rank, size):
    xs = [numpy.full(4, rank + i, numpy.float64) for i in range(5)]
    for _ in range(3):  # plans on the first round, the short path on the others
        handles = [mpidp.allreduce_async(x, op=mpidp.Sum, name="a") if i % 2 else
                   mpidp.allreduce_async_(x.copy(), op=mpidp.Average, name="b") for i, x in enumerate(xs)]
        for i in reversed(range(5)):  # waited for out of order
            got = mpidp.synchronize(handles[i])
            total = sum(r + i for r in range(size))
            assert got.tolist() == [total if i % 2 else total / size] * 4


def test_async_fast_path_mismatch_raises_everywhere(rank, size):
    if size < 2:
        pytest.skip("needs two ranks")
    for _ in range(2):
        mpidp.synchronize(mpidp.allreduce_async(numpy.ones(3), op=mpidp.Sum, name="w"))
    h = mpidp.allreduce_async(numpy.ones(3), op=mpidp.Sum if rank == 1 else mpidp.Max, name="w")
    _expect_mismatch(lambda: mpidp.synchronize(h), "op")


@pytest.mark.parametrize("inplace", [False, True], ids=["out", "in place"])
def test_blocking_short_path_behind_queued_work_and_in_a_timeline(rank, size, inplace, tmp_path):
    """A planned blocking allreduce runs in the caller's thread only while the engine is free: behind
    queued async work it waits its turn (values and order stay), and a timeline records it."""
    fn = mpidp.allreduce_ if inplace else mpidp.allreduce
    small = numpy.full(3, rank + 1.0, numpy.float32)
    fn(small.copy(), op=mpidp.Sum, name="behind")  # the plan
    total = size * (size + 1) / 2
    for _ in range(3):
        big = mpidp.allreduce_async(numpy.full(1000, float(rank)), op=mpidp.Sum, name="queued")
        got = fn(small.copy(), op=mpidp.Sum, name="behind")
        assert got.tolist() == [total] * 3
        assert mpidp.synchronize(big).tolist() == [size * (size - 1) / 2] * 1000
    from mpidp import timeline
    timeline.start(str(tmp_path / f"t{rank}.json"))
    try:
        assert fn(small.copy(), op=mpidp.Sum, name="behind").tolist() == [total] * 3
    finally:
        timeline.stop()


@pytest.mark.parametrize("field", ["tensors", "op", "postscale_factor"])
def test_grouped_plan_then_one_rank_changes_the_call(rank, size, field):
    """A grouped call repeated through its kept plan, then changed on rank 1 only (a shape, the op, a
    factor): MismatchError on every rank, naming the field; the next collective works."""
    if size < 2:
        pytest.skip("needs two ranks")
    xs = [numpy.full(s, rank + 1.0, numpy.float32) for s in [(4,), (2, 3), ()]]
    for _ in range(3):
        out = mpidp.grouped_allreduce(xs, op=mpidp.Sum, name=f"gp.{field}")
        assert [o.tolist() for o in out] == [numpy.full(x.shape, size * (size + 1) / 2).tolist() for x in xs]
    kwargs = {"op": mpidp.Sum}
    if rank == 1:
        if field == "tensors":
            xs[1] = numpy.ones((3, 2), numpy.float32)
        elif field == "op":
            kwargs["op"] = mpidp.Max
        else:
            kwargs["postscale_factor"] = 2.0
    _expect_mismatch(lambda: mpidp.grouped_allreduce(xs, name=f"gp.{field}", **kwargs), field)


def test_grouped_plan_then_a_read_only_tensor_is_refused_before_any_communication(rank, size):
    xs = [numpy.ones(3), numpy.ones(2)]
    for _ in range(2):
        mpidp.grouped_allreduce_(xs, op=mpidp.Sum, name="gro")
    xs[1].flags.writeable = False
    with pytest.raises(ValueError, match=r"gro\[1\]"):
        mpidp.grouped_allreduce_(xs, op=mpidp.Sum, name="gro")
    assert mpidp.allreduce(numpy.ones(2), op=mpidp.Sum).tolist() == [size] * 2  # nothing was started


def test_equal_factors_written_differently_agree_across_paths(rank, size):
    """A factor of 1 (an int) and of 1.0 are one value: a plan made from the int and a rank on the
    general path with the float checked them as different texts (a spurious MismatchError)."""
    base = numpy.arange(8, dtype=numpy.float64) + rank
    want = (numpy.arange(8) * size + size * (size - 1) / 2) * 2
    for _ in range(2):
        numpy.testing.assert_allclose(mpidp.allreduce(base[::2].copy(), op=mpidp.Sum, name="f", postscale_factor=2),
                                      want[::2])
    x = base[::2] if rank == 0 else base[::2].copy()  # rank 0: not contiguous, the general path
    if rank == 0:
        check._known.clear()  # (a fingerprint from the texts, not from a cache that equal values share)
    numpy.testing.assert_allclose(mpidp.allreduce(x, op=mpidp.Sum, name="f", postscale_factor=numpy.float64(2.0)),
                                  want[::2])


@pytest.mark.parametrize("inplace", [False, True], ids=["out", "in place"])
def test_an_empty_allreduce_on_both_paths(rank, size, inplace):
    """An empty array: the general path makes no MPI call after the check, the plan made an Allreduce of
    0 elements, so a rank without the plan (another call of that signature not yet made, or its plans
    cleared) and ranks with it parted, and the job hung in the torture test."""
    fn = mpidp.allreduce_ if inplace else mpidp.allreduce
    fn(numpy.empty(0), op=mpidp.Sum, name="empty")  # a plan, where one is kept
    if rank % 2:
        _plans().clear()  # odd ranks: the general path
    for _ in range(2):
        assert fn(numpy.empty(0), op=mpidp.Sum, name="empty").shape == (0,)
        assert mpidp.allreduce(numpy.ones(2), op=mpidp.Sum, name="after").tolist() == [size] * 2


def test_a_plan_follows_the_ring_threshold(rank, size, monkeypatch):
    """A plan made on the plain MPI path, then the ring's threshold lowered (tests do): a rank without
    the plan chose the ring and a rank with it MPI, a MismatchError on a call both made alike."""
    if size < 2:
        pytest.skip("needs two ranks")
    from mpidp.comm import _buffers
    x = numpy.arange(6.0)
    mpidp.allreduce(x, op=mpidp.Sum, name="ringed")  # the plan, on the plain MPI path
    if rank % 2:
        _plans().clear()
    monkeypatch.setattr(_buffers, "RING_FROM", 1)
    for _ in range(2):
        assert mpidp.allreduce(x, op=mpidp.Sum, name="ringed").tolist() == (x * size).tolist()
