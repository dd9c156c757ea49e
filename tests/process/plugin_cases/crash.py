"""Run at np=3 (or np=2 through --mpidp-np): rank 1 exits the process in the middle of a test."""
import os

import pytest


@pytest.mark.mpi
def test_before(comm):
    comm.Barrier()


@pytest.mark.mpi
def test_rank_1_dies(comm):
    if comm.Get_rank() == 1:
        os._exit(3)
    comm.Barrier()


@pytest.mark.mpi
def test_never_reached(comm):
    comm.Barrier()
