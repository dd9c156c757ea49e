"""Issue 21: a repeated host allgather goes through its kept plan (the checked fields, their
fingerprint and the check's carry, made once), with the values of the general path and every
mismatch it catches, on every rank, also where some ranks take the short path and others the
general one, and where ranks gather different numbers of rows."""
import numpy
import pytest

import mpidp
from mpidp.comm import check, engine as engine_mod, runtime

from conftest import data
from test_carried_check import check_form  # noqa: F401 (a fixture: the check as an Allgather and as a MIN Allreduce)


def _plans():
    return engine_mod.engine_for(runtime.get_comm()).plans


def _rows_of(layout, r):
    room = (check.ROW - 16) // 16  # rows of two float64 that fit in the check
    return {"all fit": min(room, r + 1), "rank 0 too big": room + 1 if r == 0 else 1,
            "some empty": 0 if r % 2 else r + 1, "big": 3000 + r}[layout]


@pytest.mark.parametrize("layout", ["all fit", "rank 0 too big", "some empty", "big"])
@pytest.mark.parametrize("dtype", ["float64", "int16", "bool"])
def test_repeated_allgather_with_uneven_rows(rank, size, dtype, layout, check_form):
    for call in range(3):  # the first call makes the plan, the others use it
        parts = [data((_rows_of(layout, r), 2), dtype, 10 * call + r) for r in range(size)]
        x = parts[rank].copy()
        out = mpidp.allgather(x, name=f"g.{layout}.{dtype}")
        want = numpy.concatenate(parts)
        assert out.dtype == numpy.dtype(dtype) and out.shape == want.shape
        assert out.tobytes() == want.tobytes(), f"call {call}"
        assert x.tobytes() == parts[rank].tobytes(), "the input changed"
    assert any(key[0] == "allgather" and key[3] == f"g.{layout}.{dtype}" for key in _plans())


@pytest.mark.parametrize("shape", [(), (2, 0), (3, 2, 2)], ids=["0d", "empty rows", "3d"])
def test_repeated_allgather_of_odd_shapes_and_strided_input(rank, size, shape):
    for call in range(3):
        parts = [data(shape, "float32", 10 * call + r) for r in range(size)]
        out = mpidp.allgather(parts[rank], name=f"odd{shape}")
        want = numpy.concatenate([p.reshape((1,) if p.ndim == 0 else p.shape) for p in parts])
        assert out.shape == want.shape and out.tobytes() == want.tobytes()
    base = numpy.arange(24, dtype=numpy.float64).reshape(4, 6) + rank
    for _ in range(3):
        out = mpidp.allgather(base[:, ::2], name="strided")
        assert out.tolist() == numpy.concatenate([(base - rank + r)[:, ::2] for r in range(size)]).tolist()


def _expect_mismatch(call, field):
    with pytest.raises(mpidp.MismatchError) as info:
        call()
    assert info.value.field == field, str(info.value)
    assert 0 in info.value.ranks and 1 in info.value.ranks
    assert mpidp.allgather(numpy.ones(1), name="after").tolist() == [1.0] * mpidp.size()  # in step again


@pytest.mark.parametrize("field", ["dtype", "shape[1:]", "name", "collective"])
def test_plan_then_one_rank_changes_the_call(rank, size, field):
    if size < 2:
        pytest.skip("needs two ranks")
    for n in (2, 40):  # rows in the check, and rows after it
        a = numpy.ones((n, 2))
        for _ in range(2):
            mpidp.allgather(a, name="w")
        if rank != 1:
            call = lambda: mpidp.allgather(a, name="w")  # noqa: E731
        elif field == "dtype":
            call = lambda: mpidp.allgather(a.astype(numpy.float32), name="w")  # noqa: E731
        elif field == "shape[1:]":
            call = lambda: mpidp.allgather(numpy.ones((n, 3)), name="w")  # noqa: E731
        elif field == "name":
            call = lambda: mpidp.allgather(a, name="v")  # noqa: E731
        else:
            call = lambda: mpidp.broadcast(a, 0, name="w")  # noqa: E731
        _expect_mismatch(call, field)


def test_ranks_on_both_paths_agree_and_rows_may_change(rank, size):
    for n in (1, 40):
        mpidp.allgather(numpy.full((n, 1), rank), name="both")
        if rank % 2:
            _plans().clear()  # odd ranks forget their plans: the general path, the others the short one
        for k in range(2):
            rows = n + (k + rank) % 2  # a rank's row count may change from call to call
            got = mpidp.allgather(numpy.full((rows, 1), rank), name="both")
            assert got[:, 0].tolist() == [r for r in range(size) for _ in range(n + (k + r) % 2)]


def test_async_allgathers_through_plans_keep_their_order(rank, size):
    for _ in range(3):
        handles = [mpidp.allgather_async(numpy.full(n, float(rank * 10 + i)), name=f"a{i}")
                   for i, n in enumerate((1, 2, 40, 1))]
        for i in reversed(range(4)):
            got = mpidp.synchronize(handles[i])
            assert got.tolist() == [float(r * 10 + i) for r in range(size) for _ in range((1, 2, 40, 1)[i])]


def test_plan_with_a_joined_rank(rank, size):
    """A joined rank gives zero rows; the others gather through their plans (the check off and process
    sets: test_broadcast_plan.py)."""
    if size < 2:
        pytest.skip("needs two ranks")
    if rank == size - 1:  # a joined rank gives zero rows
        assert mpidp.join() == size - 2
        return
    for k in range(3):
        for n in (1, 40):
            got = mpidp.allgather(numpy.full(n, float(rank + k)), name="j")
            assert got.tolist() == [float(r + k) for r in range(size - 1) for _ in range(n)]
    assert mpidp.join() == size - 2


def test_same_plan_queued_several_times_async(rank, size):
    """Async calls of one plan queued behind each other: each carries its own rows in the plan's one carry."""
    for n in (3, 40):
        handles = [mpidp.allgather_async(numpy.full(n, float(10 * rank + k)), name=f"q{n}") for k in range(4)]
        for k in reversed(range(4)):
            assert mpidp.synchronize(handles[k]).tolist() == [float(10 * r + k) for r in range(size) for _ in range(n)]
