"""Runs every tests/mpi file under real mpiexec at 2, 3 and 4 ranks (1 rank runs in-process),
and every tests/gpu file at 2 ranks sharing the machine's GPU(s) where there is one.

One mpiexec job per rank count runs all the files in one pytest session: a launch costs
seconds of start-up on a small machine (Python, NumPy, mpi4py, pytest on every rank), and a
job per file made that most of the suite's time. Each item ``test_under_mpiexec[file-np]``
reports its own file's tests from rank 0's ``results.jsonl`` (mpidp.testing). A test that
ends the job (a hang the plugin aborts, a rank that dies) fails its file with the job's
tail, and the files after it run again in a new job: one bad file hides nothing of the others.
"""
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest

from _mpirun import ROOT, clean_env, mpiexec, python
from mpidp.testing._launcher import Job, Run

HERE = Path(__file__).parent
FILES = sorted(p.name for p in (HERE / "mpi").glob("test_*.py"))
GPU_FILES = sorted(p.name for p in (HERE / "gpu").glob("test_*.py"))
HEAVY_YIELD = {"MPIR_CVAR_ENABLE_HEAVY_YIELD": "1"}  # oversubscribed: waiting ranks give up the CPU
TEST_TIMEOUT_S = 120   # one test on any rank (the plugin aborts the job past it)
STALL_S = 300          # no test finished for this long: the job is killed (the plugin's abort failed)
_jobs = {}             # (folder, np) -> {path: (outcome, text)}


def pytest_args(logdir, paths):
    # only the two plugins the suite needs: autoloading every installed one costs ~1 s per rank
    return python("-m", "pytest", "-q", "-rs", "-p", "pytest_timeout", "-p", "mpidp.testing",
                  "--mpidp", "--mpidp-timeout", str(TEST_TIMEOUT_S), "-o", "timeout=150",
                  "--mpidp-log-dir", logdir, "--continue-on-collection-errors", "-p", "no:cacheprovider",
                  *paths)


def run_job(paths, np, logdir):
    """Run ``paths`` in one pytest session under ``mpiexec -n np``; killed when no test ends for STALL_S."""
    logdir.mkdir(parents=True)
    results, output = logdir / "results.jsonl", logdir / "output.txt"
    env = clean_env({"PYTEST_DISABLE_PLUGIN_AUTOLOAD": "1", **(HEAVY_YIELD if np > 2 else {})})
    command = [mpiexec(), "-n", str(np)] + [str(a) for a in pytest_args(logdir, paths)]
    start = progress = time.monotonic()
    size = -1
    with open(output, "wb") as out:
        proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=ROOT,
                                start_new_session=True)
        killed = False
        while proc.poll() is None:
            time.sleep(0.2)
            now_size = results.stat().st_size if results.exists() else 0
            if now_size != size:
                size, progress = now_size, time.monotonic()
            elif time.monotonic() - progress > STALL_S:
                killed = True
                break
        try:  # the whole group: mpiexec, its proxies and every rank
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        proc.wait()
    text = output.read_text(encoding="utf-8", errors="replace")
    return Run(Job(f"np={np}", np), command, proc.returncode, time.monotonic() - start, text, killed, logdir)


def ended(run):
    if run.killed:
        return f"nothing was reported for {STALL_S} s, so the job was killed"
    return run.why_it_ended()


def judge(run, path):
    """(outcome, text) for the file ``path`` in a job that reached it."""
    prefix, where = f"{path}::", f"{path} at {run.job.label}"
    mine = [e for nodeid, e in run.results.items() if nodeid.startswith(prefix)]
    failed = [e for e in mine if e["outcome"] in ("failed", "error")]
    problems = [f"{len(failed)} of {len(mine)} tests failed: " + ", ".join(e["nodeid"][len(prefix):] for e in failed)
                ] if failed else []
    if run.current is not None and run.current.startswith(prefix):
        problems.append(f"the job ended during {run.current}: {ended(run)}")
    if re.search(rf"\bERROR collecting {re.escape(path)}\b", run.output):
        problems.append("collection failed")
    if problems:
        texts = [f"{'_' * 10} {e['nodeid']} ({e['outcome']}) {'_' * 10}\n{e['text']}" for e in failed]
        tail = [run.tails()] if len(problems) > len(failed[:1]) else []
        return "failed", "\n".join([f"{where}: " + "; ".join(problems), run.header(), *texts, *tail])
    if mine and not all(e["outcome"] in ("skipped", "xfailed") for e in mine):
        return "passed", ""
    if mine:
        return "skipped", f"{where}: all {len(mine)} tests skipped: " + "; ".join(sorted({e["reason"] for e in mine}))
    reasons = [line for line in run.output.splitlines() if line.startswith("SKIPPED") and f" {path}:" in line]
    if reasons:  # a module-level skip: nothing to run
        return "skipped", f"{where}: {reasons[0]}"
    return "failed", f"{where}: no test of this file ran\n{run.header()}\n{run.tails()}"


def run_all(folder, names, np, tmp):
    """{path: (outcome, text)} for every file in ``names``, in as few jobs as the files allow."""
    paths, verdicts = [f"tests/{folder}/{name}" for name in names], {}
    while paths:
        run = run_job(paths, np, tmp / f"{folder}-np{np}-job{len(verdicts)}")
        started = [e["nodeid"].split("::")[0] for e in run.events if e["event"] == "start"]
        # files the job finished: every file when it ended normally, else up to the last one started
        # (a test of which may have ended the job: that file fails with the job's tail)
        done = len(paths) if run.final is not None else (paths.index(started[-1]) + 1 if started else 0)
        if done == 0:  # ended before any test: start-up or collection broke for every file
            text = f"the job ended before any test ran\n{run.header()}\n{ended(run)}\n{run.tails()}"
            verdicts.update((p, ("failed", f"{p} at np={np}: {text}")) for p in paths)
            break
        verdicts.update((p, judge(run, p)) for p in paths[:done])
        paths = paths[done:]
    return verdicts


def run_file(folder, name, np, tmp):
    key = (folder, np)
    if key not in _jobs:
        _jobs[key] = run_all(folder, FILES if folder == "mpi" else GPU_FILES, np, tmp)
    outcome, text = _jobs[key][f"tests/{folder}/{name}"]
    if outcome == "skipped":
        pytest.skip(text)
    assert outcome == "passed", text


@pytest.fixture(scope="module")
def jobs_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("mpi-jobs")


@pytest.mark.spawns
@pytest.mark.timeout(0)  # the first item of each rank count runs every file; STALL_S bounds the job
@pytest.mark.parametrize("name", FILES)
@pytest.mark.parametrize("np", [2, 3, 4])
def test_under_mpiexec(np, name, jobs_dir):
    run_file("mpi", name, np, jobs_dir)


@pytest.mark.gpu
@pytest.mark.spawns
@pytest.mark.timeout(0)
@pytest.mark.parametrize("name", GPU_FILES)
def test_gpu_file_at_two_ranks(name, jobs_dir):
    """Staging, stream order and device binding with two ranks on one GPU (skipped without a GPU)."""
    run_file("gpu", name, 2, jobs_dir)
