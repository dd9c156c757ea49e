"""Dropout with a per-module, per-rank seeded generator whose state can be saved and restored."""
import numpy

from ...backend.xp import get_array_module
from .. import init
from ..module import Module


class Dropout(Module):
    """Zero each element with probability p and scale the rest by 1/(1-p) in training: x (...) -> (...)."""

    def __init__(self, p=0.5, seed=None):
        super().__init__()
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"Dropout probability must be in [0, 1], got {p}")
        self.p = float(p)
        # the stream is fixed at construction: (seed or global seed, rank, index of this Dropout)
        self._seed = (int(seed), 0) if seed is not None else (init.global_seed(), init.next_dropout_index())
        self._rng = None

    def _generator(self):
        if self._rng is None:  # made at first use, when the rank is known
            seed, index = self._seed
            self._rng = numpy.random.default_rng(numpy.random.SeedSequence([seed, init.process_rank(), index]))
        return self._rng

    def _get_rng_state(self):
        return self._generator().bit_generator.state

    def _set_rng_state(self, state):
        self._generator().bit_generator.state = state

    def forward(self, x):
        if not self.training or self.p == 0.0:
            self._save(None)
            return x
        xp = get_array_module(x)
        rng = self._generator()
        if xp is not numpy:  # the device generator is seeded from the host stream, so state stays on host
            rng = xp.random.default_rng(int(rng.integers(2 ** 63)))
        keep = rng.random(x.shape, dtype=numpy.float32) >= self.p
        self._save(keep)
        return x * keep * (1.0 / (1.0 - self.p)) if self.p < 1.0 else x * keep

    def _backward(self, dy):
        (keep,) = self._pop()
        if keep is None:
            return dy
        return dy * keep * (1.0 / (1.0 - self.p)) if self.p < 1.0 else dy * keep

    def extra_repr(self):
        return f"p={self.p}"
