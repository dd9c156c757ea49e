"""Run at np=3 with a short --mpidp-timeout: rank 1 never finishes test_hangs."""
import time


def test_before(comm):
    comm.Barrier()


def test_hangs(rank):
    if rank == 1:
        time.sleep(120)


def test_never_reached(comm):
    comm.Barrier()
