"""Collectives on JAX arrays through DLPack: JAX arrays in, JAX arrays out; in place is refused
(JAX arrays are immutable) before any communication."""
import numpy
import pytest

import mpidp

jnp = pytest.importorskip("jax.numpy", reason="JAX is not installed (pip install jax)")


def test_jax_arrays_in_and_out(rank, size):
    x = jnp.asarray(numpy.arange(6, dtype=numpy.float32).reshape(2, 3) + rank)
    want = sum(numpy.arange(6, dtype=numpy.float64).reshape(2, 3) + r for r in range(size))
    got = mpidp.allreduce(x, op=mpidp.Sum)
    assert isinstance(got, type(x)) and got.dtype == jnp.float32
    numpy.testing.assert_allclose(numpy.asarray(got), want)
    gathered = mpidp.synchronize(mpidp.allgather_async(x))
    assert isinstance(gathered, type(x)) and gathered.shape == (2 * size, 3)
    numpy.testing.assert_array_equal(numpy.asarray(gathered)[2 * rank:2 * rank + 2], numpy.asarray(x))
    for root in range(size):
        b = mpidp.broadcast(jnp.full((4,), rank, dtype=jnp.int32), root_rank=root)
        assert isinstance(b, type(x)) and numpy.asarray(b).tolist() == [root] * 4
    ints = mpidp.grouped_allreduce([x, jnp.ones(2, dtype=jnp.int32)], op=mpidp.Sum)
    assert [type(t) for t in ints] == [type(x)] * 2 and numpy.asarray(ints[1]).tolist() == [size] * 2


def test_in_place_on_a_jax_array_is_refused_on_every_rank():
    with pytest.raises(TypeError, match="read-only .JAX arrays are immutable.; use the out-of-place form"):
        mpidp.allreduce_(jnp.ones(3))
    with pytest.raises(TypeError, match="read-only"):
        mpidp.grouped_allreduce_([jnp.ones(3)])
    mpidp.barrier()  # nothing was queued by the refused calls: the ranks are still in step
