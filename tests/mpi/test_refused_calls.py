"""A call refused before any communication (bad dtype or op, read-only output) did nothing: it
takes no collective number, so a rank that catches the error and goes on still pairs its next
collective with the other ranks' (no bogus 'sequence number differs')."""
import numpy
import pytest

import mpidp


@pytest.mark.parametrize("refuse", ["complex_max", "read_only", "bad_type"])
def test_a_call_refused_on_one_rank_takes_no_number(rank, size, refuse):
    if rank == 0:
        x = numpy.ones(3, numpy.complex64) if refuse == "complex_max" else numpy.ones(3)
        if refuse == "read_only":
            x.setflags(write=False)
        with pytest.raises((TypeError, ValueError)):
            if refuse == "complex_max":
                mpidp.allreduce(x, op=mpidp.Max)
            elif refuse == "read_only":
                mpidp.allreduce_(x, op=mpidp.Sum)
            else:
                mpidp.allreduce("not an array", op=mpidp.Sum)
    got = mpidp.allreduce(numpy.full(3, rank + 1.0), op=mpidp.Sum)  # auto-named: equal numbers needed
    numpy.testing.assert_allclose(got, numpy.full(3, size * (size + 1) / 2))


def test_a_refused_retry_pairs_with_the_others_call(rank, size):
    x = numpy.full(4, rank + 1.0)
    if rank == 0:
        x.setflags(write=False)
        with pytest.raises(ValueError, match="read-only"):
            mpidp.allreduce_(x, op=mpidp.Sum, name="retried")
        x = x.copy()
    mpidp.allreduce_(x, op=mpidp.Sum, name="retried")
    numpy.testing.assert_allclose(x, numpy.full(4, size * (size + 1) / 2))


@pytest.mark.parametrize("call", ["allreduce", "allreduce_", "allreduce_async", "grouped_allreduce"])
@pytest.mark.parametrize("bad", ["name", "op", "prescale_factor", "postscale_factor"])
def test_an_unhashable_argument_is_a_clear_error_that_takes_no_number(rank, size, call, bad):
    """A name, op or factor of the wrong type (a list, an array) was a bare "unhashable type" from
    the plan cache's lookup; it is refused with what was wrong, before any communication."""
    x = numpy.full(3, rank + 1.0)
    kwargs = {"op": mpidp.Sum, "name": "fine"}
    kwargs[bad] = {"name": ["loss"], "op": ["sum"], "prescale_factor": numpy.array([2.0]),
                   "postscale_factor": [0.5]}[bad]
    fn = getattr(mpidp, call)
    with pytest.raises((TypeError, ValueError), match=bad.replace("_factor", "") if bad != "op" else "op"):
        for _ in range(2):  # the second call would find a plan
            fn([x] if call.startswith("grouped") else x, **kwargs)
    got = mpidp.allreduce(numpy.full(3, rank + 1.0), op=mpidp.Sum)
    numpy.testing.assert_allclose(got, numpy.full(3, size * (size + 1) / 2))


@pytest.mark.parametrize("call", ["allreduce_", "grouped_allreduce_ fused", "grouped_allreduce_ alone"])
def test_a_mismatched_in_place_call_leaves_the_tensor_as_it_was(rank, size, call, monkeypatch):
    """An in-place call with a prescale factor that raises MismatchError (here one rank names its
    tensor differently) leaves the caller's array untouched: it was scaled before the check."""
    if size < 2:
        pytest.skip("needs two ranks")
    from mpidp.comm import collectives
    if call.endswith("alone"):
        monkeypatch.setattr(collectives, "ALONE_BYTES", 8)
    x = numpy.arange(4, dtype=numpy.float64) + rank
    before = x.copy()
    name = "mine" if rank == 1 else "theirs"
    with pytest.raises(mpidp.MismatchError):
        if call == "allreduce_":
            mpidp.allreduce_(x, op=mpidp.Sum, name=name, prescale_factor=2.0)
        else:
            mpidp.grouped_allreduce_([x], op=mpidp.Sum, name=name, prescale_factor=2.0)
    numpy.testing.assert_array_equal(x, before)
    got = mpidp.allreduce(numpy.full(3, rank + 1.0), op=mpidp.Sum)
    numpy.testing.assert_allclose(got, numpy.full(3, size * (size + 1) / 2))


@pytest.mark.parametrize("call", ["allreduce", "grouped_allreduce"])
def test_a_factor_of_the_wrong_type_is_refused_on_the_short_path_too(rank, size, call):
    """A Decimal equals the float of a kept plan (same key), but the general path refuses it: a rank
    with the plan accepted it while a rank without raised, and the others waited for it."""
    import decimal
    fn = getattr(mpidp, call)
    x = numpy.full(3, rank + 1.0)
    arg = [x] if call.startswith("grouped") else x
    for _ in range(2):
        fn(arg, op=mpidp.Sum, name="dec", postscale_factor=2.0)  # the plan
    with pytest.raises(TypeError, match="postscale_factor must be a real number"):
        fn(arg, op=mpidp.Sum, name="dec", postscale_factor=decimal.Decimal(2))
    got = mpidp.allreduce(numpy.full(3, rank + 1.0), op=mpidp.Sum)
    numpy.testing.assert_allclose(got, numpy.full(3, size * (size + 1) / 2))


def test_in_place_prescaled_small_allreduce_with_contiguous_and_strided_inputs(rank, size):
    """Whether a small message travels in the check may depend only on checked fields: an in-place
    prescaled call on a contiguous array (scaled once the ranks agree, so not carried) facing one on
    a strided view (scaled in a copy first) must still make the same MPI calls (it hung)."""
    base = numpy.arange(8, dtype=numpy.float64) + rank
    x = base[::2] if rank % 2 else base[:4].copy()  # odd ranks: a strided view
    want = 2.0 * sum((numpy.arange(8, dtype=numpy.float64) + r)[::2] if r % 2 else
                     (numpy.arange(8, dtype=numpy.float64) + r)[:4] for r in range(size))
    got = mpidp.allreduce_(x, op=mpidp.Sum, name="pre", prescale_factor=2.0)
    numpy.testing.assert_allclose(got, want)
