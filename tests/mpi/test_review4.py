"""Review of the grouped plan, set_check and the hierarchical allgather: cases that went wrong."""
import numpy
import pytest

import mpidp
from mpidp.comm import collectives


@pytest.mark.parametrize("twice", ["same array", "two views of one array"])
@pytest.mark.parametrize("op", ["Sum", "Average"])
def test_grouped_in_place_with_one_big_tensor_twice_reduces_it_once(rank, size, twice, op):
    """A big ("alone") tensor listed twice, or two contiguous views of its memory: each is reduced
    (and prescaled) once, as the small ones are, not once per listing in the same memory."""
    n = collectives.ALONE_BYTES // 8 + 5
    for _ in range(2):  # the second call through the grouped plan
        big = numpy.full(n, float(rank + 1))
        other = big if twice == "same array" else big.reshape(1, n)
        small = numpy.full(3, float(rank + 1))
        mpidp.grouped_allreduce_([big, small, other], op=getattr(mpidp, op), prescale_factor=2.0, name="twice")
        total = 2.0 * size * (size + 1) / 2
        want = total / size if op == "Average" else total
        numpy.testing.assert_array_equal(big, numpy.full(n, want))
        numpy.testing.assert_array_equal(small, numpy.full(3, want))
