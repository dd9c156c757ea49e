"""Checkpoint: a block whose activations are recomputed in backward instead of kept."""
from ..module import Module, _mode, _switch


class Checkpoint(Module):
    """Runs ``block`` keeping only its input; backward re-runs it (same dropout masks), then backpropagates."""

    def __init__(self, block):
        super().__init__()
        if not isinstance(block, Module):
            raise TypeError(f"Checkpoint wraps a Module, got {type(block).__name__}")
        self.block = block

    def forward(self, x):
        if not _mode.caching:
            return self.block(x)
        state = self.block.rng_state()
        with _switch(caching=False):
            y = self.block(x)
        self._save(x, state)
        return y

    def _backward(self, dy):
        x, state = self._pop()
        now = self.block.rng_state()
        self.block.set_rng_state(state)
        # uses were counted by the first forward; the recompute must not count them again
        with _switch(caching=True, counting=False, recomputing=True, depth=_mode.depth + 1):
            self.block(x)
        self.block.set_rng_state(now)
        return self.block.backward(dy)
