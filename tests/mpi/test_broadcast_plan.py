"""Issue 21: a repeated host broadcast goes through its kept plan (the checked fields, their
fingerprint and the root, made once), with the values of the general path and every mismatch it
catches, on every rank, also where some ranks take the short path and others the general one."""
import numpy
import pytest

import mpidp
from mpidp.backend import bfloat16
from mpidp.comm import check, collectives, engine as engine_mod, runtime

from conftest import data
from test_carried_check import check_form  # noqa: F401 (a fixture: the check as an Allgather and as a MIN Allreduce)


def _plans():
    return engine_mod.engine_for(runtime.get_comm()).plans


def _broadcast_plans():
    return [key for key in _plans() if key[0] == "broadcast"]


def _expect_mismatch(call, field):
    with pytest.raises(mpidp.MismatchError) as info:
        call()
    assert info.value.field == field, str(info.value)
    assert 0 in info.value.ranks and 1 in info.value.ranks
    assert mpidp.broadcast(numpy.arange(2.0) + mpidp.rank(), 0).tolist() == [0.0, 1.0]  # in step again


# carried in the check's row, just over it (one Bcast), and big (a recycled result)
SHAPES = {"carried": (3, 4), "over the row": ((check.ROW - 8) // 8 + 1,), "big": (300, 128), "0d": ()}


@pytest.mark.parametrize("inplace", [False, True], ids=["out", "in place"])
@pytest.mark.parametrize("dtype", ["float64", "int32", "bool", "complex64", "float16", "bfloat16"])
@pytest.mark.parametrize("shape", list(SHAPES))
def test_repeated_broadcast_from_every_root(rank, size, shape, dtype, inplace, check_form):
    dtype = bfloat16 if dtype == "bfloat16" else numpy.dtype(dtype)
    fn = mpidp.broadcast_ if inplace else mpidp.broadcast
    name = f"bp.{shape}.{dtype}.{inplace}"
    for call in range(3):  # the first call of each root makes its plan, the others use it
        for root in range(size):
            mine = data(SHAPES[shape], dtype, 10 * call + rank)  # differs on every rank and call
            x = mine.copy()
            out = fn(x, root, name=name)
            want = data(SHAPES[shape], dtype, 10 * call + root)
            assert out.shape == SHAPES[shape] and out.dtype == dtype
            assert out.tobytes() == want.tobytes(), f"call {call} from root {root}"
            if inplace:
                assert out is x
            else:
                assert x.tobytes() == mine.tobytes(), "the input changed"
    assert sum(key[4] == name for key in _broadcast_plans()) == size


def test_plan_takes_strided_input_out_of_place_and_refuses_read_only_in_place(rank, size):
    base = numpy.arange(24, dtype=numpy.float32).reshape(4, 6)
    x = base + rank
    for _ in range(3):
        out = mpidp.broadcast(x[:, ::2], 0, name="strided")
        assert out.flags.c_contiguous and out.tolist() == base[:, ::2].tolist()
    y = x[:, :3].copy()
    for _ in range(2):
        mpidp.broadcast_(y, 0, name="ro")
    y.flags.writeable = False
    with pytest.raises(ValueError, match="read-only"):
        mpidp.broadcast_(y, 0, name="ro")
    z = x[:, ::2]  # in place on a strided view: the general path writes it back
    assert mpidp.broadcast_(z, 0, name="ro") is z and z.tolist() == base[:, ::2].tolist()


@pytest.mark.parametrize("field,change", [("root_rank", lambda a, r: (a, r)), ("shape", lambda a, r: (a[:-1], 0)),
                                          ("dtype", lambda a, r: (a.astype(numpy.float32), 0)),
                                          ("name", lambda a, r: (a, 0))])
def test_plan_then_one_rank_changes_the_call(rank, size, field, change):
    if size < 2:
        pytest.skip("needs two ranks")
    for n in (3, 40):  # carried, and a Bcast after the check
        a = numpy.arange(float(n))
        for _ in range(2):
            mpidp.broadcast(a, 0, name="w")
        args = change(a, 1) if rank == 1 else (a, 0)
        name = "v" if field == "name" and rank == 1 else "w"
        _expect_mismatch(lambda: mpidp.broadcast(*args, name=name), field)


def test_plan_against_another_collective_and_a_skipped_one(rank, size):
    if size < 2:
        pytest.skip("needs two ranks")
    a = numpy.ones(3)
    for _ in range(2):
        mpidp.broadcast_(a, 0, name="w")
    _expect_mismatch(lambda: mpidp.allgather(a, name="w") if rank == 1 else mpidp.broadcast_(a, 0, name="w"),
                     "collective")
    eng = engine_mod.engine_for(runtime.get_comm())
    if rank == 1:
        eng.started()  # a collective numbered on rank 1 alone
    with pytest.raises(mpidp.MismatchError, match="sequence number differs"):
        mpidp.broadcast_(a, 0, name="w")
    if rank != 1:
        eng.started()


def test_ranks_on_both_paths_agree(rank, size):
    for n in (5, 40):
        for inplace in (False, True):
            fn = mpidp.broadcast_ if inplace else mpidp.broadcast
            fn(numpy.arange(float(n)) * rank, size - 1, name="both")
            if rank % 2:
                _plans().clear()  # odd ranks forget their plans: the general path, the others the short one
            for _ in range(2):
                assert fn(numpy.arange(float(n)) * rank, size - 1, name="both").tolist() == \
                    (numpy.arange(float(n)) * (size - 1)).tolist()


def test_async_broadcasts_through_plans_keep_their_order(rank, size):
    for _ in range(3):
        xs = [numpy.full(n, float(rank * 10 + i)) for i, n in enumerate((1, 2, 40, 1))]
        handles = [(mpidp.broadcast_async_ if i % 2 else mpidp.broadcast_async)(x, i % size, name=f"a{i}")
                   for i, x in enumerate(xs)]
        for i in reversed(range(4)):
            got = mpidp.synchronize(handles[i])
            assert got.tolist() == [float((i % size) * 10 + i)] * len(xs[i])
            if i % 2:
                assert got is xs[i]


@pytest.mark.parametrize("collective", ["broadcast", "allgather"])
def test_plans_with_the_check_off_and_on_a_process_set(rank, size, collective):
    def call(k, ps=None):  # (what this rank got, what it should get); on a set, ranks 1.. (root: job rank 1)
        members = range(1, size) if ps else range(size)
        if collective == "broadcast":
            got = mpidp.broadcast(numpy.full(3, 10 * rank + k), members[0], name="w", process_set=ps)
            return got.tolist(), [10 * members[0] + k] * 3
        got = mpidp.allgather(numpy.full(2, 10 * rank + k), name="w", process_set=ps)
        return got.tolist(), [10 * r + k for r in members for _ in range(2)]

    old = collectives.set_check(False)
    try:
        for k in range(3):  # the first call makes the plan, the others use it
            got, want = call(k)
            assert got == want
    finally:
        collectives.set_check(old)
    if size < 2:
        return
    ps = mpidp.add_process_set(list(range(1, size)))
    try:
        if rank >= 1:
            for k in range(3):
                got, want = call(k, ps)
                assert got == want
    finally:
        mpidp.remove_process_set(ps)


def test_plan_with_a_joined_rank(rank, size):
    """A joined rank carries nothing: the broadcast goes as an MPI call, through the plan on the others."""
    if size < 2:
        pytest.skip("needs two ranks")
    if rank == size - 1:
        assert mpidp.join() == size - 2
        return
    for k in range(3):
        for n in (2, 40):
            got = mpidp.broadcast(numpy.arange(float(n)) + rank + k, 0, name="j")
            assert got.tolist() == (numpy.arange(float(n)) + k).tolist()
    assert mpidp.join() == size - 2


def test_blocking_plans_behind_queued_work_and_in_a_timeline(rank, size, tmp_path):
    """A planned blocking broadcast or allgather runs in the caller's thread only while the engine is
    free: behind queued async work it waits its turn (values and order stay); a timeline records it."""
    def both():
        got = mpidp.broadcast_(numpy.full(3, float(rank)), size - 1, name="behind.b")
        assert got.tolist() == [float(size - 1)] * 3
        got = mpidp.allgather(numpy.full(2, rank), name="behind.g")
        assert got.tolist() == [r for r in range(size) for _ in range(2)]
    both()  # the plans
    for _ in range(3):
        big = mpidp.allreduce_async(numpy.full(1000, float(rank)), op=mpidp.Sum, name="queued")
        both()
        assert mpidp.synchronize(big).tolist() == [size * (size - 1) / 2] * 1000
    from mpidp import timeline
    timeline.start(str(tmp_path / f"t{rank}.json"))
    try:
        both()
    finally:
        timeline.stop()


def test_root_given_as_another_type_on_some_ranks(rank, size):
    """The plan is kept under the root as an int (1, True and numpy.int64(1) are one key, the root as the
    check sees it): odd ranks spell it otherwise, and a plan made under one spelling serves the others
    (a float is refused: test_a_root_that_is_not_an_integer_is_refused)."""
    for k in range(2):
        for root in range(size):
            for given in (root, numpy.int64(root), numpy.int32(root)) + \
                    ((bool(root),) if root < 2 else ()):
                for n in (3, 40):  # carried, and a Bcast after the check
                    got = mpidp.broadcast(numpy.arange(float(n)) + 100 * rank + k, given if rank % 2 else root,
                                          name="spelled")
                    assert got.tolist() == (numpy.arange(float(n)) + 100 * root + k).tolist()


def test_same_plan_queued_several_times_async(rank, size):
    """Async calls of one plan queued behind each other: each carries (or sends) its own payload, though
    they share the plan's views of the check's row."""
    for n in (3, 40):
        handles = [mpidp.broadcast_async(numpy.full(n, float(10 * rank + k)), size - 1, name=f"q{n}")
                   for k in range(4)]
        for k in reversed(range(4)):
            assert mpidp.synchronize(handles[k]).tolist() == [float(10 * (size - 1) + k)] * n


def test_plan_refuses_a_joined_root_on_every_rank(rank, size):
    if size < 2:
        pytest.skip("needs two ranks")
    for _ in range(2):
        mpidp.broadcast(numpy.zeros(3), size - 1, name="jr")
    with pytest.raises(mpidp.MpidpError, match="root rank .* has joined"):
        mpidp.join() if rank == size - 1 else mpidp.broadcast(numpy.zeros(3), size - 1, name="jr")
    assert mpidp.allgather(numpy.array([rank]), name="after jr").tolist() == list(range(size))


@pytest.mark.parametrize("root", [1.0, 1.7, "1", None], ids=["1.0", "1.7", "'1'", "None"])
def test_a_root_that_is_not_an_integer_is_refused(rank, size, root):
    """Before any communication, on every rank that passes it (1.7 and "1" were rank 1, through the
    plan of 1 too); numpy integers and bools stay integers."""
    x = numpy.arange(3.0)
    mpidp.broadcast(x, 0, name="w")  # the plan of root 0, for the short path to refuse 1.0 too
    for call in (lambda: mpidp.broadcast(x, root, name="w"), lambda: mpidp.broadcast_(x.copy(), root, name="w"),
                 lambda: mpidp.broadcast_object("o", root_rank=root)):
        with pytest.raises(TypeError, match="root_rank must be an integer"):
            call()
    assert mpidp.broadcast(x + rank, numpy.int64(0), name="w").tolist() == x.tolist()
    assert mpidp.broadcast(x + rank, False, name="w").tolist() == x.tolist()
    assert mpidp.broadcast_object(rank, root_rank=numpy.int32(size - 1)) == size - 1
