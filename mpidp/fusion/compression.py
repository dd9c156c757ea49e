"""Wire compression for gradients: what dtype a bucket travels in."""
import numpy

from ..backend.xp import bfloat16


class Compressor:
    """Gradients travel as ``wire_dtype`` (None: as they are) and come back in their own dtype."""

    def __init__(self, name, wire_dtype):
        self.name, self.wire_dtype = name, wire_dtype

    def wire(self, dtype):
        """The dtype a bucket of ``dtype`` travels in (never widens: float16 stays float16)."""
        if self.wire_dtype is None or numpy.dtype(dtype).kind != "f":
            return numpy.dtype(dtype)
        if numpy.dtype(dtype).itemsize <= self.wire_dtype.itemsize:
            return numpy.dtype(dtype)
        return self.wire_dtype

    def __repr__(self):
        return f"mpidp.Compression.{self.name}"


class Compression:
    """Horovod's names: ``none``, ``fp16``; and ``bf16`` where ml_dtypes is installed."""

    none = Compressor("none", None)
    fp16 = Compressor("fp16", numpy.dtype(numpy.float16))
    bf16 = Compressor("bf16", bfloat16) if bfloat16 is not None else None

    @staticmethod
    def by_name(name):
        """'none' | 'fp16' | 'bf16' -> a compressor (for command lines)."""
        found = {"none": Compression.none, "fp16": Compression.fp16, "bf16": Compression.bf16}.get(name)
        if found is None:
            why = "install ml_dtypes for bf16" if name == "bf16" else "use none, fp16 or bf16"
            raise ValueError(f"compression {name!r} is not available: {why}")
        return found
