"""Run at np=3 with a short --mpidp-timeout and -k: one rank fails before a collective the others wait in."""


def test_before(comm):
    comm.Barrier()


def test_fails_on_rank_1_before_a_collective(comm, rank):
    assert rank != 1, f"planted failure on rank {rank}"
    comm.Barrier()


def test_fails_on_rank_0_before_a_collective(comm, rank):
    assert rank != 0, f"planted failure on rank {rank}"
    comm.Barrier()


def test_after(comm):
    comm.Barrier()
