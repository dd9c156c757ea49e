"""Reduction operations, their MPI ops, and MPI datatypes for every dtype users train with."""
import numpy
from mpi4py import MPI

from ..backend.xp import bfloat16


class ReduceOp:
    """A named reduction; compare with ``mpidp.Sum`` etc."""

    def __init__(self, name, mpi_op, ufunc):
        self.name, self.mpi_op, self.ufunc = name, mpi_op, ufunc

    def __repr__(self):
        return f"mpidp.{self.name}"

    def __reduce__(self):  # pickles as the module-level singleton
        return self.name


Sum = ReduceOp("Sum", MPI.SUM, numpy.add)
Average = ReduceOp("Average", MPI.SUM, numpy.add)  # summed on the wire, divided after
Min = ReduceOp("Min", MPI.MIN, numpy.minimum)
Max = ReduceOp("Max", MPI.MAX, numpy.maximum)
Product = ReduceOp("Product", MPI.PROD, numpy.multiply)
OPS = (Sum, Average, Min, Max, Product)

_NATIVE = {numpy.dtype(t): m for t, m in [
    (numpy.float32, MPI.FLOAT), (numpy.float64, MPI.DOUBLE), (numpy.int8, MPI.INT8_T),
    (numpy.int16, MPI.INT16_T), (numpy.int32, MPI.INT32_T), (numpy.int64, MPI.INT64_T),
    (numpy.uint8, MPI.UINT8_T), (numpy.uint16, MPI.UINT16_T), (numpy.uint32, MPI.UINT32_T),
    (numpy.uint64, MPI.UINT64_T), (numpy.bool_, MPI.C_BOOL), (numpy.complex64, MPI.C_FLOAT_COMPLEX),
    (numpy.complex128, MPI.C_DOUBLE_COMPLEX)]}
# MPI has no 16-bit float types: they travel as 16-bit words and reduce with our own ops
HALF = [numpy.dtype(numpy.float16)] + ([bfloat16] if bfloat16 is not None else [])
_user_ops = {}


def check_dtype(dtype, what):
    """Raise TypeError for dtypes MPI collectives cannot carry (objects, strings, ...)."""
    dtype = numpy.dtype(dtype)
    if dtype not in _NATIVE and dtype not in HALF:
        raise TypeError(f"{what} has dtype {dtype}, which mpidp collectives do not carry; "
                        f"use a numeric array (float16/32/64, bfloat16, int8-64, uint8-64, bool, complex64/128)")
    return dtype


_names = {}


def dtype_name(dtype):
    """``dtype.name``, cached: NumPy computes it in Python (3-4 us per call on a slow core)."""
    name = _names.get(dtype)
    if name is None:
        name = _names[dtype] = numpy.dtype(dtype).name
    return name


def mpi_type(dtype):
    """The MPI datatype a buffer of ``dtype`` is sent as."""
    dtype = numpy.dtype(dtype)
    return MPI.UINT16_T if dtype in HALF else _NATIVE[dtype]


# bool: Sum and Max are "any", Min and Product "all" (NumPy's add/maximum and minimum/multiply on bool)
_BOOL_OPS = {"Sum": MPI.LOR, "Max": MPI.LOR, "Min": MPI.LAND, "Product": MPI.LAND}


def check_reduction(op, dtype, what, scaled=False):
    """Raise TypeError (before any communication) where ``op`` (or a scale factor) is not defined for
    ``dtype``: an average or scaling of integers or bool, an order of complex numbers."""
    dtype = numpy.dtype(dtype)
    exact = dtype.kind in "fc" or dtype in HALF
    if dtype.kind == "b" and (op is Average or scaled):
        raise TypeError(f"{what} is bool: op={op} or a scale factor has no bool meaning; use mpidp.Sum or "
                        f"Max (any rank true) or Min or Product (every rank true)")
    if not exact and (op is Average or scaled):
        raise TypeError(f"{what} is an integer tensor ({dtype}): an integer average (op={op} or a scale "
                        f"factor) is not exact; use op=mpidp.Sum and divide yourself")
    if dtype.kind == "c" and op in (Min, Max):
        raise TypeError(f"{what} is complex ({dtype}): op={op} needs an order complex numbers do not have; "
                        f"use Sum, Average or Product, or reduce the real and imaginary parts yourself")


def mpi_op(op, dtype):
    """The MPI.Op that reduces ``dtype`` with ``op``: MPI's own, logical ones for bool, and NumPy's
    ufunc (user-defined) for 16-bit floats and for float Min/Max, where MPI's comparison drops a
    NaN (MPICH: np=3 Min of float32 gave neither NaN nor the minimum) and NumPy keeps it."""
    dtype = numpy.dtype(dtype)
    if dtype.kind == "b":
        return _BOOL_OPS[op.name]
    if dtype not in HALF and not (dtype.kind == "f" and op in (Min, Max)):
        return op.mpi_op
    key = (op.name, dtype_name(dtype))
    if key not in _user_ops:
        _user_ops[key] = MPI.Op.Create(_ufunc_reducer(op.ufunc, dtype), commute=True)
    return _user_ops[key]


def _ufunc_reducer(ufunc, dtype):
    def reduce(inbuf, inoutbuf, datatype):
        a = numpy.frombuffer(inbuf, dtype=dtype)
        b = numpy.frombuffer(inoutbuf, dtype=dtype)
        ufunc(a, b, out=b)
    return reduce


def as_op(op):
    """Accept the singletons (and their names) only."""
    if isinstance(op, ReduceOp):
        return op
    for known in OPS:
        if op == known.name or op == known.name.lower():
            return known
    raise ValueError(f"unknown reduction op {op!r}; use mpidp.Sum, Average, Min, Max or Product")
