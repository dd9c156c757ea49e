"""Array modules, devices, streams and pinned host buffers. Never imports MPI."""
from .xp import (asnumpy, bfloat16, cupy_module, get_array_module, gpu_available, is_cupy,
                 is_float_dtype, resolve_module, to_module)

__all__ = ["asnumpy", "bfloat16", "cupy_module", "get_array_module", "gpu_available", "is_cupy",
           "is_float_dtype", "resolve_module", "to_module"]
