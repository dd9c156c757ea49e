"""Bad input raises before any communication; ranks that disagree all raise MismatchError."""
import numpy
import pytest

import mpidp


def test_bad_input_is_local(rank, size):
    with pytest.raises(TypeError, match="dtype"):
        mpidp.allreduce(numpy.array(["a", "b"]))
    with pytest.raises(TypeError, match="dtype"):
        mpidp.allgather(numpy.array([object(), 1], dtype=object))
    with pytest.raises(TypeError, match="needs a NumPy or CuPy array"):
        mpidp.broadcast({"a": 1}, 0)
    with pytest.raises(ValueError, match="outside the communicator"):
        mpidp.broadcast(numpy.ones(2), root_rank=size)
    with pytest.raises(ValueError, match="outside the communicator"):
        mpidp.broadcast_object(1, root_rank=-1)
    with pytest.raises(TypeError, match="integer average"):
        mpidp.allreduce(numpy.ones(2, dtype=numpy.int32))
    with pytest.raises(ValueError, match="unknown reduction op"):
        mpidp.allreduce(numpy.ones(2), op="median")
    with pytest.raises(ValueError, match="splits"):
        mpidp.alltoall(numpy.ones(size + 1), splits=[1] * size)
    with pytest.raises(ValueError, match="0-d"):
        mpidp.reducescatter(numpy.float64(1.0))
    # the communicator is still in step on every rank
    assert mpidp.allreduce(numpy.ones(1), op=mpidp.Sum)[0] == size


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("field, call", [
    ("shape", lambda r: mpidp.allreduce(numpy.ones(3 + (r == 1)), name="w1")),
    ("dtype", lambda r: mpidp.allreduce(numpy.ones(3, dtype="f4" if r == 1 else "f8"), name="w1")),
    ("op", lambda r: mpidp.allreduce(numpy.ones(3), op=mpidp.Max if r == 1 else mpidp.Sum, name="w1")),
    ("root_rank", lambda r: mpidp.broadcast(numpy.ones(3), root_rank=int(r == 1), name="w1")),
    ("shape[1:]", lambda r: mpidp.allgather(numpy.ones((2, 2 + (r == 1))), name="w1")),
    ("tensors", lambda r: mpidp.grouped_allreduce([numpy.ones(2), numpy.ones(1 + (r == 1))], name="w1")),
    ("shape", lambda r: mpidp.reducescatter(numpy.ones((4, 1 + (r == 1))), name="w1")),
    ("dtype", lambda r: mpidp.alltoall(numpy.ones(mpidp.size(), dtype="i4" if r == 1 else "i8"), name="w1")),
])
def test_mismatch_raises_everywhere(rank, size, field, call):
    with pytest.raises(mpidp.MismatchError) as info:
        call(rank)
    err = info.value
    assert err.field == field and err.tensor == "w1"
    assert "rank 1 has" in str(err) and "w1" in str(err)
    assert 1 in err.ranks and 0 in err.ranks
    # and nothing is left half-done: the next collective is correct
    assert mpidp.allreduce(numpy.ones(2), op=mpidp.Sum).tolist() == [size, size]


@pytest.mark.mpi(min_size=2)
def test_mismatch_from_async_is_raised_at_synchronize(rank, size):
    h = mpidp.allreduce_async(numpy.ones(2 + (rank == 1)), name="late")
    with pytest.raises(mpidp.MismatchError, match="late"):
        mpidp.synchronize(h)
    assert mpidp.allreduce(numpy.ones(1), op=mpidp.Sum)[0] == size
