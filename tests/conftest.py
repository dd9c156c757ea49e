"""Suite-wide rules: one suite for `python -m pytest` and for `mpiexec -n N python -m pytest`.

Outside MPI, tests/mpi/ runs in this process (1 rank) and again under mpiexec
at 2, 3 and 4 ranks through tests/test_mpi_driver.py. Under mpiexec every rank
runs the suite with mpidp's own pytest plugin (``mpidp = auto`` in setup.cfg):
ranks agree on every outcome, rank 0 reports once, a hung rank aborts the job.
"""
import pytest

from mpidp.backend import gpu_available
from mpidp.testing import world_size


def pytest_collection_modifyitems(config, items):
    no_gpu = pytest.mark.skip(reason="needs cupy and a CUDA device; this machine has none")
    nested = pytest.mark.skip(reason="launches mpiexec itself; run it outside mpiexec")
    under_mpi = world_size() > 1
    for item in items:
        # markers, not keywords: keywords also hold node names, and a folder or checkout called
        # 'gpu' (tests/gpu itself) would make every test under it a GPU test
        if item.get_closest_marker("gpu") and not gpu_available():
            item.add_marker(no_gpu)
        if item.get_closest_marker("spawns") and under_mpi:
            item.add_marker(nested)
