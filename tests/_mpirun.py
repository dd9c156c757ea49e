"""Spawn real ``mpiexec`` jobs from tests: bounded by a timeout, whole process group killed."""
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
_LEFTOVERS = ("PMI_", "PMIX_", "HYDRA_", "OMPI_", "MPI_LOCAL", "PRTE_")


def mpiexec():
    """The mpiexec next to this Python (the mpich wheel's), else the one on PATH."""
    local = Path(sys.executable).parent / "mpiexec"
    return str(local) if local.exists() else (shutil.which("mpiexec") or "mpiexec")


def clean_env(extra=None):
    """This environment without the launcher variables of an enclosing MPI job."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(_LEFTOVERS)}
    env.setdefault("PYTHONUNBUFFERED", "1")
    # several ranks share 2 cores: multithreaded BLAS in every rank only makes them spin
    env.setdefault("OPENBLAS_NUM_THREADS", "1")
    env.setdefault("OMP_NUM_THREADS", "1")
    env.update(extra or {})
    return env


def run(args, np=None, timeout=120, env=None, cwd=ROOT):
    """Run ``mpiexec -n np args`` (or plain ``args`` when np is None); returns (rc, out, seconds).

    stdout and stderr are merged. On timeout the whole process group is killed and rc is None.
    """
    cmd = ([mpiexec(), "-n", str(np)] if np else []) + [str(a) for a in args]
    start = time.monotonic()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=clean_env(env), cwd=cwd, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
        rc = proc.returncode
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        rc = None
    return rc, out, time.monotonic() - start


def python(*args):
    return [sys.executable, *args]


def mpidp_job(tmp_path, body, np=3, env=None, timeout=60):
    """Run ``body`` (indented code, after ``mpidp.init()`` and ``r = mpidp.rank()``) as an mpiexec job."""
    import textwrap
    script = tmp_path / "job.py"
    script.write_text("import os, sys, time\nimport numpy\nimport mpidp\nmpidp.init()\n"
                      "r = mpidp.rank()\n" + textwrap.dedent(body))
    return run(python(script), np=np, timeout=timeout, env=env)
