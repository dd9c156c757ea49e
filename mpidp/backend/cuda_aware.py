"""Is the loaded MPI CUDA-aware? mpi4py cannot say, so ask the library itself."""
import ctypes
import os

from .. import _env

_LIBS = ("libmpi.so.40", "libmpi.so.12", "libmpi_abi.so.1", "libmpi.so")


def query_library():
    """(answer, how): MPIX_Query_cuda_support of the already-loaded libmpi, or (None, why not)."""
    for so in _LIBS:
        try:  # mpi4py loaded libmpi RTLD_LOCAL; RTLD_NOLOAD finds that copy without loading another
            lib = ctypes.CDLL(so, mode=os.RTLD_NOLOAD | os.RTLD_LAZY)
        except OSError:
            continue
        fn = getattr(lib, "MPIX_Query_cuda_support", None)
        if fn is not None:
            fn.restype = ctypes.c_int
            return bool(fn()), f"MPIX_Query_cuda_support() in {so}"
        return None, f"{so} has no MPIX_Query_cuda_support"
    return None, "no known libmpi is loaded"


def detect():
    """(cuda_aware, how) after MPI_Init: MPIDP_CUDA_AWARE wins, else the library's answer, else False."""
    forced = _env.get("MPIDP_CUDA_AWARE").lower()
    if forced in ("0", "false", "no", "off"):
        return False, "forced off by MPIDP_CUDA_AWARE"
    if forced in ("1", "true", "yes", "on"):
        return True, "forced on by MPIDP_CUDA_AWARE"
    if forced not in ("auto", ""):
        raise ValueError(f"MPIDP_CUDA_AWARE={forced!r} is not 0, 1 or auto")
    answer, how = query_library()
    if answer is None:
        return False, f"unknown ({how}); staging through host memory to be safe"
    return answer, how
