"""mpidp.train in process at any rank count: the decision to resume is rank 0's, where
checkpoint.load reads the file; evaluation counts every test sample once."""
import shutil
import tempfile

import numpy
import pytest

import mpidp
from mpidp import checkpoint, models, nn
from mpidp.train import evaluate, parse_args, train

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


@pytest.mark.parametrize("n", [1, 7, 12])
def test_evaluate_counts_every_test_sample_once(rank, size, n):
    # the sampler pads each shard by wrapping to equal lengths; those repeats belong to other
    # ranks, so a per-rank check for repeats kept them: at np 3 the 7 samples counted as 9
    rng = numpy.random.default_rng(4)
    x, y = rng.standard_normal((n, 5)).astype(numpy.float32), rng.integers(0, 3, n)
    model = models.mlp(in_features=5, hidden=(8,), num_classes=3, seed=2)
    logits = model(x)
    loss = nn.CrossEntropyLoss()(logits, y)
    accuracy = float((logits.argmax(-1) == y).mean())
    got = evaluate(model, (x, y), 2, numpy)
    assert got[0] == pytest.approx(loss, rel=1e-6) and got[1] == pytest.approx(accuracy)


@pytest.mark.parametrize("change", [["--batch-size", "32"], ["--accumulate", "2"]])
def test_resume_with_another_global_batch_is_a_clear_error(dirs, rank, change):
    # steps count batches of the saved size: with another size the step count put the sampler
    # in another epoch (the rest of the saved one skipped); say so instead, on every rank
    train(parse_args([*SMALL, "--checkpoint-dir", dirs, "--max-steps", "30"]))
    with pytest.raises(mpidp.CheckpointError, match=f"saved with {change[0]} .* this run has {change[1]}"):
        train(parse_args([*SMALL, "--checkpoint-dir", dirs, "--resume", *change]))


def test_a_fresh_run_in_a_folder_of_another_runs_checkpoints_is_refused(dirs, rank):
    train(parse_args([*SMALL, "--checkpoint-dir", dirs, "--max-steps", "30"]))
    with pytest.raises(mpidp.CheckpointError, match="already holds checkpoints"):
        train(parse_args([*SMALL, "--checkpoint-dir", dirs, "--max-steps", "3"]))


def test_a_failed_save_is_a_failure_to_restart_not_a_refused_run(dirs, rank, monkeypatch):
    """A checkpoint that could not be written (a full disk, a file system that hiccuped) is a failure for
    mpidprun --restarts to restart from the last good checkpoint, not a usage error: it must not exit 2."""
    from mpidp import train as train_module

    def no_room(*args, **kwargs):  # what checkpoint.save raises on every rank when rank 0's write fails
        raise mpidp.CheckpointError(f"could not save checkpoint step 3 in {dirs}: [Errno 28] No space left on "
                                    f"device; the previous checkpoint is unchanged; free space there or save elsewhere")
    monkeypatch.setattr(train_module.checkpoint, "save", no_room)
    monkeypatch.setattr(mpidp, "shutdown", lambda: None)  # (the session goes on)
    with pytest.raises(BaseException) as info:
        train_module.main([*SMALL, "--checkpoint-dir", dirs, "--max-steps", "3"])
    assert not (isinstance(info.value, SystemExit) and info.value.code == train_module.REFUSED), \
        "a failed save exited 2, the status mpidprun --restarts does not restart"
