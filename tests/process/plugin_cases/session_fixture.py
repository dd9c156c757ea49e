"""Run at np=3: a session-scoped fixture raises on rank 2 only."""
import pytest


@pytest.fixture(scope="session")
def resource(rank):
    if rank == 2:
        raise RuntimeError("planted fixture failure on rank 2")
    return rank


def test_uses_resource(resource, comm):
    comm.Barrier()


def test_does_not_use_it(comm):
    comm.Barrier()
