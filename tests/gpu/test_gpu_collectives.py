"""CuPy paths on a real GPU: staging through pinned buffers, stream sync, device binding.

Skipped with the reason on machines without cupy or a CUDA device (never faked).
Run them on a GPU machine with: mpiexec -n 2 python -m pytest tests/gpu tests/mpi
(tests/mpi also runs every collective on CuPy arrays when a GPU is present).
"""
import numpy
import pytest

import mpidp
from mpidp.backend import cupy_module, pinned

pytestmark = pytest.mark.gpu
cp = cupy_module()


@pytest.fixture(autouse=True)
def _init():
    mpidp.init()


def test_rank_is_bound_to_local_rank_modulo_device_count():
    from mpidp.comm import runtime
    count = cp.cuda.runtime.getDeviceCount()
    assert runtime.device() == mpidp.local_rank() % count
    assert cp.cuda.Device().id == runtime.device()


def test_staging_buffers_are_pinned_and_reused():
    buf = pinned.pool.acquire(1 << 20)
    ptr = buf.ctypes.data
    attrs = cp.cuda.runtime.pointerGetAttributes(ptr)
    assert attrs.type == cp.cuda.runtime.memoryTypeHost  # page-locked, registered with CUDA
    pinned.pool.release(buf)
    again = pinned.pool.acquire(1 << 20)
    assert again.ctypes.data == ptr  # reused, not reallocated
    pinned.pool.release(again)


def test_result_waits_for_the_producing_stream():
    """A kernel still running on a non-default stream must finish before MPI reads the data."""
    n = mpidp.size()
    stream = cp.cuda.Stream(non_blocking=True)
    with stream:
        x = cp.zeros(1 << 22, dtype=cp.float32)
        for _ in range(50):  # long enough that an unsynchronised read sees zeros
            x += 1.0
        got = mpidp.allreduce(x, op=mpidp.Sum)
    assert isinstance(got, cp.ndarray)
    assert float(got[0]) == 50.0 * n and float(got[-1]) == 50.0 * n


@pytest.mark.parametrize("dtype", ["float16", "float32", "float64", "int64"])
def test_allreduce_on_device_matches_host(dtype):
    n, r = mpidp.size(), mpidp.rank()
    host = (numpy.arange(1001) % 7 + r).astype(dtype)
    got = mpidp.allreduce(cp.asarray(host), op=mpidp.Sum)
    want = sum((numpy.arange(1001) % 7 + k).astype(numpy.float64) for k in range(n))
    numpy.testing.assert_allclose(cp.asnumpy(got).astype(numpy.float64), want, rtol=1e-3)


def test_cuda_aware_answer_says_how():
    aware, how = mpidp.cuda_aware(verbose=True)
    assert isinstance(aware, bool) and how
