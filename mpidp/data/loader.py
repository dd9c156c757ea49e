"""Batches of a sampler's indices, read (and copied to the device) one batch ahead in a background thread."""
import queue
import threading

import numpy

from .. import timeline
from ..backend.xp import resolve_module
from .datasets import ArrayDataset
from .sampler import DistributedSampler

_END = object()


class _Failure:
    def __init__(self, exc):
        self.exc = exc


class Loader:
    """Iterable of (x, y) batches over the sampler's remaining indices of the current epoch.

    The sampler's position moves as batches are handed out (not as they are
    prefetched), so a checkpoint taken inside the loop resumes at the next
    batch. ``drop_last`` drops the final short batch (and counts it as seen).
    ``transform(x, y) -> (x, y)`` runs on host arrays in the prefetch thread.
    """

    def __init__(self, dataset, sampler=None, batch_size=32, drop_last=False, prefetch=1, device=None,
                 transform=None):
        if isinstance(dataset, (tuple, list)) and len(dataset) == 2:  # XY(x, y) or (x, y)
            dataset = ArrayDataset(*dataset)
        if not hasattr(dataset, "take") or not hasattr(dataset, "__len__"):
            raise TypeError(f"loader needs a data set with len() and take(indices) (e.g. "
                            f"mpidp.data.ArrayDataset(x, y)), not {type(dataset).__name__}")
        if sampler is None:
            sampler = DistributedSampler(len(dataset), shuffle=False, rank=0, size=1)
        if sampler.n_samples != len(dataset):
            raise ValueError(f"the sampler covers {sampler.n_samples} samples but the data set has {len(dataset)}; "
                             f"build it as DistributedSampler(len(dataset), ...)")
        if int(batch_size) < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if int(prefetch) < 0:
            raise ValueError(f"prefetch must be >= 0 batches, got {prefetch}")
        self.dataset, self.sampler = dataset, sampler
        self.batch_size, self.drop_last, self.prefetch = int(batch_size), bool(drop_last), int(prefetch)
        self.xp = numpy if device is None else resolve_module(device)
        self.transform = transform
        self._pass = None

    def __len__(self):
        """Batches left in the current epoch (all of them when it has not started or is finished)."""
        left = len(self.sampler) - self.sampler.position
        left = len(self.sampler) if left <= 0 else left
        return left // self.batch_size if self.drop_last else -(-left // self.batch_size)

    def _batches(self):
        pending = self.sampler.remaining()
        stop = len(pending) - len(pending) % self.batch_size if self.drop_last else len(pending)
        return [pending[i:i + self.batch_size] for i in range(0, stop, self.batch_size)], len(pending) - stop

    def __iter__(self):
        batches, dropped = self._batches()
        fetch = _Fetch(self.dataset, self.transform, self.xp)
        if self.prefetch == 0 or len(batches) <= 1:
            source = (fetch(b) for b in batches)
        else:
            source = _prefetched(fetch, batches, self.prefetch)
        return _hand_out(self.sampler, batches, dropped, source)

    def __next__(self):
        """``next(loader)`` walks one default pass, like ``next(iter(loader))`` kept open."""
        if self._pass is None:
            self._pass = iter(self)
        return next(self._pass)


class _Fetch:
    """Reads one batch (and copies it to the device); holds no reference to the Loader or its pass.

    The prefetch thread only sees this, so a pass that is dropped unfinished
    is garbage-collected, which closes it and stops the thread.
    """

    def __init__(self, dataset, transform, xp):
        self.dataset, self.transform, self.xp = dataset, transform, xp
        if xp is not numpy:  # CuPy's current device is per thread: the prefetch thread uses the caller's
            self.device = xp.cuda.Device()
            with self.device:
                self.stream = xp.cuda.Stream(non_blocking=True)

    def __call__(self, indices):
        with timeline.span("load_batch", "io", samples=len(indices)):
            x, y = self.dataset.take(indices)
            if self.transform is not None:
                x, y = self.transform(x, y)
        if self.xp is numpy:
            return x, y
        with timeline.span("h2d_batch", "copy", bytes=int(x.nbytes + y.nbytes)), self.device, self.stream:
            x, y = self.xp.asarray(x), self.xp.asarray(y)
            self.stream.synchronize()  # the consumer's stream may use them at once
        return x, y


def _hand_out(sampler, batches, dropped, source):
    """Yield the batches, moving the sampler's position as each one is handed out.

    A module function, not a Loader method: a pass kept in ``Loader._pass``
    must not point back at the Loader, so dropping the Loader frees the pass
    at once (closing it stops its prefetch thread).
    """
    try:
        for indices in batches:
            x, y = next(source)
            sampler.advance(len(indices))
            yield x, y
    finally:
        source.close()  # stops the prefetch thread when the caller leaves the loop early
    sampler.advance(dropped)


def _prefetched(fetch, batches, depth):
    """Yield ``fetch(b)`` for each batch, read ``depth`` ahead by a daemon thread."""
    q = queue.Queue(maxsize=depth)
    stopped = threading.Event()

    def put(item):
        while not stopped.is_set():
            try:
                q.put(item, timeout=0.05)
                return True
            except queue.Full:
                pass
        return False

    def produce():
        try:
            for b in batches:
                if not put(fetch(b)):
                    return
            put(_END)
        except BaseException as exc:  # handed to the consumer, which raises it in the training thread
            put(_Failure(exc))

    thread = threading.Thread(target=produce, name="mpidp-loader", daemon=True)
    thread.start()
    try:
        while True:
            with timeline.span("wait_batch", "wait"):
                item = q.get()
            if item is _END:
                return
            if isinstance(item, _Failure):
                raise item.exc
            yield item
    finally:
        stopped.set()
        thread.join()


def loader(dataset, sampler=None, batch_size=32, drop_last=False, prefetch=1, device=None, transform=None):
    """(x, y) batches of ``dataset`` in ``sampler`` order, ``prefetch`` batches read ahead (on ``device`` 'gpu')."""
    return Loader(dataset, sampler, batch_size, drop_last, prefetch, device, transform)
