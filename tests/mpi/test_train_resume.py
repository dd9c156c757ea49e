"""mpidp.train's resume, in process at any rank count: the decision to resume is rank 0's,
where checkpoint.load reads the file."""
import shutil
import tempfile

import pytest

import mpidp
from mpidp import checkpoint
from mpidp.train import parse_args, train

SMALL = ["--model", "mlp", "--epochs", "1", "--batch-size", "16", "--optimizer", "adam", "--progress", "none"]


@pytest.fixture
def dirs(rank):
    """Rank 0's checkpoint folder, and another, empty, for each other rank: storage only rank 0 sees."""
    shared = mpidp.broadcast_object(tempfile.mkdtemp(prefix="mpidp-train-") if rank == 0 else None)
    own = shared if rank == 0 else tempfile.mkdtemp(prefix=f"mpidp-train-rank{rank}-")
    yield own
    mpidp.barrier()
    shutil.rmtree(own, ignore_errors=True)


def test_resume_from_checkpoints_only_rank_0_can_see(dirs, rank, size):
    # checkpoint.save writes and checkpoint.load reads on rank 0 only (node-local disk, or a
    # shared file system whose listing lags on other nodes): --resume must not ask each rank
    first = train(parse_args([*SMALL, "--checkpoint-dir", dirs, "--max-steps", "3"]))
    assert first["steps"] == 3
    assert (checkpoint.latest_step(dirs) == 3) == (rank == 0)
    resumed = train(parse_args([*SMALL, "--checkpoint-dir", dirs, "--max-steps", "5", "--resume"]))
    assert resumed["steps"] == 5
