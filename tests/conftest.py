"""Suite-wide rules: one suite for `python -m pytest` and for `mpiexec -n N python -m pytest`.

Outside MPI, tests/mpi/ runs in this process (1 rank) and again under mpiexec
at 2, 3 and 4 ranks through tests/test_mpi_driver.py. Under mpiexec every rank
runs the suite with mpidp's own pytest plugin (``mpidp = auto`` in setup.cfg):
ranks agree on every outcome, rank 0 reports once, a hung rank aborts the job.
"""
import os
import sys

# One BLAS thread in this process, as in the ranks that tests start (_mpirun.clean_env): on a busy
# 2-core machine, OpenBLAS's second thread made small matrix products 4-6x slower (the training
# tests in tests/unit most). Set only while NumPy loads its BLAS, and only where the user chose no
# thread count: the jobs that tests start see the environment as it was given.
_THREADS = ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")
if "numpy" not in sys.modules and not any(name in os.environ for name in _THREADS):
    os.environ["OPENBLAS_NUM_THREADS"] = "1"
    try:
        import numpy  # noqa: F401
    finally:
        del os.environ["OPENBLAS_NUM_THREADS"]

import pytest  # noqa: E402

from mpidp.backend import gpu_available  # noqa: E402
from mpidp.testing import world_size  # noqa: E402


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


@pytest.fixture
def sigint_raises():
    """Python's default SIGINT handler for the test: a suite started in the background by a
    non-interactive shell inherits SIGINT ignored, and then no Ctrl-C can be tested."""
    import signal
    old = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, old)
