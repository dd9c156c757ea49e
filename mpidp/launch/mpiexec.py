"""Which MPI mpi4py uses, the ``mpiexec`` that belongs to it, and the launch argv for it.

The launcher never initialises MPI: the flavour comes from a subprocess that
imports ``mpi4py.MPI`` with ``rc.initialize = False`` and asks for the library
version. Commands are argv lists, never shell strings.
"""
import json
import os
import re
import shutil
import subprocess
import sys
from typing import NamedTuple

from ..errors import LaunchError
from .hosts import Host, format_host_list, format_hostfile

__all__ = ["MPIInfo", "Command", "LAUNCHERS", "classify", "probe_mpi4py", "mpiexec_candidates",
           "mpiexec_flavour", "find_mpiexec", "build_command", "is_python", "HOSTS_INLINE_MAX"]

LAUNCHERS = ("mpich", "openmpi", "srun")
NAMES = {"mpich": "MPICH", "openmpi": "Open MPI", "srun": "srun"}
SRUN_PMI = {"mpich": "pmi2", "openmpi": "pmix"}  # srun --mpi= plugin each flavour's libmpi talks to
HOSTS_INLINE_MAX = 64  # longer host lists go to a generated hostfile instead of the command line

# Run with the job's python: loads libmpi without MPI_Init and reports what it loaded.
_PROBE = r"""
import json, os
import mpi4py
mpi4py.rc.initialize = False
mpi4py.rc.finalize = False
from mpi4py import MPI
libdirs = []
try:
    with open("/proc/self/maps") as f:
        for line in f:
            path = line.split()[-1] if len(line.split()) >= 6 else ""
            d = os.path.dirname(path)
            if os.path.basename(path).startswith("libmpi") and d not in libdirs:
                libdirs.append(d)
except OSError:
    pass
print(json.dumps({"version": MPI.Get_library_version().strip("\x00 \n"),
                  "libdirs": libdirs, "config": mpi4py.get_config(),
                  "mpi4py": mpi4py.__version__}))
"""


class MPIInfo(NamedTuple):
    """What mpi4py of ``python`` loads."""
    flavour: str          # 'mpich', 'openmpi' or '' when the library is neither
    version: str          # first line of MPI_Get_library_version()
    libdirs: list         # directories of the libmpi* files the process mapped
    mpicc: str            # mpi4py.get_config()['mpicc'] when mpi4py was built from source
    python: str


class Command(NamedTuple):
    """A launch: ``argv`` to exec, ``env`` to add to the launcher's environment, and an optional
    generated hostfile ``(path, text)`` that must exist while the job runs."""
    argv: list
    env: dict
    hostfile: tuple = None


def classify(text):
    """'mpich' or 'openmpi' from a library-version or ``mpiexec --version`` text; '' if neither."""
    low = text.lower()
    if any(k in low for k in ("open mpi", "openrte", "prterun", "spectrum mpi")):
        return "openmpi"
    if any(k in low for k in ("mpich", "hydra", "intel(r) mpi", "mvapich")):
        return "mpich"  # Intel MPI and MVAPICH are MPICH derivatives with Hydra's command line
    return ""


def probe_mpi4py(python=None, timeout=30.0):
    """Ask ``python`` (default: this interpreter) which MPI library its mpi4py loads."""
    python = python or sys.executable
    try:
        out = subprocess.run([python, "-c", _PROBE], capture_output=True, text=True,
                             timeout=timeout, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        raise LaunchError(f"{python} took over {timeout:g} s to load mpi4py.MPI; "
                          f"check the MPI installation or pass --mpi mpich|openmpi") from None
    except OSError as exc:
        raise LaunchError(f"cannot run {python} to find the MPI library: {exc.strerror}") from None
    if out.returncode != 0:
        last = (out.stderr.strip().splitlines() or ["no output"])[-1]
        raise LaunchError(f"{python} cannot load mpi4py.MPI ({last}); install mpi4py with an MPI, "
                          f"e.g. pip install 'mpidp[mpich]'")
    data = json.loads(out.stdout.strip().splitlines()[-1])
    version = " ".join(data["version"].split("\n", 1)[0].split(", package")[0].split())
    return MPIInfo(classify(data["version"]), version, data["libdirs"],
                   data["config"].get("mpicc", ""), python)


def _executable(path):
    return bool(path) and os.path.isfile(path) and os.access(path, os.X_OK)


def mpiexec_candidates(info=None, path_env=None):
    """Where the ``mpiexec`` of ``info``'s MPI may be, most specific first, duplicates removed:
    next to its libmpi (``lib/../bin``), next to the python, next to mpi4py's ``mpicc``, PATH."""
    dirs = []
    if info is not None:
        dirs += [os.path.join(os.path.dirname(d), "bin") for d in info.libdirs]
        dirs.append(os.path.dirname(info.python))
        if info.mpicc:
            dirs.append(os.path.dirname(shutil.which(info.mpicc) or info.mpicc))
    dirs.append(os.path.dirname(sys.executable))
    found = [os.path.join(d, name) for d in dirs for name in ("mpiexec", "mpirun")]
    found += [shutil.which(name, path=path_env) for name in ("mpiexec", "mpirun")]
    seen, out = set(), []
    for p in found:
        if _executable(p) and os.path.realpath(p) not in seen:
            seen.add(os.path.realpath(p))
            out.append(p)
    return out


def mpiexec_flavour(path, timeout=15.0):
    """(flavour, first line) of ``path --version``; flavour '' when it cannot be told."""
    try:
        out = subprocess.run([path, "--version"], capture_output=True, text=True,
                             timeout=timeout, stdin=subprocess.DEVNULL)
    except (OSError, subprocess.TimeoutExpired):
        return "", "does not answer --version"
    text = out.stdout + out.stderr
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    flavour = classify(text)
    # Hydra's first line is 'HYDRA build details:'; its version is on the 'Version:' line.
    version = next((ln for ln in lines if ln.startswith("Version:")), lines[0] if lines else "")
    if flavour == "mpich" and version.startswith("Version:"):
        version = "Hydra " + version.split(":", 1)[1].strip()
    return flavour, version


def find_mpiexec(flavour, info=None, explicit=None):
    """Path of an ``mpiexec`` of ``flavour``; ``LaunchError`` naming every candidate otherwise."""
    candidates = [explicit] if explicit else mpiexec_candidates(info)
    seen = []
    for path in candidates:
        got, version = mpiexec_flavour(path)
        if got == flavour:
            return path
        seen.append(f"{path} is {NAMES.get(got, 'an unknown MPI')} ({version})")
    for_what = (f"mpi4py is built for {NAMES[flavour]} ({info.version})" if info
                else f"--mpi {flavour} was asked for")
    found = "; ".join(seen) if seen else "no mpiexec or mpirun next to libmpi, python or on PATH"
    raise LaunchError(f"{for_what} but no {NAMES[flavour]} mpiexec was found: {found}; put that "
                      f"MPI's bin directory first on PATH or pass --mpiexec PATH")


def build_command(launcher, np, program, hosts=None, env=None, oversubscribe=False,
                  mpiexec="mpiexec", hostfile_path=None, srun_pmi=None, as_root=None):
    """The argv (a list) that starts ``np`` ranks of ``program`` with ``launcher``.

    ``hosts`` None lets the launcher use its default (this machine, or the Slurm
    allocation for srun). Host lists longer than ``HOSTS_INLINE_MAX`` go through
    a hostfile written at ``hostfile_path`` in the launcher's own syntax.
    ``env`` is forwarded to every rank explicitly (``-genv``, ``-x``, or srun's
    inherited environment).
    """
    env = dict(env or {})
    program = list(program)
    if launcher == "srun":
        if hosts is not None:
            raise LaunchError("srun takes its hosts from the Slurm allocation; drop -H/--hostfile "
                              "or pass --mpi mpich|openmpi to use mpiexec with them")
        argv = [mpiexec, f"--ntasks={np}"]
        if srun_pmi:
            argv.append(f"--mpi={srun_pmi}")
        argv += ["--kill-on-bad-exit=1", "--export=ALL"]
        if oversubscribe:
            argv.append("--overcommit")
        return Command(argv + program, env)

    if launcher not in ("mpich", "openmpi"):
        raise LaunchError(f"unknown launcher {launcher!r}; expected one of {', '.join(LAUNCHERS)}")
    syntax = "hydra" if launcher == "mpich" else "openmpi"
    if launcher == "openmpi" and hosts is None:
        # Open MPI counts cores as slots: a local run of np ranks gets np slots (Horovod's -H localhost:np)
        hosts = [Host("localhost", np)]
    hostfile = None
    host_args = []
    if hosts is not None and len(hosts) > HOSTS_INLINE_MAX:
        if not hostfile_path:
            raise LaunchError(f"{len(hosts)} hosts need a generated hostfile but no path was given")
        hostfile = (hostfile_path, format_hostfile(hosts, syntax))
        host_args = ["-f" if launcher == "mpich" else "--hostfile", hostfile_path]
    elif hosts is not None:
        host_args = ["-hosts" if launcher == "mpich" else "--host", format_host_list(hosts)]

    argv = [mpiexec, "-n", str(np)] + host_args
    if launcher == "mpich":
        for key, value in env.items():
            argv += ["-genv", key, value]
    else:
        argv += ["--bind-to", "none"]  # ranks are multi-threaded NumPy processes; never pin each to one core
        if oversubscribe:
            argv.append("--oversubscribe")
        if (os.geteuid() == 0) if as_root is None else as_root:
            argv.append("--allow-run-as-root")
        for key, value in env.items():
            argv += ["-x", f"{key}={value}"]
    return Command(argv + program, {}, hostfile)


def is_python(program):
    """True when ``program`` names a Python interpreter (python, python3, python3.11, ...)."""
    return re.fullmatch(r"python[0-9.]*", os.path.basename(program)) is not None
