"""A bucket: one flat gradient buffer whose slices are the parameters' ``.grad``."""
from ..backend.xp import get_array_module


class Bucket:
    """Flat buffer for ``params``; ``p.grad`` becomes a view into it, so packing costs no copy."""

    def __init__(self, index, params, names, compressor):
        self.index = index
        self.params = params
        self.names = names
        xp = get_array_module(params[0].data)
        dtype = params[0].dtype
        total = sum(p.size for p in params)
        self.flat = xp.zeros(total, dtype=dtype)
        offset = 0
        for p in params:
            view = self.flat[offset:offset + p.size].reshape(p.shape)
            if p.grad is not None:
                view[...] = p.grad
            p.grad = view
            offset += p.size
        wire = compressor.wire(dtype)
        self.wire = self.flat if wire == dtype else xp.empty(total, dtype=wire)
        self.nbytes = int(self.wire.nbytes)
        self.ready = 0
        self.handle = None

    @property
    def name(self):
        return f"gradients.bucket{self.index}[{self.names[0]}..{self.names[-1]}]"

    def rebind(self):
        """Point every ``p.grad`` at its view again (after a user replaced one)."""
        offset = 0
        for p in self.params:
            view = self.flat[offset:offset + p.size].reshape(p.shape)
            if p.grad is not view and p.grad is not None and p.grad.base is not self.flat:
                view[...] = p.grad
                p.grad = view
            offset += p.size

    def pack(self):
        """Fill the wire buffer (only when compressing: otherwise the grads are already in it)."""
        if self.wire is not self.flat:
            self.wire[...] = self.flat

    def unpack(self):
        if self.wire is not self.flat:
            self.flat[...] = self.wire
