"""Example MPI tests for mpidp.testing: one file that runs at any number of ranks.

    mpiexec -n 4 python -m pytest --mpidp examples/test_example_mpi.py    # under MPI
    python -m pytest --mpidp-np 2,4 examples/test_example_mpi.py          # launches mpiexec itself
    python -m pytest examples/test_example_mpi.py                         # 1 rank, no MPI mode

The bodies read ``rank`` and ``size`` instead of assuming them, compare with NumPy, and let
a failure on any rank fail the test on every rank; ``mpi(min_size=k)`` skips a test that
needs more ranks than the job has.
"""
import numpy as np
import pytest

import mpidp


def test_allreduce_matches_numpy(comm, rank, size):
    x = np.arange(5, dtype=np.float64) + rank
    out = np.empty_like(x)
    comm.Allreduce(x, out)
    np.testing.assert_allclose(out, sum(np.arange(5) + r for r in range(size)))


@pytest.mark.mpi(min_size=2)
def test_ring_passes_each_rank_to_its_right(comm, rank, size):
    got = comm.sendrecv(rank, dest=(rank + 1) % size, source=(rank - 1) % size)
    assert got == (rank - 1) % size


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("root", [0, 1])
def test_broadcast_from_each_root(comm, rank, root):
    data = {"from": rank, "values": [rank] * 3} if rank == root else None
    assert comm.bcast(data, root=root) == {"from": root, "values": [root] * 3}


@pytest.mark.mpi
def test_mpidp_average_over_a_process_set(process_set, rank, size):
    averaged = mpidp.allreduce(np.full(4, float(rank)), op=mpidp.Average, process_set=process_set)
    np.testing.assert_allclose(averaged, (size - 1) / 2)


@pytest.mark.mpi(min_size=4, timeout=30)
def test_only_at_four_ranks_or_more(comm, size):
    assert comm.allreduce(1) == size
