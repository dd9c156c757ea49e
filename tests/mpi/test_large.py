"""Messages over 2^31 elements: split into pieces so MPIs without MPI-4 large counts work too."""
import numpy
import pytest

import mpidp

N = (1 << 31) + 17  # more elements than a C int can count


@pytest.mark.slow
def test_allreduce_and_broadcast_over_2_31_elements(rank, size):
    if size > 2:
        pytest.skip("2 GiB per rank: run at 1-2 ranks to keep the suite inside this machine's memory")
    x = numpy.empty(N, dtype=numpy.uint8)
    x[:] = rank + 1
    x[-1] = 7
    mpidp.allreduce_(x, op=mpidp.Sum)
    total = size * (size + 1) // 2
    assert x[0] == total and x[N // 2] == total and x[-2] == total and x[-1] == (7 * size) % 256
    x[-1] = rank
    mpidp.broadcast_(x, root_rank=size - 1)
    assert x[-1] == size - 1 and x[0] == total
