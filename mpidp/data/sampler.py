"""DistributedSampler: every rank's equal share of one per-epoch permutation, resumable mid-epoch.

Pure index arithmetic: ``rank`` and ``size`` are arguments (read from the
runtime only when left out), so the maths is testable without MPI.
"""
import sys

import numpy


def _default_rank_size():
    """(rank, size) of mpidp's runtime if it was initialised, else (0, 1); never imports MPI."""
    runtime = sys.modules.get("mpidp.comm.runtime")
    if runtime is not None and runtime.is_initialized():
        return runtime.rank(), runtime.size()
    return 0, 1


class DistributedSampler:
    """This rank's indices of ``range(n_samples)``: equal shares of a permutation drawn from (seed, epoch).

    Every rank draws the same permutation, pads it by wrapping to a multiple of
    ``size`` (or drops the tail with ``drop_last``) and takes every ``size``-th
    index starting at ``rank``, so the shards are disjoint apart from the
    padding and together cover the data set. ``position`` counts the indices of
    the current epoch already consumed; it is saved by ``state_dict()`` so a
    resumed run continues mid-epoch.
    """

    def __init__(self, n_samples, shuffle=True, seed=0, drop_last=False, rank=None, size=None):
        n_samples, seed = int(n_samples), int(seed)
        if n_samples < 0:
            raise ValueError(f"n_samples must be >= 0, got {n_samples}")
        if seed < 0:
            raise ValueError(f"seed must be >= 0, got {seed}")
        if rank is None or size is None:
            default_rank, default_size = _default_rank_size()
            rank = default_rank if rank is None else rank
            size = default_size if size is None else size
        rank, size = int(rank), int(size)
        if size < 1 or not 0 <= rank < size:
            raise ValueError(f"rank {rank} is not in a job of size {size}; need 0 <= rank < size")
        self.n_samples, self.shuffle, self.seed, self.drop_last = n_samples, bool(shuffle), seed, bool(drop_last)
        self.rank, self.size = rank, size
        self.num_samples = n_samples // size if drop_last else -(-n_samples // size)
        self.total_size = self.num_samples * size
        self.epoch = 0
        self.position = 0
        self._cache = None  # (epoch, indices of this rank)

    def __len__(self):
        """Indices this rank yields per epoch (the same on every rank)."""
        return self.num_samples

    def set_epoch(self, epoch):
        """Select the permutation of ``epoch``: a new epoch starts at 0, the current one keeps its position."""
        epoch = int(epoch)
        if epoch < 0:
            raise ValueError(f"epoch must be >= 0, got {epoch}")
        if epoch != self.epoch:
            self.epoch, self.position = epoch, 0

    def global_indices(self, epoch=None):
        """The padded (or cut) permutation of ``epoch`` that all ranks share, ``total_size`` long."""
        epoch = self.epoch if epoch is None else int(epoch)
        if self.shuffle:
            order = numpy.random.default_rng([self.seed, epoch]).permutation(self.n_samples)
        else:
            order = numpy.arange(self.n_samples, dtype=numpy.int64)
        if self.total_size <= self.n_samples:
            return order[:self.total_size].astype(numpy.int64, copy=False)
        return numpy.resize(order, self.total_size).astype(numpy.int64, copy=False)  # wraps, even when n < size

    def indices(self, epoch=None):
        """This rank's whole shard of ``epoch`` (default: the current one), ``len(self)`` long."""
        epoch = self.epoch if epoch is None else int(epoch)
        if self._cache is None or self._cache[0] != epoch:
            self._cache = (epoch, self.global_indices(epoch)[self.rank::self.size])
        return self._cache[1]

    def remaining(self):
        """The indices of the current epoch not consumed yet; a finished epoch starts over."""
        if self.position >= self.num_samples:
            self.position = 0
        return self.indices()[self.position:]

    def advance(self, count):
        """Record that ``count`` more indices were consumed (the loader calls this as it yields a batch)."""
        self.position = min(self.position + int(count), self.num_samples)

    def __iter__(self):
        for index in self.remaining():
            self.position += 1
            yield int(index)

    def state_dict(self):
        """Epoch and position plus the settings that must match on resume (plain ints and bools)."""
        return {"epoch": self.epoch, "position": self.position, "n_samples": self.n_samples,
                "seed": self.seed, "shuffle": self.shuffle, "drop_last": self.drop_last, "size": self.size}

    def load_state_dict(self, state):
        """Continue where ``state`` stopped; a finished epoch continues with the next one."""
        for key in ("n_samples", "seed", "shuffle", "drop_last"):
            if key in state and state[key] != getattr(self, key):
                raise ValueError(f"sampler state has {key}={state[key]!r} but this sampler has "
                                 f"{key}={getattr(self, key)!r}; resume with the same data set and sampler settings")
        epoch, position = int(state["epoch"]), int(state["position"])
        saved_size = int(state.get("size", self.size))
        if saved_size != self.size:  # keep the number of samples consumed by the whole job
            position = position * saved_size // self.size
        if self.num_samples and position >= self.num_samples:
            epoch, position = epoch + 1, 0
        self.epoch, self.position = epoch, position
