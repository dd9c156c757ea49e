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
        if isinstance(dataset, (tuple, list)) and len(dataset) == 2:
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

    def __len__(self):
        """Batches left in the current epoch (all of them when it has not started or is finished)."""
        left = len(self.sampler) - self.sampler.position
        left = len(self.sampler) if left <= 0 else left
        return left // self.batch_size if self.drop_last else -(-left // self.batch_size)

    def _batches(self):
        pending = self.sampler.remaining()
        stop = len(pending) - len(pending) % self.batch_size if self.drop_last else len(pending)
        return [pending[i:i + self.batch_size] for i in range(0, stop, self.batch_size)], len(pending) - stop

    def _fetch(self, indices, device, stream):
        with timeline.span("load_batch", "io", samples=len(indices)):
            x, y = self.dataset.take(indices)
            if self.transform is not None:
                x, y = self.transform(x, y)
        if self.xp is numpy:
            return x, y
        with timeline.span("h2d_batch", "copy", bytes=int(x.nbytes + y.nbytes)), device, stream:
            x, y = self.xp.asarray(x), self.xp.asarray(y)
            stream.synchronize()  # the consumer's stream may use them at once
        return x, y

    def __iter__(self):
        batches, dropped = self._batches()
        if self.xp is numpy:
            device = stream = None
        else:  # CuPy's current device is per thread: the prefetch thread uses the caller's
            device = self.xp.cuda.Device()
            with device:
                stream = self.xp.cuda.Stream(non_blocking=True)
        if self.prefetch == 0 or len(batches) <= 1:
            source = (self._fetch(b, device, stream) for b in batches)
        else:
            source = self._prefetched(batches, device, stream)
        try:
            for indices in batches:
                x, y = next(source)
                self.sampler.advance(len(indices))
                yield x, y
        finally:
            source.close()  # stops the prefetch thread when the caller leaves the loop early
        self.sampler.advance(dropped)

    def _prefetched(self, batches, device, stream):
        q = queue.Queue(maxsize=self.prefetch)
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
                    if not put(self._fetch(b, device, stream)):
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
