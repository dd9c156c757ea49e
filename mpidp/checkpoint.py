"""Atomic checkpoints of model, optimizer, sampler, loss scaler and RNG state: rank 0 writes, load broadcasts.

One checkpoint is one ``ckpt-<step:08d>.npz`` that loads with
``allow_pickle=False``: every array under a flat key (``model/<name>``,
``optim/state/<index>/<key>``, ...) and a JSON ``meta`` holding the format
version, the step, the model signature, the structure of the nested states
(with array leaves referring to keys) and a crc32 per array. Rank 0 writes a
temporary file in the same directory, fsyncs it, renames it over the final
name and fsyncs the directory, so a crash mid-save leaves the previous
checkpoint as it was. Every failure is decided on rank 0 and raised on every
rank as ``CheckpointError``.
"""
import errno
import json
import os
import re
import secrets
import time
import zlib

import numpy

from . import timeline
from ._version import __version__
from .backend.xp import asnumpy, bfloat16
from .comm import runtime
from .comm.collectives import broadcast_
from .comm.objects import allgather_object, broadcast_object
from .errors import CheckpointError

FORMAT = 1
_FILE = re.compile(r"^ckpt-(\d{8,})\.npz$")
_TEMP = re.compile(r"^\.ckpt-.*\.npz\.tmp$")
_NO_ROOM = (errno.ENOSPC, errno.EFBIG, errno.EDQUOT)


# --- file names -------------------------------------------------------------------------------

def checkpoint_path(directory, step):
    """The file ``save`` writes for ``step`` in ``directory``."""
    return os.path.join(os.fspath(directory), f"ckpt-{int(step):08d}.npz")


def list_checkpoints(directory):
    """[(step, path)] of the checkpoints in ``directory``, oldest step first ([] if it does not exist)."""
    try:
        names = os.listdir(directory)
    except (FileNotFoundError, NotADirectoryError):
        return []
    found = [(int(m.group(1)), os.path.join(directory, n)) for n in names if (m := _FILE.match(n))]
    return sorted(found)


def latest(directory):
    """Path of the checkpoint with the highest step in ``directory``, or None. Each rank reads its own view
    of the folder: to decide something all ranks do (load or not), read it on one rank and broadcast."""
    found = list_checkpoints(directory)
    return found[-1][1] if found else None


def latest_step(directory):
    """Highest step saved in ``directory``, or None."""
    found = list_checkpoints(directory)
    return found[-1][0] if found else None


# --- nested state <-> JSON tree + arrays under flat keys ------------------------------------------

def _is_array(x):
    return hasattr(x, "shape") and hasattr(x, "dtype") and not isinstance(x, numpy.generic)


def _encode(obj, key, arrays):
    """JSON-able tree of ``obj`` with each array moved to ``arrays[key...]`` and left as a reference."""
    if _is_array(obj):
        arrays[key] = asnumpy(obj)
        return {"__array__": key}
    if isinstance(obj, numpy.generic):
        arrays[key] = numpy.asarray(obj)
        return {"__scalar__": key}
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if isinstance(obj, (list, tuple)):
        items = [_encode(v, f"{key}/{i}", arrays) for i, v in enumerate(obj)]
        return items if isinstance(obj, list) else {"__tuple__": items}
    if isinstance(obj, dict):
        if all(isinstance(k, str) and not k.startswith("__") for k in obj):
            return {k: _encode(v, f"{key}/{k}", arrays) for k, v in obj.items()}
        for k in obj:
            if not isinstance(k, (str, int, float, bool)) or k is None:
                raise TypeError(f"cannot store the dict key {k!r} ({type(k).__name__}) at {key!r}; "
                                f"use str or int keys")
        return {"__items__": [[k, _encode(v, f"{key}/{k}", arrays)] for k, v in obj.items()]}
    raise TypeError(f"cannot store a {type(obj).__name__} at {key!r}; checkpoints hold arrays, "
                    f"numbers, strings, None, lists, tuples and dicts")


def _decode(node, arrays, copy=False):
    """Inverse of ``_encode``; ``copy`` detaches arrays from the receive buffer."""
    if isinstance(node, list):
        return [_decode(v, arrays, copy) for v in node]
    if not isinstance(node, dict):
        return node
    if "__array__" in node:
        a = arrays[node["__array__"]]
        return a.copy() if copy else a
    if "__scalar__" in node:
        return arrays[node["__scalar__"]][()]
    if "__tuple__" in node:
        return tuple(_decode(v, arrays, copy) for v in node["__tuple__"])
    if "__items__" in node:
        return {k: _decode(v, arrays, copy) for k, v in node["__items__"]}
    return {k: _decode(v, arrays, copy) for k, v in node.items()}


def _dtype(name):
    return bfloat16 if name == "bfloat16" else numpy.dtype(name)


def _crc(a):
    return zlib.crc32(numpy.ascontiguousarray(a).reshape(-1).view(numpy.uint8))


# --- save -----------------------------------------------------------------------------------------

def _rank_state(model, rng):
    """This rank's RNG states (they differ per rank: dropout streams are seeded with the rank)."""
    state = {"numpy": numpy.random.get_state()}
    if hasattr(model, "rng_state"):
        state["model"] = model.rng_state()
    if rng is not None:
        gens = rng if isinstance(rng, dict) else {"rng": rng}
        state["rng"] = {name: g.bit_generator.state for name, g in gens.items()}
    return state


def _collect(model_state, states, step, extra, ranks):
    """(arrays to write, meta) of one checkpoint; runs on rank 0."""
    arrays, trees, signature = {}, {}, []
    for name, value in model_state.items():
        key = f"model/{name}"
        arrays[key] = asnumpy(value)
        signature.append([name, list(arrays[key].shape), arrays[key].dtype.name])
    for part, state in states.items():
        trees[part] = _encode(state, part, arrays)
    trees["extra"] = _encode(extra, "extra", arrays)
    trees["ranks"] = _encode(ranks, "rank", arrays)
    dtypes = {}
    for key, a in arrays.items():
        if a.dtype.kind == "V":  # bfloat16 and other extension dtypes: stored as raw bits, the name in meta
            dtypes[key] = a.dtype.name
            size = a.dtype.itemsize
            arrays[key] = a.view(f"u{size}" if size in (1, 2, 4, 8) else f"V{size}")
        arrays[key] = numpy.ascontiguousarray(arrays[key])
    meta = {"format": FORMAT, "step": int(step), "size": len(ranks), "time": time.time(),
            "mpidp": __version__, "model": signature, "trees": trees, "dtypes": dtypes,
            "crc32": {key: _crc(a) for key, a in arrays.items()}}
    return arrays, meta


def _fsync_dir(directory):
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write(directory, step, keep, arrays, meta):
    """Write atomically, then keep the newest ``keep``; returns the path."""
    made = []
    head = os.path.abspath(directory)
    while not os.path.isdir(head):  # the folders this save makes: each one's entry synced in its parent
        made.append(head)
        head = os.path.dirname(head)
    os.makedirs(directory, exist_ok=True)
    for folder in reversed(made):
        _fsync_dir(os.path.dirname(folder))
    for name in os.listdir(directory):  # left by a save that was killed; only rank 0 writes here
        if _TEMP.match(name):
            os.remove(os.path.join(directory, name))
    final = checkpoint_path(directory, step)
    blob = json.dumps(meta).encode()
    arrays = {**arrays, "meta": numpy.frombuffer(blob, dtype=numpy.uint8),
              "meta.crc32": numpy.array(zlib.crc32(blob), dtype=numpy.uint32)}
    tmp = os.path.join(directory, f".ckpt-{int(step):08d}-{os.getpid()}-{secrets.token_hex(4)}.npz.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # the umask applies (mkstemp: 0600)
    try:
        with os.fdopen(fd, "wb") as f:
            numpy.savez(f, **arrays)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, final)
    except BaseException:
        try:
            os.remove(tmp)
        except OSError:
            pass
        raise
    # steps above this one are a future this run left (it went on from an older step): set aside, under a
    # name no listing takes, so that they neither stay the latest nor push this run's steps out (keep)
    stamp = time.strftime("%Y%m%dT%H%M%S")
    for later, old in list_checkpoints(directory):
        if later > int(step):
            os.replace(old, old[:-len(".npz")] + f".abandoned-{stamp}.npz")
    _fsync_dir(directory)
    if keep and keep > 0:
        for _, old in list_checkpoints(directory)[:-keep]:
            if old != final:
                os.remove(old)
    return final


def save(directory, model, optimizer=None, step=0, extra=None, keep=3, sampler=None, scaler=None, rng=None):
    """Collective: rank 0 writes ``ckpt-<step>.npz`` in ``directory`` atomically; returns its path on every rank.

    ``extra``: arrays, numbers, strings, lists and dicts to store alongside.
    ``rng``: a numpy Generator, or a dict of them, whose per-rank state is saved.
    ``keep``: how many checkpoints to keep (None or 0: all).
    Checkpoints of higher steps in ``directory`` (a run that went on from an older step) are renamed
    ``ckpt-<step>.abandoned-<time>.npz``: no longer the latest, not counted by ``keep``, not deleted.
    """
    directory = os.fspath(directory)
    rank, size = runtime.rank(), runtime.size()
    with timeline.span("checkpoint.save", "io", step=int(step)):
        # every rank asks for the states: a sharded optimizer's state_dict() is a collective
        model_state = model.state_dict()
        states = {part: obj.state_dict() for part, obj in
                  (("optim", optimizer), ("sampler", sampler), ("scaler", scaler)) if obj is not None}
        local = _rank_state(model, rng)
        ranks = allgather_object(local, name="checkpoint.save.rng") if size > 1 else [local]
        path = error = None
        if rank == 0:
            try:
                path = _write(directory, step, keep, *_collect(model_state, states, step, extra, ranks))
            except Exception as exc:
                hint = "; free space there or save elsewhere" if getattr(exc, "errno", None) in _NO_ROOM else ""
                error = (f"could not save checkpoint step {int(step)} in {directory}: {exc}; "
                         f"the previous checkpoint is unchanged{hint}")
        if size > 1:
            path, error = broadcast_object((path, error), name="checkpoint.save.status")
    if error:
        raise CheckpointError(error)
    timeline.instant("checkpoint", step=int(step), path=path)
    return path


# --- load -----------------------------------------------------------------------------------------

def _resolve(directory_or_file, step):
    target = os.fspath(directory_or_file)
    if os.path.isdir(target):
        path = checkpoint_path(target, step) if step is not None else latest(target)
        if path is None:
            raise CheckpointError(f"no checkpoint (ckpt-*.npz) in {target}")
        target = path
    if not os.path.exists(target):
        raise CheckpointError(f"checkpoint {target} does not exist")
    return target


def _read(path):
    """(meta, arrays) of a checkpoint file, every crc verified; raises CheckpointError naming what is wrong."""
    try:
        archive = numpy.load(path, allow_pickle=False)
    except Exception as exc:
        raise CheckpointError(f"checkpoint {path} is truncated or not a checkpoint ({exc})") from None
    if not hasattr(archive, "files"):
        raise CheckpointError(f"checkpoint {path} is a single .npy array, not an mpidp checkpoint")
    with archive:
        try:
            if "meta" not in archive.files:
                raise CheckpointError(f"checkpoint {path} has no 'meta' entry; "
                                      f"it was not written by mpidp.checkpoint.save")
            blob = archive["meta"].tobytes()
            if "meta.crc32" not in archive.files or int(archive["meta.crc32"]) != zlib.crc32(blob):
                raise CheckpointError(f"checkpoint {path} is corrupt: field 'meta' fails its crc32 check")
            meta = json.loads(blob)
            if meta.get("format", 0) > FORMAT:
                raise CheckpointError(f"checkpoint {path} has format {meta.get('format')} from mpidp "
                                      f"{meta.get('mpidp')}; this mpidp {__version__} reads up to format {FORMAT}")
            arrays = {}
            for key, crc in meta["crc32"].items():
                if key not in archive.files:
                    raise CheckpointError(f"checkpoint {path} is missing field {key!r}")
                a = archive[key]
                if _crc(a) != crc:
                    raise CheckpointError(f"checkpoint {path} is corrupt: field {key!r} fails its crc32 check")
                arrays[key] = a
        except CheckpointError:
            raise
        except Exception as exc:  # zip/zlib/npy header damage inside the file
            raise CheckpointError(f"checkpoint {path} is corrupt or truncated ({type(exc).__name__}: {exc})") from None
    return meta, arrays


def _check_model(path, meta, model):
    saved = {name: (tuple(shape), dtype) for name, shape, dtype in meta["model"]}
    for name, value in model.state_dict().items():
        have = (tuple(value.shape), value.dtype.name)
        if name not in saved:
            raise CheckpointError(f"checkpoint {path} does not fit the model: it has no parameter {name!r} "
                                  f"(shape {have[0]}); it was saved from another model")
        if saved[name] != have:
            raise CheckpointError(f"checkpoint {path} does not fit the model: parameter {name!r} is "
                                  f"{saved[name][0]} {saved[name][1]} in the checkpoint but {have[0]} {have[1]} "
                                  f"in the model; load a checkpoint saved from the same architecture")
    extra = sorted(set(saved) - set(model.state_dict()))
    if extra:
        raise CheckpointError(f"checkpoint {path} does not fit the model: it has parameters {extra} "
                              f"the model does not have; it was saved from another model")


def _prepare(path, model, optimizer, sampler, scaler):
    """Rank 0: read and verify; returns (header every rank needs, the arrays to hand out)."""
    meta, arrays = _read(path)
    _check_model(path, meta, model)
    for part, obj in (("optim", optimizer), ("sampler", sampler), ("scaler", scaler)):
        if obj is not None and part not in meta["trees"]:
            raise CheckpointError(f"checkpoint {path} has no {part} state (it was saved without {part}=); "
                                  f"load it without {part}=")
    if optimizer is None:  # no need to ship the moments
        arrays = {k: a for k, a in arrays.items() if not k.startswith("optim/")}
    entries = [(key, a.dtype.str, a.shape) for key, a in arrays.items()]
    header = {"path": path, "step": meta["step"], "size": meta["size"], "time": meta["time"],
              "trees": meta["trees"], "dtypes": meta["dtypes"], "entries": entries}
    return header, arrays


def _broadcast_arrays(header, arrays, rank):
    """Every rank gets rank 0's arrays (one broadcast each, in the file's order)."""
    out = {}
    for key, dtype, shape in header["entries"]:
        a = arrays[key] if rank == 0 else numpy.empty(shape, dtype=numpy.dtype(dtype))
        out[key] = broadcast_(a, root_rank=0, name=f"checkpoint.load:{key}")
    return out


def _apply(header, arrays, model, optimizer, sampler, scaler, rng, rank):
    trees = header["trees"]
    model.load_state_dict({key[len("model/"):]: a for key, a in arrays.items() if key.startswith("model/")})
    if optimizer is not None:
        optimizer.load_state_dict(_decode(trees["optim"], arrays))
    if sampler is not None:
        sampler.load_state_dict(_decode(trees["sampler"], arrays))
    if scaler is not None:
        scaler.load_state_dict(_decode(trees["scaler"], arrays))
    ranks = _decode(trees["ranks"], arrays, copy=True)
    if rank < len(ranks):  # ranks beyond the saved job size keep their own streams
        mine = ranks[rank]
        numpy.random.set_state(mine["numpy"])
        if "model" in mine and hasattr(model, "set_rng_state"):
            model.set_rng_state(mine["model"])
        if rng is not None:
            gens = rng if isinstance(rng, dict) else {"rng": rng}
            saved = mine.get("rng", {})
            for name, g in gens.items():
                if name not in saved:
                    raise KeyError(f"no saved state for generator {name!r} (saved: {sorted(saved)})")
                g.bit_generator.state = saved[name]
    return _decode(trees["extra"], arrays, copy=True)


def load(directory_or_file, model, optimizer=None, sampler=None, scaler=None, step=None, rng=None):
    """Collective: restore the checkpoint (the latest in a directory, or ``step``) into the given objects.

    Rank 0 reads and verifies the file and broadcasts it, so every rank ends
    with identical values. Returns {'step', 'extra', 'path', 'size', 'time'}.
    """
    rank, size = runtime.rank(), runtime.size()
    with timeline.span("checkpoint.load", "io"):
        header = arrays = error = None
        if rank == 0:
            try:
                header, arrays = _prepare(_resolve(directory_or_file, step), model, optimizer, sampler, scaler)
            except CheckpointError as exc:
                error = str(exc)
            except Exception as exc:
                error = f"could not load checkpoint from {os.fspath(directory_or_file)}: {type(exc).__name__}: {exc}"
        if size > 1:
            header, error = broadcast_object((header, error), name="checkpoint.load.header")
        if error:
            raise CheckpointError(error)
        if size > 1:
            arrays = _broadcast_arrays(header, arrays, rank)
        arrays = {k: a.view(_dtype(header["dtypes"][k])) if k in header["dtypes"] else a for k, a in arrays.items()}
        try:
            extra = _apply(header, arrays, model, optimizer, sampler, scaler, rng, rank)
        except (KeyError, ValueError, TypeError) as exc:  # the same objects on every rank: raised on every rank
            raise CheckpointError(f"checkpoint {header['path']} does not fit: {exc}") from None
    return {"step": header["step"], "extra": extra, "path": header["path"], "size": header["size"],
            "time": header["time"]}
