"""Multi-rank tests: rank-agnostic bodies that read rank/size and compare against NumPy."""
import numpy
import pytest

import mpidp
from mpidp.backend import bfloat16, cupy_module

mpidp.init()

FLOATS = ["float16", "float32", "float64"] + (["bfloat16"] if bfloat16 is not None else [])
INTS = ["int32", "int64"]
SHAPES = {"0d": (), "empty": (0, 3), "odd": (7, 5), "1d": (1031,), "large": (3, 700, 257)}
XPS = ["numpy"] + (["cupy"] if cupy_module() is not None else [])


@pytest.fixture
def rank():
    return mpidp.rank()


@pytest.fixture
def size():
    return mpidp.size()


@pytest.fixture(params=XPS)
def xp(request):
    return numpy if request.param == "numpy" else cupy_module()


def data(shape, dtype, seed, xp=numpy):
    """Deterministic per-seed test data that is exact in every dtype (small integers)."""
    rng = numpy.random.default_rng(seed)
    a = rng.integers(-8, 9, size=shape).astype(numpy.float64)
    return xp.asarray(a.astype(dtype))


def tol(dtype):
    dtype = numpy.dtype(dtype)
    return {2: 1e-2, 4: 1e-5, 8: 1e-12}.get(dtype.itemsize, 0) if dtype.kind == "f" or \
        dtype == bfloat16 else 0


@pytest.fixture(autouse=True)
def _remove_process_sets_after_each_test():
    """A test's process sets are removed after it (every rank alike), so a later test may create
    a set of the same ranks: add_process_set refuses a duplicate."""
    from mpidp.comm import process_set
    before = list(process_set._created)
    yield
    for ps in [p for p in process_set._created if p not in before]:
        mpidp.remove_process_set(ps)


def count_pool(monkeypatch):
    """Count the pinned pool's acquires and releases for the rest of the test: {"acquire", "release"}."""
    from mpidp.backend import pinned
    counts = {"acquire": 0, "release": 0}
    real_acquire, real_release = pinned.pool.acquire, pinned.pool.release

    def acquire(nbytes):
        counts["acquire"] += 1
        return real_acquire(nbytes)

    def release(buf):
        counts["release"] += 1
        return real_release(buf)

    monkeypatch.setattr(pinned.pool, "acquire", acquire)
    monkeypatch.setattr(pinned.pool, "release", release)
    return counts
