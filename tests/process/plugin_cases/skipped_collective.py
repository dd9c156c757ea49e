"""Run at np=3 with a short --mpidp-timeout and -k: one rank fails before a collective the others wait in."""
import pytest


@pytest.fixture
def resource(comm, rank):
    if rank == 1:
        raise RuntimeError("planted fixture failure on rank 1")
    yield rank
    comm.Barrier()  # the ranks that set it up clean up together


def test_before(comm):
    comm.Barrier()


def test_fails_on_rank_1_before_a_collective(comm, rank):
    assert rank != 1, f"planted failure on rank {rank}"
    comm.Barrier()


def test_fails_on_rank_0_before_a_collective(comm, rank):
    assert rank != 0, f"planted failure on rank {rank}"
    comm.Barrier()


def test_fails_on_rank_2_while_rank_1_waits_for_it(comm, rank):
    assert rank != 2, f"planted failure on rank {rank}"
    if rank == 1:
        comm.recv(source=2, tag=5)
    elif rank == 2:
        comm.send(None, dest=1, tag=5)


def test_fixture_fails_on_rank_1_and_the_others_meet_in_its_teardown(resource):
    pass


def test_after(comm):
    comm.Barrier()
