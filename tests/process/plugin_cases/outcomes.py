"""Run at np=3: one failure on rank 1 only, skips by size and by rank, an xfail on one rank."""
import pytest


def test_passes(comm, rank, size):
    assert comm.allreduce(rank) == size * (size - 1) // 2


def test_fails_on_rank_1(rank):
    value = rank * 10
    assert rank != 1, f"planted failure on rank {rank}, value={value}"


@pytest.mark.mpi(min_size=4)
def test_needs_4_ranks(comm):
    comm.Barrier()


@pytest.mark.mpi(min_size=2)
def test_needs_2_ranks(comm):
    comm.Barrier()


def test_skips_on_rank_1_only(rank):
    if rank == 1:
        pytest.skip("rank 1 has nothing to check")


def test_skips_everywhere():
    pytest.skip("nothing to check anywhere")


@pytest.mark.xfail(reason="known wrong on rank 2")
def test_expected_failure_on_rank_2(rank):
    assert rank != 2


def test_runs_after_the_failure(comm):
    comm.Barrier()
