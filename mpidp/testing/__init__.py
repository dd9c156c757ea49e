"""pytest plugin for MPI tests: ``mpirun -np N python -m pytest --mpidp`` and ``pytest --mpidp-np 2,4``.

Registered as a ``pytest11`` entry point, so every pytest run on a machine with mpidp loads
this module. It does nothing costly unless asked: MPI mode is on with ``--mpidp`` on the
command line (or in ``addopts`` / ``PYTEST_ADDOPTS``), the ini option ``mpidp = true``, or
``mpidp = auto`` in a process started by mpiexec; launcher mode with ``--mpidp-np``.
``-p mpidp.testing`` only loads the plugin (needed where ``PYTEST_DISABLE_PLUGIN_AUTOLOAD``
is set); it turns nothing on.

In MPI mode (``_session.py``) every rank agrees on each test's outcome, rank 0 prints the one
report, ranks > 0 write theirs to ``.mpidp-pytest/rank-<r>.log`` and a rank that hangs or
dies ends the job. ``--mpidp-np 2,4`` (``_launcher.py``) runs the tests marked ``mpi``
under ``mpiexec -n 2`` and ``-n 4`` from a plain ``pytest``; ``--mpidp-nodes 2x2,2+1`` runs them
on simulated clusters of those layouts (``mpidprun --simulate-nodes``, docs/cluster.md).

Always available, in any mode: the ``mpi(min_size=k, timeout=s)`` marker (skips with the
reason below ``k`` ranks) and the fixtures ``comm``, ``rank``, ``size`` and ``process_set``,
which import mpi4py only when a test asks for them.
"""
import os
import sys
from pathlib import Path

import pytest

__all__ = ["comm", "rank", "size", "process_set"]

DEFAULT_TIMEOUT_S = 300.0
DEFAULT_LAUNCH_TIMEOUT_S = 1800.0  # one whole child job of --mpidp-np
# Set in every rank's environment by MPICH's hydra and by Open MPI's prterun.
_RANK_VARIABLES = ("PMI_RANK", "OMPI_COMM_WORLD_RANK", "PMIX_RANK")
_SIZE_VARIABLES = ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE")
_MARKER = ("mpi(min_size=1, timeout=None): a test for several MPI ranks; skipped with the reason "
           "below min_size ranks; timeout overrides --mpidp-timeout for this test")


def pytest_addoption(parser):
    group = parser.getgroup("mpidp", "MPI tests (mpidp.testing)")
    group.addoption("--mpidp", action="store_true", default=False,
                    help="MPI mode, under mpirun: ranks agree on every outcome, rank 0 reports, "
                         "a hung or dead rank ends the job")
    group.addoption("--mpidp-timeout", type=float, default=None, metavar="SECONDS",
                    help="MPI mode: seconds a test (setup, call and teardown) may take on any rank "
                         "before the job is aborted; 0 = never (default: ini mpidp_timeout, 300)")
    group.addoption("--mpidp-log-dir", default=None, metavar="DIR",
                    help="MPI mode: where ranks > 0 write their output and rank 0 its results.jsonl "
                         "(default: ini mpidp_log_dir, <rootdir>/.mpidp-pytest)")
    group.addoption("--mpidp-np", default=None, metavar="N[,N...]",
                    help="without mpirun: also run the tests marked mpi under mpiexec -n N, "
                         "once for each N, as items 'file.py::[mpi np=N]'")
    group.addoption("--mpidp-nodes", default=None, metavar="LAYOUT[,LAYOUT...]",
                    help="without mpirun: also run the tests marked mpi on simulated clusters, e.g. "
                         "2x2,3x1,2+1 (mpidprun --simulate-nodes), as items 'file.py::[mpi nodes=2x2]'")
    group.addoption("--mpidp-link-rate", default=None, metavar="RATE",
                    help="--mpidp-nodes: limit the simulated nodes' link, e.g. 2gbit (mpidprun --link-rate)")
    group.addoption("--mpidp-launch-timeout", type=float, default=None, metavar="SECONDS",
                    help=f"--mpidp-np: seconds one mpiexec run may take before its process group is "
                         f"killed (default {DEFAULT_LAUNCH_TIMEOUT_S:g})")
    group.addoption("--mpidp-mpiexec", default=None, metavar="PATH",
                    help="--mpidp-np: the mpiexec to run (default: next to sys.executable, then PATH)")
    parser.addini("mpidp", default="false",
                  help="MPI mode: true (every run), auto (runs started by mpiexec) or false")
    parser.addini("mpidp_timeout", default=str(DEFAULT_TIMEOUT_S),
                  help="default of --mpidp-timeout")
    parser.addini("mpidp_log_dir", default="", help="default of --mpidp-log-dir (relative to rootdir)")


def launched_by_mpiexec():
    """Whether this process is an MPI rank started by mpiexec (read from the environment)."""
    return any(name in os.environ for name in _RANK_VARIABLES)


def mpi_mode_requested(config):
    """The activation rule of MPI mode: ``--mpidp``, or the ini option ``mpidp = true`` or ``auto``."""
    if config.getoption("mpidp"):
        return True
    value = str(config.getini("mpidp")).strip().lower()
    if value in ("auto",):
        return launched_by_mpiexec()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off", ""):
        return False
    raise pytest.UsageError(f"ini option mpidp={value!r} is not true, false or auto")


def _log_dir(config):
    option = config.getoption("mpidp_log_dir")
    if option:
        return Path(config.invocation_params.dir, option).resolve()
    ini = config.getini("mpidp_log_dir")
    return (config.rootpath / (ini or ".mpidp-pytest")).resolve()


def _timeout(config):
    value = config.getoption("mpidp_timeout")
    if value is None:
        raw = config.getini("mpidp_timeout")
        try:
            value = float(raw)
        except ValueError:
            raise pytest.UsageError(f"ini option mpidp_timeout={raw!r} is not a number of seconds; "
                                    "give e.g. 300, or 0 for no timeout") from None
    if value < 0:
        raise pytest.UsageError(f"--mpidp-timeout {value:g} is negative; give seconds, or 0 for none")
    return value


@pytest.hookimpl(trylast=True)  # after the terminal reporter exists: ranks > 0 replace it
def pytest_configure(config):
    config.addinivalue_line("markers", _MARKER)
    np_list, layouts = config.getoption("mpidp_np"), config.getoption("mpidp_nodes")
    if np_list or layouts:
        if launched_by_mpiexec():
            raise pytest.UsageError("--mpidp-np and --mpidp-nodes start MPI jobs themselves; run pytest "
                                    "without mpirun, or use --mpidp under mpirun")
        from ._launcher import Launcher

        config.pluginmanager.register(Launcher(config, np_list, _timeout(config), _log_dir(config), layouts,
                                               config.getoption("mpidp_link_rate")), "mpidp-launcher")
    if mpi_mode_requested(config):
        from ._session import MpiSession

        config.pluginmanager.register(MpiSession(config, _timeout(config), _log_dir(config)),
                                      "mpidp-session")


def world_size():
    """COMM_WORLD's size without initialising MPI: from mpi4py if it is up, else from the environment."""
    mpi = sys.modules.get("mpi4py.MPI")
    if mpi is not None and mpi.Is_initialized() and not mpi.Is_finalized():
        return mpi.COMM_WORLD.Get_size()
    for name in _SIZE_VARIABLES:
        if os.environ.get(name, "").isdigit():
            return int(os.environ[name])
    return 1


def pytest_collection_modifyitems(config, items):
    size = None
    for item in items:
        marker = item.get_closest_marker("mpi")
        if marker is None:
            continue
        unknown = sorted(set(marker.kwargs) - {"min_size", "timeout"})
        if marker.args or unknown:
            raise pytest.UsageError(f"{item.nodeid}: @pytest.mark.mpi takes the keywords min_size= and "
                                    f"timeout=, got {marker.args or unknown}; write mpi(min_size=2)")
        min_size = int(marker.kwargs.get("min_size", 1))
        size = world_size() if size is None else size
        if size < min_size:
            reason = f"needs at least {min_size} MPI ranks, running with {size}"
            item.add_marker(pytest.mark.skip(reason=reason))


@pytest.fixture(scope="session")
def comm():
    """mpi4py's ``MPI.COMM_WORLD`` (importing mpi4py initialises MPI)."""
    from mpi4py import MPI

    return MPI.COMM_WORLD


@pytest.fixture(scope="session")
def rank(comm):
    """This process's rank in ``COMM_WORLD``."""
    return comm.Get_rank()


@pytest.fixture(scope="session")
def size(comm):
    """The number of ranks in ``COMM_WORLD``."""
    return comm.Get_size()


@pytest.fixture(scope="session")
def process_set(size):
    """An ``mpidp.ProcessSet`` of every rank (initialises mpidp first if needed).

    Skipped with the reason where mpidp's comm layer cannot be imported.
    """
    try:
        import mpidp

        process_set_class = mpidp.ProcessSet
        if not mpidp.is_initialized():
            mpidp.init()
    except (ImportError, AttributeError) as exc:
        pytest.skip(f"mpidp.ProcessSet is not available ({exc})")
    return process_set_class(list(range(size)))
