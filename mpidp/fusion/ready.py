"""Which buckets are complete: per-parameter counts of the backward passes that produced a gradient.

A bucket may start its reduction only when every gradient in it is final: each of
its parameters' gradient-ready hooks has fired ``passes`` times since the last
step or ``zero_grad``. Counting per parameter (not per bucket) keeps a parameter
that fired twice (a retried backward) from standing in for one that has not
fired yet; passes under ``no_sync()`` are not counted at all.
"""
from ..errors import MpidpError


class ReadyCounts:
    """Gradient-ready counts of ``buckets`` (each with ``params``, ``names``, ``index``, ``ready``)."""

    def __init__(self, buckets):
        self.buckets = buckets
        self._count = {id(p): 0 for b in buckets for p in b.params}
        self.reset()

    def reset(self):
        """Forget every pass (after a step, or ``zero_grad`` after a failed backward)."""
        for key in self._count:
            self._count[key] = 0
        for bucket in self.buckets:
            bucket.ready = 0

    def add(self, bucket, param, passes, started, counted=True):
        """Count one produced gradient; True when that made ``bucket`` complete (every parameter
        of it produced ``passes`` times).

        ``started``: the bucket's reduction is already under way (this gradient changed
        its buffer under MPI): an error naming the parameter and the bucket.
        ``counted=False`` (under ``no_sync()``): accumulated locally, not a pass.
        """
        if started:
            name = bucket.names[[id(p) for p in bucket.params].index(id(param))]
            raise MpidpError(f"gradient of {name!r} was computed again while {bucket.name} is being "
                             f"reduced: more backward passes than backward_passes_per_step={passes} "
                             f"before step(); call step() or zero_grad() first, or accumulate under no_sync()")
        if not counted:
            return False
        n = self._count[id(param)] = self._count[id(param)] + 1
        if n != passes:
            return False
        bucket.ready += 1
        return bucket.ready == len(bucket.params)

    def pending(self):
        """True when some gradient was produced since the last reset (a step is under way)."""
        return any(self._count.values())

    def complete(self, bucket):
        return bucket.ready == len(bucket.params)

    def force(self, bucket):
        """Treat ``bucket`` as complete (synchronize(): unused parameters' gradients are as they are)."""
        bucket.ready = len(bucket.params)
