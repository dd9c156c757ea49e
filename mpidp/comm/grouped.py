"""Grouped allgather and reducescatter: many tensors queued as one group, one handle for all.

The tensors' collectives are queued back to back, so no other collective of
this process runs between them, and every rank issues them in list order.
"""
from . import collectives
from .dlpack import grouped_op
from .engine import engine_for
from .ops import Average
from .process_set import resolve


def _group(kind, tensors, name, process_set, start):
    """Queue ``start(tensor, name)`` for each tensor on the set's engine; one Handle whose result
    is the list of results. The group is numbered on its own communicator, like every collective."""
    _, comm = resolve(process_set)
    eng = engine_for(comm)
    seq = eng.started()
    name = name or f"{kind}.{seq}"
    handles = [start(t, f"{name}[{i}]") for i, t in enumerate(tensors)]
    return eng.submit(lambda: None, name, seq, lambda _: _wait_all(handles))


def _wait_all(handles):
    """Every member's result; a member that raised raises here, once all are finished (each
    finish gives its staging buffers back)."""
    results, error = [], None
    for h in handles:
        try:
            results.append(h.wait())
        except BaseException as exc:
            error = error or exc
    if error is not None:
        raise error
    return results


def _allgather(tensors, name, process_set):
    return _group("grouped_allgather", tensors, name, process_set,
                  lambda t, n: collectives.allgather_async(t, name=n, process_set=process_set))


def _reducescatter(tensors, op, name, process_set, prescale_factor, postscale_factor):
    return _group("grouped_reducescatter", tensors, name, process_set,
                  lambda t, n: collectives.reducescatter_async(t, op, n, process_set, prescale_factor,
                                                               postscale_factor))


@grouped_op
def grouped_allgather(tensors, name=None, process_set=None):
    """Each tensor gathered along axis 0 from every rank (first dimensions may differ); a list."""
    return _allgather(tensors, name, process_set).wait()


@grouped_op
def grouped_allgather_async(tensors, name=None, process_set=None):
    """Start grouped_allgather; ``synchronize(handle)`` returns the list."""
    return _allgather(tensors, name, process_set)


@grouped_op
def grouped_reducescatter(tensors, op=Average, name=None, process_set=None, prescale_factor=1.0,
                          postscale_factor=1.0):
    """Each tensor reduced over the ranks, this rank's rows of each kept (the first ranks get one more)."""
    return _reducescatter(tensors, op, name, process_set, prescale_factor, postscale_factor).wait()


@grouped_op
def grouped_reducescatter_async(tensors, op=Average, name=None, process_set=None, prescale_factor=1.0,
                                postscale_factor=1.0):
    """Start grouped_reducescatter; ``synchronize(handle)`` returns the list."""
    return _reducescatter(tensors, op, name, process_set, prescale_factor, postscale_factor)


__all__ = ["grouped_allgather", "grouped_allgather_async", "grouped_reducescatter",
           "grouped_reducescatter_async"]
