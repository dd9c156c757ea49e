"""Which gradients share a bucket: fixed at build time, reverse registration order."""
import numpy

from ..backend.xp import get_array_module


def plan_buckets(params, threshold_bytes, first_bucket_bytes=None, key=None):
    """Lists of indices into ``params`` (reverse order, one dtype and array module per bucket).

    Backward produces the last layers' gradients first, so the first bucket fills
    (and starts its allreduce) first. The first bucket is kept small, as in DDP,
    so communication starts early. A small tensor whose larger predecessor does
    not fit beside it starts the next bucket with it (see ``_leaves_its_layer``).
    ``key(p)`` (default: dtype and array module) must be equal within a bucket.
    """
    key = key or buffer_kind
    first = threshold_bytes if first_bucket_bytes is None else min(first_bucket_bytes, threshold_bytes)
    buckets, current, current_bytes, current_kind = [], [], 0, None
    for index in reversed(range(len(params))):
        p = params[index]
        limit = first if not buckets else threshold_bytes
        kind = key(p)
        if current and (current_kind != kind or current_bytes + p.nbytes > limit
                        or _leaves_its_layer(params, index, kind, key, limit - current_bytes, threshold_bytes)):
            buckets.append(current)
            current, current_bytes = [], 0
        current.append(index)
        current_bytes += p.nbytes
        current_kind = kind
    if current:
        buckets.append(current)
    return buckets


def _leaves_its_layer(params, index, kind, key, room, threshold):
    """True when ``params[index]`` fits in ``room`` bytes but the tensor before it (the next in
    reverse order) is larger and would not fit beside it, while the two fit in one bucket: most
    likely that tensor's layer's bias (a layer registers weight, then bias, and backward produces
    both at once), which would make the current bucket wait one more layer's backward for a few
    bytes. On the simulated 2x2 cluster (6 Linear 1024x1024, docs/cluster.md) every bucket but
    the first started one layer late that way."""
    p = params[index]
    if index == 0 or p.nbytes > room:
        return False
    q = params[index - 1]
    return (q.nbytes > p.nbytes and p.nbytes + q.nbytes > room and p.nbytes + q.nbytes <= threshold
            and key(q) == kind)


def buffer_kind(p):
    """(dtype, array module name) of ``p``'s gradient: buckets and their arenas hold one kind."""
    # host-tier (offloaded) gradients are NumPy while the rest may be CuPy: never one buffer
    return numpy.dtype(p.dtype), get_array_module(p.grad if p.grad is not None else p.data).__name__


def signature(names, params, buckets):
    """(field, value) pairs every rank must agree on: each parameter's name, shape, dtype, bucket."""
    rows = []
    for b, indices in enumerate(buckets):
        for i in indices:
            rows.append((f"parameter {names[i]!r}", (tuple(params[i].shape), str(params[i].dtype), b)))
    rows.append(("parameter count", len(params)))
    return tuple(rows)
