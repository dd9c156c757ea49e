"""Suite-wide rules: one suite for `python -m pytest` and for `mpiexec -n N python -m pytest`.

Outside MPI, tests/mpi/ runs in this process (1 rank) and again under mpiexec
at 2, 3 and 4 ranks through tests/test_mpi_driver.py. Under mpiexec every rank
runs the suite; a failure on any rank aborts the job (never a hang), and only
rank 0 reports to the terminal.
"""
import os
import sys

import pytest

from mpidp.backend import gpu_available

_SIZE_VARS = ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "PMIX_SIZE", "SLURM_NTASKS")


def launched_size():
    """Ranks in the enclosing MPI job, read from the launcher's environment (no MPI init)."""
    for var in _SIZE_VARS[:3]:
        if var in os.environ:
            return int(os.environ[var])
    return 1


def launched_rank():
    for var in ("PMI_RANK", "OMPI_COMM_WORLD_RANK", "PMIX_RANK"):
        if var in os.environ:
            return int(os.environ[var])
    return 0


UNDER_MPI = launched_size() > 1


@pytest.hookimpl(trylast=True)
def pytest_configure(config):
    if UNDER_MPI and launched_rank() > 0:
        # hydra interleaves ranks' stdout mid-line: only rank 0 reports; a failure on another
        # rank still reaches stderr through the abort hook below
        reporter = config.pluginmanager.get_plugin("terminalreporter")
        if reporter is not None:
            config.pluginmanager.unregister(reporter)


def pytest_collection_modifyitems(config, items):
    no_gpu = pytest.mark.skip(reason="needs cupy and a CUDA device; this machine has none")
    nested = pytest.mark.skip(reason="launches mpiexec itself; run it outside mpiexec")
    for item in items:
        if "gpu" in item.keywords and not gpu_available():
            item.add_marker(no_gpu)
        if "spawns" in item.keywords and UNDER_MPI:
            item.add_marker(nested)
        marker = item.get_closest_marker("mpi")
        if marker and launched_size() < marker.kwargs.get("min_size", 1):
            need = marker.kwargs["min_size"]
            item.add_marker(pytest.mark.skip(
                reason=f"needs at least {need} MPI ranks, running with {launched_size()}"))


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if UNDER_MPI and report.failed:
        # the other ranks would wait forever in this test's next collective: end the job now
        rank, size = launched_rank(), launched_size()
        sys.stderr.write(f"\n[rank {rank}/{size}] FAILED {item.nodeid} ({report.when})\n"
                         f"{report.longreprtext}\n")
        sys.stderr.flush()
        from mpi4py import MPI
        MPI.COMM_WORLD.Abort(1)
