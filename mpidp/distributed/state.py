"""Keep replicas identical: broadcast parameters and optimizer state, verify bit-identity."""
import hashlib

import numpy

from ..backend.xp import asnumpy
from ..comm import check, collectives, objects, process_set as _ps
from ..errors import MismatchError, describe_ranks
from .optimizer import _Rounds


def _named_arrays(model_or_params):
    """(name, array) pairs: a Module's parameters and buffers, a state dict, or Parameters."""
    if hasattr(model_or_params, "named_parameters"):
        named = [(n, p.data) for n, p in model_or_params.named_parameters()]
        if hasattr(model_or_params, "named_buffers"):
            named += list(model_or_params.named_buffers())
        return named
    if isinstance(model_or_params, dict):
        return list(model_or_params.items())
    out = []
    for i, item in enumerate(model_or_params):
        name, p = item if isinstance(item, tuple) else (getattr(item, "name", None) or f"param.{i}", item)
        out.append((name, getattr(p, "data", p)))
    return out


def broadcast_parameters(model_or_params, root_rank=0, process_set=None):
    """Overwrite every rank's parameters (and buffers) with ``root_rank``'s, in place."""
    for name, array in _named_arrays(model_or_params):
        if not hasattr(array, "shape"):
            raise TypeError(f"broadcast_parameters: {name!r} is a {type(array).__name__}, not an array")
        if array.ndim == 0 and not getattr(getattr(array, "flags", None), "writeable", True):
            raise ValueError(f"broadcast_parameters: {name!r} is read-only; make it a writeable array")
        collectives.broadcast_(array, root_rank, name=name, process_set=process_set)


def _state_order(params, model):
    """(name, parameter) in the order the state goes out: the model's, by name, when it is given
    (then ranks whose optimizers list the parameters in different orders still match them up)."""
    if model is None:
        return [(str(i), p) for i, p in enumerate(params)]
    owned = {id(p) for p in params}
    named = [(n, p) for n, p in model.named_parameters() if id(p) in owned]
    if len(named) != len(owned):
        raise ValueError(f"broadcast_optimizer_state: {len(owned) - len(named)} of the optimizer's parameters "
                         f"are not parameters of the model given; pass the model that owns them")
    return named


def broadcast_optimizer_state(optimizer, root_rank=0, process_set=None, model=None):
    """Make every rank's optimizer state (moments included, even if not created yet) root's.

    The state travels as the optimizer's ``state_dict()`` and is loaded back, so what a wrapper
    such as ``amp.MixedPrecision`` keeps goes too (float32 masters, step counts, the loss scale).
    With ``model`` the state is matched by parameter name instead of position, and the names
    are checked across ranks. For a ShardedOptimizer only the hyperparameters (and a loss
    scale) are broadcast: its state is per-rank shards.
    """
    # only the data-parallel wrapper is taken off: a MixedPrecision's state is its masters' too
    inner = optimizer.optimizer if isinstance(optimizer, _Rounds) else optimizer
    inner.init_state()  # lazily created state must exist everywhere before it is broadcast
    groups = objects.broadcast_object(
        [{k: v for k, v in g.items() if k != "params"} for g in inner.param_groups],
        root_rank, name="optimizer.param_groups", process_set=process_set)
    if len(groups) != len(inner.param_groups):
        raise MismatchError(f"broadcast_optimizer_state: rank {root_rank} has {len(groups)} parameter "
                            f"groups, this rank {len(inner.param_groups)}; build the same optimizer everywhere",
                            tensor="optimizer.param_groups", field="groups")
    for group, hyper in zip(inner.param_groups, groups):
        group.update(hyper)
    sd = inner.state_dict()
    extra = sorted(k for k in sd if k not in ("state", "param_groups"))  # amp's loss scaler
    for key in extra:
        sd[key] = objects.broadcast_object(sd[key], root_rank, name=f"optimizer.{key}", process_set=process_set)
    if getattr(optimizer, "sharded", False):
        _shards_step_together(sd, process_set)
        if extra:  # each rank owns a different shard of the state: it keeps its own (masters untouched: until the
            # first step they follow the model, which broadcast_parameters may still change)
            inner.load_state_dict({**sd, "state": {i: {k: v for k, v in entry.items() if k != "master"}
                                                   for i, entry in sd["state"].items()}})
        return
    params = [p for g in inner.param_groups for p in g["params"]]
    index = {id(p): i for i, p in enumerate(params)}
    for pname, p in _state_order(params, model):
        entry = sd["state"].get(index[id(p)], {})
        for key, value in sorted(entry.items()):
            name = f"optimizer.state[{pname}].{key}"
            if hasattr(value, "shape") and value.ndim > 0:
                collectives.broadcast_(value, root_rank, name=name, process_set=process_set)
            else:
                entry[key] = objects.broadcast_object(value, root_rank, name=name, process_set=process_set)
    inner.load_state_dict(sd)


def _shards_step_together(sd, process_set):
    """Raise MismatchError on every rank unless the ranks' shards hold the same step counts (and other
    scalars): ShardedOptimizer.load_state_dict keeps only this rank's part of a state, so a state
    loaded on the root alone leaves the other shards as they were, and no broadcast can mend that."""
    mine = [(i, key, value.item() if hasattr(value, "item") else value)
            for i, entry in sorted(sd["state"].items()) for key, value in sorted(entry.items())
            if not (hasattr(value, "shape") and value.ndim > 0)]
    rows = objects.allgather_object(mine, name="optimizer.shard_scalars", process_set=process_set)
    if any(row != rows[0] for row in rows):
        ranks = check._world_ranks(_ps.resolve(process_set)[1])
        seen = {ranks[r]: dict(((i, k), v) for i, k, v in row) for r, row in enumerate(rows)}
        key = next(k for k in sorted(set().union(*seen.values()))
                   if len({repr(s.get(k)) for s in seen.values()}) > 1)
        raise MismatchError(f"broadcast_optimizer_state: the ShardedOptimizer's shards hold different "
                            f"state[{key[0]}][{key[1]!r}] ({describe_ranks({r: s.get(key) for r, s in seen.items()})}); "
                            f"a state loaded on some ranks only: call load_state_dict on every rank (each "
                            f"keeps its own part)", tensor=f"optimizer.state[{key[0]}]", field=key[1],
                            ranks={r: s.get(key) for r, s in seen.items()})


def _digest(array):
    host = numpy.ascontiguousarray(asnumpy(array))
    return int.from_bytes(hashlib.blake2b(host.tobytes(), digest_size=8).digest(), "little") & ((1 << 62) - 1)


def check_replicas(model_or_params, process_set=None):
    """Raise MismatchError on every rank unless all ranks hold bit-identical parameters and buffers.

    Returns the number of arrays compared. One small allgather; details only on a difference.
    """
    named = _named_arrays(model_or_params)
    digests = numpy.array([_digest(a) for _, a in named], dtype=numpy.int64)
    table = collectives.allgather(digests[None, :] if digests.size else numpy.zeros((1, 0), numpy.int64),
                                  name="check_replicas", process_set=process_set)
    _, comm = _ps.resolve(process_set)
    ranks = check._world_ranks(comm)
    differing = numpy.nonzero((table != table[0]).any(axis=0))[0]
    if differing.size:
        i = int(differing[0])
        groups = {ranks[r]: f"digest {int(table[r, i]):x}" for r in range(table.shape[0])}
        names = [named[j][0] for j in differing[:5]]
        raise MismatchError(
            f"replicas differ in {differing.size} of {len(named)} arrays, first {named[i][0]!r} "
            f"({describe_ranks(groups)}); differing: {names}{'...' if differing.size > 5 else ''}; "
            f"broadcast_parameters() from one rank and make every rank apply the same updates",
            tensor=named[i][0], field="value", ranks=groups)
    return len(named)
