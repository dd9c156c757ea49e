"""``pytest --mpidp-np 2,4``: run the tests marked ``mpi`` under ``mpiexec -n 2`` and ``-n 4``;
``pytest --mpidp-nodes 2x2,2+1``: on simulated clusters of those layouts (``mpidprun --simulate-nodes``).

One ``mpiexec -n N python -m pytest --mpidp <same paths> -m mpi`` per size (or one
``mpidprun --simulate-nodes L ...`` per layout), started by the first item of that job; rank 0
of the child writes ``results.jsonl`` in the job's log folder, and each item
``file.py::[mpi np=N]`` (``[mpi nodes=L]``) reports that file's tests from it. The parent never
imports mpi4py.
"""
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import NamedTuple

import pytest

from . import DEFAULT_LAUNCH_TIMEOUT_S
from ._report import ranks_word


class Job(NamedTuple):
    """One child job: 'np=2' under mpiexec, or 'nodes=2x2' on a simulated cluster."""
    label: str
    np: int
    layout: str = ""     # --simulate-nodes layout; '' for plain mpiexec

OUTPUT_TAIL_LINES = 60
LOG_TAIL_LINES = 25

# What mpiexec puts in each rank's environment: a child job must not inherit it from an
# enclosing one. Users' own Open MPI settings (OMPI_MCA_btl=..., OMPI_ALLOW_RUN_AS_ROOT=1) stay.
_LEFTOVER_PREFIXES = ("PMI_", "PMIX_", "HYDRA_", "HYDI_", "OMPI_COMM_WORLD_", "OMPI_MCA_ess_",
                      "OMPI_MCA_orte_", "OMPI_MCA_pmix_", "OMPI_MCA_initial_wdir")
_LEFTOVER_NAMES = ("MPI_LOCALRANKID", "MPI_LOCALNRANKS")


def _is_leftover(name):
    if name.startswith(_LEFTOVER_PREFIXES) or name in _LEFTOVER_NAMES:
        return True
    return (name.startswith("OMPI_") and not name.startswith("OMPI_MCA_")
            and not name.startswith("OMPI_ALLOW_RUN_AS_ROOT"))


def child_environment(environ, np):
    """``environ`` without an enclosing MPI job's per-rank variables; yielding waits when oversubscribed."""
    env = {name: value for name, value in environ.items() if not _is_leftover(name)}
    if np > (os.cpu_count() or 1):
        # MPICH's waiting ranks otherwise spin and take the CPU from working ones (mpi-cuda-facts 2.4).
        env.setdefault("MPIR_CVAR_ENABLE_HEAVY_YIELD", "1")
    return env


def find_mpiexec(explicit=None):
    """``explicit``, else the mpiexec next to ``sys.executable`` (a venv's MPI wheel), else PATH's."""
    if explicit:
        return explicit
    beside = Path(sys.executable).parent / "mpiexec"  # not resolved: a venv's python is a symlink
    if beside.exists():
        return str(beside)
    found = shutil.which("mpiexec") or shutil.which("mpirun")
    if found is None:
        raise pytest.UsageError(f"--mpidp-np needs mpiexec, and there is none next to {sys.executable} "
                                "or on PATH; pip install mpich, or give --mpidp-mpiexec PATH")
    return found


def parse_layouts(text):
    """'2x2,3x1,2+1' -> [Job('nodes=2x2', 4, '2x2'), ...] (uneven layouts take '+', not ',')."""
    from ..errors import LaunchError
    from ..launch.simcluster import parse_layout

    jobs = []
    for part in str(text).split(","):
        try:
            layout = parse_layout(part.strip())
        except LaunchError as exc:
            raise pytest.UsageError(f"--mpidp-nodes {text!r}: {exc}; write e.g. --mpidp-nodes 2x2,3x1,2+1") from None
        jobs.append(Job(f"nodes={layout}", layout.np, str(layout)))
    return list(dict.fromkeys(jobs))


def parse_sizes(text):
    """'2,4' -> [2, 4]."""
    try:
        sizes = [int(part) for part in str(text).split(",") if part.strip()]
    except ValueError:
        sizes = []
    if not sizes or min(sizes) < 1:
        raise pytest.UsageError(f"--mpidp-np {text!r} is not a list of rank counts; "
                                "write e.g. --mpidp-np 2,4")
    return list(dict.fromkeys(sizes))


class MpiRunFailed(Exception):
    """A file's tests failed, or never finished, in a child MPI job; the message is the report."""


class Run:
    """One finished ``mpiexec`` child: exit code, seconds, output and rank 0's results events."""

    def __init__(self, job, command, returncode, seconds, output, killed, logdir):
        self.job, self.np, self.command, self.returncode, self.seconds = job, job.np, command, returncode, seconds
        self.output, self.killed, self.logdir = output, killed, logdir
        self.events = []
        path = logdir / "results.jsonl"
        if path.exists():
            for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
                try:
                    self.events.append(json.loads(line))
                except ValueError:  # a line cut short when the job was killed
                    pass
        self.results = {e["nodeid"]: e for e in self.events if e["event"] == "result"}
        self.final = next((e for e in self.events if e["event"] == "final"), None)
        starts = [e["nodeid"] for e in self.events if e["event"] == "start"]
        self.current = starts[-1] if starts and starts[-1] not in self.results else None

    def header(self):
        start = f"mpidprun --simulate-nodes {self.job.layout}" if self.job.layout else f"mpiexec -n {self.np}"
        return (f"{start} ... pytest --mpidp: exit code {self.returncode} "
                f"after {self.seconds:.1f} s")

    def why_it_ended(self):
        """What is known about a job that ended without agreeing on its end."""
        if self.killed:
            return (f"it did not finish within --mpidp-launch-timeout ({self.killed:g} s), "
                    "so its process group was killed")
        aborted = next((e for e in self.events if e["event"] == "aborted"), None)
        if aborted is not None:
            return "rank 0 aborted it: " + aborted["text"]
        waiting = [e for e in self.events if e["event"] == "waiting"]
        text = (f"it ended with exit code {self.returncode} and no word from rank 0: a rank exited "
                "or crashed, and mpiexec then ended every rank")
        if waiting and self.current is not None and waiting[-1]["what"].startswith(self.current):
            text += f"; rank 0 was waiting for {ranks_word(waiting[-1]['ranks'])} in {waiting[-1]['what']}"
        return text

    def tails(self):
        """The end of the child's output, and of each rank log that holds an mpidp message."""
        lines = self.output.rstrip("\n").split("\n")
        parts = [f"--- last {min(len(lines), OUTPUT_TAIL_LINES)} lines of the output (rank 0 "
                 "and mpiexec) ---"] + lines[-OUTPUT_TAIL_LINES:]
        for log in sorted(self.logdir.glob("rank-*.log")):
            text = log.read_text(encoding="utf-8", errors="replace")
            if "[mpidp] rank" in text:
                tail = text.rstrip("\n").split("\n")[-LOG_TAIL_LINES:]
                parts += [f"--- end of {log} ---"] + tail
        parts.append(f"all rank logs: {self.logdir}")
        return "\n".join(parts)


class MpiRun(pytest.Item):
    """``file.py::[mpi np=N]``: that file's ``mpi`` tests as run by the child job of size N."""

    def __init__(self, *, launcher, job, expected, **kwargs):
        super().__init__(**kwargs)
        self.launcher, self.job, self.expected = launcher, job, expected

    def runtest(self):
        run = self.launcher.run(self.job)
        outcome, text = judge(run, self.parent.nodeid, self.expected)
        if outcome == "skipped":
            pytest.skip(text)
        if outcome == "failed":
            raise MpiRunFailed(text)

    def repr_failure(self, excinfo):
        if excinfo.errisinstance(MpiRunFailed):
            return str(excinfo.value)
        return super().repr_failure(excinfo)

    def reportinfo(self):
        return self.path, None, f"{self.parent.nodeid}::{self.name}"


def _failures_text(results):
    parts = []
    for e in results:
        parts += [f"{'_' * 10} {e['nodeid']} ({e['outcome']}) {'_' * 10}", e["text"]]
    return "\n".join(parts)


def judge(run, module_id, expected):
    """('passed' | 'skipped' | 'failed', text) for one file's tests in ``run``."""
    prefix = module_id + "::"
    mine = [run.results[nodeid] for nodeid in run.results if nodeid.startswith(prefix)]
    failed = [e for e in mine if e["outcome"] in ("failed", "error")]
    label = run.job.label
    if failed:
        first = f"{label}: {len(failed)} of {len(mine)} tests failed: " + ", ".join(
            e["nodeid"][len(prefix):] for e in failed)
        text = "\n".join([first, run.header(), _failures_text(failed)])
        if run.final is None:
            text += "\n" + "the job did not end normally: " + run.why_it_ended()
        return "failed", text
    if run.final is None:
        if run.current is not None and run.current.startswith(prefix):
            return "failed", "\n".join([f"{label}: the job ended during {run.current}", run.header(),
                                        run.why_it_ended(), run.tails()])
        if not set(expected) <= set(run.results):
            where = run.current or "start-up or collection"
            return "failed", "\n".join([f"{label}: not run, the job ended earlier, during {where}",
                                        run.header(), run.why_it_ended(), run.tails()])
    elif not mine and run.final["exitstatus"] not in (0, 5):
        return "failed", "\n".join([f"{label}: the job ended with exit status {run.final['exitstatus']} "
                                    "before running this file's tests", run.header(), run.tails()])
    if not mine:
        return "skipped", f"{label}: none of this file's mpi tests were selected in the child job"
    if all(e["outcome"] in ("skipped", "xfailed") for e in mine):
        reasons = sorted({e["reason"] for e in mine})
        return "skipped", f"{label}: all {len(mine)} tests skipped: " + "; ".join(reasons)
    return "passed", ""


class Launcher:
    """The plugin object registered for ``--mpidp-np``: adds the items and runs the child jobs."""

    def __init__(self, config, sizes, timeout, logdir, layouts=None, link_rate=None):
        self.config, self.timeout, self.logdir = config, timeout, logdir
        self.jobs = [Job(f"np={n}", n) for n in parse_sizes(sizes)] if sizes else []
        self.jobs += parse_layouts(layouts) if layouts else []
        self.link_rate = link_rate
        self.launch_timeout = config.getoption("mpidp_launch_timeout") or DEFAULT_LAUNCH_TIMEOUT_S
        self.mpiexec = find_mpiexec(config.getoption("mpidp_mpiexec")) if sizes else None
        self.runs = {}

    @pytest.hookimpl(hookwrapper=True)
    def pytest_collection_modifyitems(self, session, config, items):
        yield  # after -k/-m deselection: only the selected mpi tests count
        modules = {}
        for item in items:
            module = item.getparent(pytest.Module)
            if module is not None and item.get_closest_marker("mpi") is not None:
                modules.setdefault(module.nodeid, (module, []))[1].append(item.nodeid)
        for job in self.jobs:
            for module, expected in modules.values():
                items.append(MpiRun.from_parent(module, name=f"[mpi {job.label}]", launcher=self, job=job,
                                                expected=expected))

    def command(self, job, logdir):
        """The child's command line: the same tests, the same ini, MPI mode on, only ``mpi`` tests."""
        config, option = self.config, self.config.option
        marks = f"mpi and ({option.markexpr})" if option.markexpr else "mpi"
        if job.layout:
            start = [sys.executable, "-m", "mpidp.run", "--simulate-nodes", job.layout]
            start += ["--link-rate", self.link_rate] if self.link_rate else []
        else:
            start = [self.mpiexec, "-n", str(job.np)]
        command = start + [sys.executable, "-m", "pytest", "--mpidp", "-m", marks,
                   "--mpidp-timeout", f"{self.timeout:g}", "--mpidp-log-dir", str(logdir),
                   "--rootdir", str(config.rootpath), "-p", "no:cacheprovider", "--color=no"]
        if os.environ.get("PYTEST_DISABLE_PLUGIN_AUTOLOAD"):
            command += ["-p", "mpidp.testing"]
        if config.inipath is not None:
            command += ["-c", str(config.inipath)]
        if option.keyword:
            command += ["-k", option.keyword]
        for plugin in option.plugins or []:
            if plugin not in ("mpidp", "mpidp.testing"):
                command += ["-p", plugin]
        for override in option.override_ini or []:
            command += ["-o", override]
        for path in option.deselect or []:
            command += ["--deselect", path]
        for path in option.ignore or []:
            command += ["--ignore", path]
        source = getattr(config, "args_source", None)  # pytest >= 7.2
        if source is None or source == pytest.Config.ArgsSource.ARGS:
            command += list(config.args)  # else the child finds the same testpaths or folder
        return command

    def run(self, job):
        """Run the child job ``job`` once (the first item of that job calls this)."""
        if job in self.runs:
            return self.runs[job]
        logdir = self.logdir / job.label.replace("=", "").replace("+", "p")
        if logdir.exists():
            shutil.rmtree(logdir)
        logdir.mkdir(parents=True)
        command = self.command(job, logdir)
        start = time.monotonic()
        process = subprocess.Popen(command, cwd=self.config.invocation_params.dir,
                                   env=child_environment(os.environ, job.np), stdout=subprocess.PIPE,
                                   stderr=subprocess.STDOUT, start_new_session=True)
        killed = False
        try:
            output, _ = process.communicate(timeout=self.launch_timeout)
        except subprocess.TimeoutExpired:
            killed = self.launch_timeout
            if job.layout:  # mpidprun runs its job in a session of its own: it must stop it itself
                process.terminate()
                try:
                    process.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    pass
        finally:
            try:  # the whole group: mpiexec, its proxies and every rank
                os.killpg(process.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        if killed:
            output, _ = process.communicate()
        self.runs[job] = Run(job, command, process.returncode, time.monotonic() - start,
                             output.decode("utf-8", "replace"), killed, logdir)
        return self.runs[job]
