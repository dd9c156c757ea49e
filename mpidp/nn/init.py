"""Seeded initialisers, the global seed (``manual_seed``) and the process rank, without importing MPI."""
import math
import sys

import numpy

_seed = {"seed": 0, "dropout_count": 0}
_default_rng = numpy.random.default_rng(0)


def manual_seed(seed):
    """Seed layer initialisation and dropout masks for everything built afterwards."""
    global _default_rng
    seed = int(seed)
    _seed["seed"] = seed
    _seed["dropout_count"] = 0
    _default_rng = numpy.random.default_rng(seed)


def default_rng():
    """The generator layers initialise from when no ``rng=`` is given."""
    return _default_rng


def global_seed():
    """The seed last given to ``manual_seed`` (0 before any call)."""
    return _seed["seed"]


def next_dropout_index():
    """0, 1, 2, ... per Dropout built since the last ``manual_seed``, so each draws its own stream."""
    i = _seed["dropout_count"]
    _seed["dropout_count"] = i + 1
    return i


def process_rank():
    """MPI rank of this process if mpi4py.MPI is already imported and initialised, else 0."""
    mpi_mod = sys.modules.get("mpi4py.MPI")
    if mpi_mod is None:
        return 0
    try:
        if mpi_mod.Is_initialized() and not mpi_mod.Is_finalized():
            return mpi_mod.COMM_WORLD.Get_rank()
    except Exception:  # a partially torn-down MPI at exit
        return 0
    return 0


def as_rng(rng):
    """A ``numpy.random.Generator`` from None (the global one), an int seed or a Generator."""
    if rng is None:
        return _default_rng
    if isinstance(rng, numpy.random.Generator):
        return rng
    return numpy.random.default_rng(rng)


def uniform(shape, bound, rng=None, dtype=numpy.float32):
    """U(-bound, bound) host array of ``shape``."""
    return as_rng(rng).uniform(-bound, bound, size=shape).astype(dtype)


def normal(shape, std=1.0, rng=None, dtype=numpy.float32):
    """N(0, std^2) host array of ``shape``."""
    return (as_rng(rng).standard_normal(size=shape) * std).astype(dtype)


def fan_in_uniform(shape, fan_in, rng=None, dtype=numpy.float32):
    """PyTorch's default for Linear/Conv weights and biases: U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
    return uniform(shape, 1.0 / math.sqrt(max(fan_in, 1)), rng, dtype)


def zeros(shape, dtype=numpy.float32):
    """Host zeros."""
    return numpy.zeros(shape, dtype=dtype)


def ones(shape, dtype=numpy.float32):
    """Host ones."""
    return numpy.ones(shape, dtype=dtype)
