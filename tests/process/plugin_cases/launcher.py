"""Run by plain pytest with --mpidp-np 2,3: serial tests here, the mpi tests under mpiexec."""
import sys

import pytest


def test_serial():
    assert "mpi4py" not in sys.modules  # the launching process never imports MPI


@pytest.mark.mpi
def test_any_size(comm):
    comm.Barrier()


@pytest.mark.mpi(min_size=2)
def test_sum(comm, rank, size):
    assert comm.allreduce(rank) == size * (size - 1) // 2


@pytest.mark.mpi(min_size=3)
def test_wrong_on_last_of_3(rank, size):
    assert not (size == 3 and rank == 2), "planted failure on the last rank of 3"
