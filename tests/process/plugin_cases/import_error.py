"""Run at np=3: importing this module raises on rank 1 only."""
from mpi4py import MPI

if MPI.COMM_WORLD.Get_rank() == 1:
    raise RuntimeError("planted import failure on rank 1")


def test_never_runs(comm):
    comm.Barrier()
