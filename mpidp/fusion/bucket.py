"""A bucket: one flat gradient buffer whose slices are the parameters' ``.grad``."""


class Bucket:
    """``params``' gradients as one flat buffer: each ``p.grad`` becomes a view into ``flat``.

    ``flat`` (and ``wire``, the buffer that travels: ``flat`` itself unless compressing) are
    slices of arenas the DistributedOptimizer allocates once per dtype: big enough for huge
    pages, which made MPI's copies of ResNet-50's gradients 1.5x faster than one allocation
    per bucket.
    """

    def __init__(self, index, params, names, flat, wire):
        self.index = index
        self.params = params
        self.names = names
        self.flat, self.wire = flat, wire
        offset = 0
        self.views = []  # each p.grad as the bucket made it: a grad that is not one was replaced
        for p in params:
            view = flat[offset:offset + p.size].reshape(p.shape)
            if p.grad is not None:
                view[...] = p.grad
            p.grad = view
            self.views.append(view)
            offset += p.size
        self.nbytes = int(wire.nbytes)
        self.ready = 0
        self.handle = None

    @property
    def name(self):
        return f"gradients.bucket{self.index}[{self.names[0]}..{self.names[-1]}]"

    def rebind(self):
        """Point every ``p.grad`` at its view again (after a user replaced one)."""
        for p, view in zip(self.params, self.views):
            if self._replaced(p, view):
                view[...] = p.grad
                p.grad = view

    def replaced(self):
        """Name of the first parameter whose ``grad`` a user replaced by an array of its own, or None."""
        for p, name, view in zip(self.params, self.names, self.views):
            if self._replaced(p, view):
                return name
        return None

    def _replaced(self, p, view):
        return p.grad is not view and p.grad is not None and not _shares(p.grad, self.flat)


def _shares(a, flat):
    """True when ``a`` is one of the bucket's own views (its base is the bucket's base)."""
    return a.base is not None and (a.base is flat or a.base is flat.base)
