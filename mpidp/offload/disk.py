"""The third tier: parameters and optimizer state as memory-mapped files on local disk."""
import os
import re
import shutil
import tempfile
import weakref

import numpy


class DiskTier:
    """Arrays backed by files in a private directory under ``directory``; ``close()`` deletes them,
    as does the end of the process (or of this object) when nobody called it."""

    def __init__(self, directory):
        os.makedirs(directory, exist_ok=True)
        self.directory = tempfile.mkdtemp(prefix="mpidp-offload-", dir=directory)  # one per process
        self._remove = weakref.finalize(self, shutil.rmtree, self.directory, ignore_errors=True)
        self.nbytes = 0
        self._count = 0

    def empty(self, name, shape, dtype):
        """A writeable ``numpy.memmap`` of ``shape`` and ``dtype`` (contents undefined)."""
        if self.directory is None:
            raise ValueError("this DiskTier is closed; create a new OffloadManager to offload to disk again")
        safe = re.sub(r"[^A-Za-z0-9_.-]", "_", name)[:80]
        path = os.path.join(self.directory, f"{self._count:05d}-{safe}.bin")
        self._count += 1
        shape = tuple(shape) or (1,)
        a = numpy.memmap(path, dtype=numpy.dtype(dtype), mode="w+", shape=shape)
        self.nbytes += a.nbytes
        return a

    def close(self):
        """Delete the files (arrays still mapped stay readable until dropped on POSIX)."""
        if self.directory is not None:
            self._remove()
            self.directory = None

    def __repr__(self):
        return f"DiskTier({self.directory!r}, {self.nbytes} bytes)"
