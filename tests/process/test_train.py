"""The main job end to end: accuracy on the bundled data, and resume bit-identical to no interruption."""
import time

import numpy
import pytest

from _mpirun import python, run

pytestmark = pytest.mark.spawns
TRAIN = ["scripts/train.py", "--progress", "log"]


def final_model(directory):
    """The model arrays of the newest checkpoint in ``directory``."""
    path = sorted(directory.glob("ckpt-*.npz"))[-1]
    with numpy.load(path, allow_pickle=False) as f:
        return path.name, {k: f[k] for k in f.files if k.startswith("model/")}


def assert_identical(a, b):
    assert a[0] == b[0], f"runs ended at different steps: {a[0]} vs {b[0]}"
    assert a[1].keys() == b[1].keys()
    for key in a[1]:
        assert numpy.array_equal(a[1][key], b[1][key]), f"{key} differs after resume"


def test_cnn_on_digits_reaches_95_percent(tmp_path):
    rc, out, seconds = run(python(*TRAIN, "--target-accuracy", "0.95", "--summary-json",
                                  tmp_path / "s.json"), np=2, timeout=300)
    assert rc == 0, out[-3000:]
    assert "test accuracy 0.9" in out and "samples/s on 2 rank(s)" in out


SMALL = ["--model", "mlp", "--epochs", "2", "--batch-size", "16", "--optimizer", "adam", "--warmup-epochs", "0.5"]


def test_resume_after_a_stop_is_bit_identical(tmp_path):
    whole, part = tmp_path / "whole", tmp_path / "part"
    rc, out, _ = run(python(*TRAIN, *SMALL, "--checkpoint-dir", whole), np=2, timeout=180)
    assert rc == 0, out[-3000:]
    rc, out, _ = run(python(*TRAIN, *SMALL, "--checkpoint-dir", part, "--max-steps", "29"), np=2, timeout=180)
    assert rc == 0, out[-3000:]
    rc, out, _ = run(python(*TRAIN, *SMALL, "--checkpoint-dir", part, "--resume"), np=2, timeout=180)
    assert rc == 0 and "resumed from step 29" in out, out[-3000:]
    assert_identical(final_model(whole), final_model(part))


def test_resume_after_sigkill_is_bit_identical(tmp_path):
    whole, part = tmp_path / "whole", tmp_path / "part"
    args = [*TRAIN, *SMALL, "--checkpoint-every", "4"]
    rc, out, _ = run(python(*args, "--checkpoint-dir", whole), np=2, timeout=180)
    assert rc == 0, out[-3000:]
    import os
    import signal
    import subprocess
    from _mpirun import clean_env, mpiexec, ROOT
    proc = subprocess.Popen([mpiexec(), "-n", "2", *python(*args, "--checkpoint-dir", part)], cwd=ROOT,
                            env=clean_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True)
    deadline = time.monotonic() + 120
    while not list(part.glob("ckpt-0000001[2-9].npz")) and time.monotonic() < deadline:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)  # the whole job dies mid-run, between checkpoints
    proc.communicate()
    steps = sorted(part.glob("ckpt-*.npz"))
    assert steps, "no checkpoint was written before the kill"
    rc, out, _ = run(python(*args, "--checkpoint-dir", part, "--resume"), np=2, timeout=180)
    assert rc == 0 and "resumed from step" in out, out[-3000:]
    assert_identical(final_model(whole), final_model(part))


def test_resume_on_another_number_of_ranks_is_a_clear_error(tmp_path):
    # steps, epochs, the sampler's epoch and the learning rate (scaled by the ranks) are all
    # counted for the job that saved: at np 3 the run went on from np 2's checkpoint, rewound the
    # sampler to another epoch and kept np 2's rate
    rc, out, _ = run(python(*TRAIN, *SMALL, "--checkpoint-dir", tmp_path, "--max-steps", "4"), np=2, timeout=180)
    assert rc == 0, out[-3000:]
    rc, out, seconds = run(python(*TRAIN, *SMALL, "--checkpoint-dir", tmp_path, "--resume"), np=3, timeout=180)
    assert rc not in (0, None), out[-3000:]
    assert "saved by a job of 2 ranks" in out and "-np 2" in out, out[-3000:]


def test_transformer_and_options_run(tmp_path):
    rc, out, _ = run(python(*TRAIN, "--model", "transformer", "--epochs", "1", "--max-steps", "12",
                            "--compression", "fp16", "--accumulate", "2", "--timeline", tmp_path / "t.json"),
                     np=2, timeout=180)
    assert rc == 0, out[-3000:]
    import json
    trace = json.loads((tmp_path / "t.json").read_text())
    assert {e["pid"] for e in trace["traceEvents"] if e.get("ph") == "X"} == {0, 1}


def test_malformed_data_is_a_clear_error_on_every_rank(tmp_path):
    bad = tmp_path / "bad.npz"
    numpy.savez(bad, x=numpy.zeros((10, 4)), labels=numpy.zeros(10))
    rc, out, seconds = run(python(*TRAIN, "--model", "mlp", "--data", bad), np=2, timeout=60)
    assert rc not in (0, None) and seconds < 30
    assert "bad.npz" in out and "'y'" in out, out[-2000:]


def test_progress_bar_is_tqdm_on_rank_0_and_log_lines_otherwise(tmp_path):
    rc, out, _ = run(python("scripts/train.py", "--progress", "bar", *SMALL, "--max-steps", "6",
                            "--checkpoint-dir", tmp_path), np=2, timeout=180)
    assert rc == 0, out[-3000:]
    assert "| 6/" in out and "step/s, epoch 0 loss" in out, out[-3000:]  # tqdm's counter, rate and our postfix
    assert "checkpoint " in out  # a line written above the bar
    rc, out, _ = run(python("scripts/train.py", "--progress", "auto", *SMALL, "--max-steps", "6", "--log-every",
                            "3"), np=2, timeout=180)  # not a terminal: plain lines, no bar
    assert rc == 0, out[-3000:]
    assert "step 3/" in out and "step 6/" not in out.split("step 3/")[0] and "step/s" not in out, out[-3000:]
