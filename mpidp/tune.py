"""Tuning by measurement: the per-rank batch size, and the bucket and piece sizes of the gradient exchange.

``batch_size`` grows the per-rank batch while it fits a memory budget and
samples/s over all ranks still improves; ``communication`` times the
DistributedOptimizer's exchange of the real gradients over fusion thresholds x
piece sizes and keeps the fastest, cached per (model, ranks, MPI, device).
Every decision is taken on rank 0 from numbers reduced over the ranks and
broadcast, so every rank ends with the same settings. Tuning sits above the
distributed optimizer: nothing below imports this module.
"""
import csv
import datetime
import hashlib
import json
import math
import os
import platform
import time

import numpy

from . import _env
from .backend.xp import cupy_module, get_array_module, is_cupy
from .comm import _buffers, collectives, ops, runtime
from .comm.objects import broadcast_object
from .comm.process_set import resolve
from .distributed import optimizer as _dopt
from .errors import MpidpError


KiB, MiB = 1 << 10, 1 << 20
THRESHOLDS = (1 * MiB, 2 * MiB, 4 * MiB, 8 * MiB, 16 * MiB, 32 * MiB, 64 * MiB)
PIECES = (256 * KiB, 512 * KiB, 1 * MiB, 2 * MiB, 4 * MiB, 8 * MiB)
_CACHE_VERSION = 2  # 2: the piece is the per-rank part of a ring step


# --- batch size ---------------------------------------------------------------------------------

class BatchResult:
    """What ``batch_size`` decided: the per-rank batch, the learning rate it implies, and its table."""

    def __init__(self, batch_size, ranks, table, budget_bytes, lr_rule, base_lr, base_batch):
        self.batch_size = int(batch_size)
        self.global_batch = self.batch_size * ranks
        self.table = table
        self.budget_bytes = int(budget_bytes)
        self.lr_rule, self.base_lr, self.base_batch = lr_rule, base_lr, base_batch
        k = self.global_batch / base_batch
        self.lr_scale = k if lr_rule == "linear" else math.sqrt(k)
        self.lr = None if base_lr is None else base_lr * self.lr_scale

    def warmup_scheduler(self, optimizer, warmup_steps):
        """LinearWarmup from ``base_lr`` to ``lr`` over ``warmup_steps`` (set the optimizer's lr to ``lr`` first).

        The linear rule needs the warm-up (Goyal et al., 2017); under the sqrt rule the
        rate starts where it ends.
        """
        from .optim.lr_scheduler import LinearWarmup
        start = 1.0 / self.lr_scale if self.lr_rule == "linear" else 1.0
        return LinearWarmup(optimizer, warmup_steps, start_factor=start)

    def format_table(self):
        """The measured table as text, one trial per line."""
        lines = [f"{'batch':>6} {'ran':>4} {'fits':>5} {'peak MiB':>9} {'step ms':>9} {'samples/s':>10} "
                 f"{'comm':>6} {'wait':>6}  note"]
        for r in self.table:
            step = f"{r['step_s'] * 1e3:9.2f}" if r["ran"] and r["fits"] else f"{'-':>9}"
            sps = f"{r['samples_s']:10.1f}" if r["ran"] and r["fits"] else f"{'-':>10}"
            comm = f"{r['comm_share']:6.0%}" if r["ran"] and r["fits"] else f"{'-':>6}"
            wait = f"{r['wait_share']:6.0%}" if r["ran"] and r["fits"] else f"{'-':>6}"
            lines.append(f"{r['batch']:>6} {'yes' if r['ran'] else 'no':>4} {'yes' if r['fits'] else 'no':>5} "
                         f"{r['peak_bytes'] / MiB:9.1f} {step} {sps} {comm} {wait}  {r['note']}")
        return "\n".join(lines)

    def __repr__(self):
        lr = "" if self.lr is None else f", lr={self.lr:.4g} ({self.lr_rule} rule)"
        return f"BatchResult(batch_size={self.batch_size}, global_batch={self.global_batch}{lr})"


def batch_size(model, sample_batch_fn, optimizer_factory, budget_bytes=None, start=8, max_batch=4096,
               improve_threshold=0.05, lr_rule="linear", base_lr=None, base_batch=None, loss_fn=None,
               steps=5, warmup=1, refine_steps=2, granularity=None, timer=time.perf_counter,
               process_set=None, log=None):
    """Choose the per-rank batch by measurement: the largest that fits the budget and still pays.

    From ``start`` the batch doubles while (1) a step's memory stays within
    ``budget_bytes`` and (2) samples/s over all ranks beats the best so far by
    more than ``improve_threshold`` (0.05 = 5 %); then ``refine_steps``
    bisection steps between the best batch and the first that failed. A batch
    whose memory, extrapolated linearly from the last trial, would exceed the
    budget is not run at all. Each trial restores the model, builds a fresh
    optimizer and runs ``warmup`` + ``steps`` real training steps; the first
    runs under ``no_sync()`` so an out-of-memory error is agreed before any
    gradient leaves the rank.

    Arguments:
        model: an ``nn.Module``; its parameters, buffers and RNG state are restored afterwards.
        sample_batch_fn: ``fn(batch) -> (x, y)``, a batch of that many samples for this rank.
        optimizer_factory: ``fn(params) -> optimizer`` (a fresh one per trial); it is wrapped in a
            DistributedOptimizer unless it already is one.
        budget_bytes: per-rank memory budget. None: 90 % of the device memory free at the start on
            a GPU; on the host, half of MemAvailable shared among this node's ranks.
        lr_rule: 'linear' (SGD: lr grows with the global batch, with warm-up) or 'sqrt' (Adam).
        base_lr, base_batch: the learning rate known to work at global batch ``base_batch``
            (default ``start``); the result's ``lr`` scales it by the rule.
        loss_fn: a loss with ``loss_fn(out, y)`` and ``loss_fn.backward()`` (CrossEntropyLoss).
        timer: the clock, in seconds (tests inject a deterministic one).
        log: optional ``fn(str)`` called on rank 0 with a line per trial.

    Memory is counted, not sampled: parameters, gradients (and compressed wire
    buffers), optimizer state, the activations the model keeps for backward
    (``Module.activation_bytes()``), the batch, and the output with its
    gradient; on a GPU it is the larger of that and the memory pool's high-water
    mark. Samples/s is ``ranks * batch / step``, the step being the median over
    steps of the slowest rank. Returns a ``BatchResult`` (``batch_size``,
    ``global_batch``, ``lr``, ``table``, ``warmup_scheduler()``), the same on
    every rank.
    """
    from .nn import CrossEntropyLoss

    if lr_rule not in ("linear", "sqrt"):
        raise ValueError(f"lr_rule must be 'linear' (SGD) or 'sqrt' (Adam), got {lr_rule!r}")
    if int(start) < 1 or int(max_batch) < int(start):
        raise ValueError(f"need 1 <= start <= max_batch, got start={start}, max_batch={max_batch}")
    if int(warmup) < 1 or int(steps) < 1:
        raise ValueError(f"need warmup >= 1 (the out-of-memory probe) and steps >= 1, got {warmup}, {steps}")
    _, comm = resolve(process_set)
    ranks, rank = comm.Get_size(), comm.Get_rank()
    loss_fn = loss_fn or CrossEntropyLoss()
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError(f"{type(model).__name__} has no trainable parameters: nothing to tune the batch for")
    xp = get_array_module(params[0].data)
    if budget_bytes is None:
        budget_bytes = _default_budget(xp, process_set)
    budget_bytes = int(_agreed(min, budget_bytes, process_set))
    snapshot = {k: v.copy() for k, v in model.state_dict().items()}
    rng = model.rng_state()
    fixed = [None]      # bytes that do not grow with the batch (set by the first trial that ran)
    per_sample = [None]

    def trial(b):
        if per_sample[0] is not None and fixed[0] + per_sample[0] * b > budget_bytes:
            return _row(b, False, False, fixed[0] + per_sample[0] * b, note="predicted over budget")
        model.load_state_dict(snapshot)
        model.set_rng_state(rng)
        row = _run_trial(model, sample_batch_fn, optimizer_factory, loss_fn, b, steps, warmup, timer,
                         process_set, ranks, xp)
        if row["ran"] and row["fixed_bytes"] is not None:
            fixed[0] = row["fixed_bytes"]
            per_sample[0] = max(0.0, (row["peak_bytes"] - fixed[0]) / b)
        row["fits"] = row["fits"] and row["peak_bytes"] <= budget_bytes
        if row["ran"] and not row["fits"] and not row["note"]:
            row["note"] = "over budget"
        row = broadcast_object(row, 0, name="tune.batch_size.row", process_set=process_set)
        if log is not None and rank == 0:
            log(_trial_line(row))
        return row

    try:
        best, table = _search(trial, int(start), int(max_batch), float(improve_threshold), int(refine_steps),
                              granularity)
    finally:
        model.load_state_dict(snapshot)
        model.set_rng_state(rng)
        model.zero_grad()
        model.clear_cache()
    best = broadcast_object(best, 0, name="tune.batch_size.decision", process_set=process_set)
    return BatchResult(best, ranks, table, budget_bytes, lr_rule, base_lr,
                       float(base_batch or start))


def _search(trial, start, max_batch, improve, refine_steps, granularity=None):
    """(best batch, rows): doubling while it fits and improves, then bisection; ``trial(b)`` -> row."""
    table = []

    def run(b):
        row = trial(b)
        table.append(row)
        return row

    b, best, best_sps = start, None, 0.0
    while True:  # the first batch that fits is the baseline
        row = run(b)
        if row["fits"]:
            best, best_sps = b, row["samples_s"]
            break
        if b == 1:
            raise MpidpError(f"batch 1 needs {row['peak_bytes']:,.0f} bytes, over the budget; "
                             f"raise budget_bytes or shrink the model")
        b //= 2
    hi = None
    while hi is None:
        b = best * 2
        if b > max_batch:
            break
        row = run(b)
        if row["fits"] and row["samples_s"] > best_sps * (1.0 + improve):
            best, best_sps = b, row["samples_s"]
        else:
            hi = b
    for _ in range(refine_steps if hi is not None else 0):
        step = granularity or max(1, best // 8)
        mid = (best + hi) // 2 // step * step
        if mid <= best or mid >= hi:
            break
        row = run(mid)
        if row["fits"] and row["samples_s"] > best_sps * (1.0 + improve):
            best, best_sps = mid, row["samples_s"]
        else:
            hi = mid
    return best, table


def _row(b, ran, fits, peak, step_s=0.0, samples_s=0.0, comm_share=0.0, wait_share=0.0, note=""):
    return {"batch": int(b), "ran": bool(ran), "fits": bool(fits), "peak_bytes": float(peak),
            "step_s": float(step_s), "samples_s": float(samples_s), "comm_share": float(comm_share),
            "wait_share": float(wait_share), "note": note, "fixed_bytes": None}


def _trial_line(r):
    if not r["ran"] or not r["fits"]:
        return f"batch {r['batch']:>5}: {r['note'] or 'does not fit'} ({r['peak_bytes'] / MiB:.1f} MiB)"
    return (f"batch {r['batch']:>5}: {r['samples_s']:10.1f} samples/s, step {r['step_s'] * 1e3:.2f} ms, "
            f"peak {r['peak_bytes'] / MiB:.1f} MiB, communication {r['comm_share']:.0%}")


def _run_trial(model, sample_batch_fn, optimizer_factory, loss_fn, b, steps, warmup, timer, set_arg, ranks, xp):
    """One batch size: warm-up (the first under no_sync, to agree on out-of-memory), then timed steps."""
    from .distributed.optimizer import DistributedOptimizer

    cp = cupy_module() if xp is not numpy else None
    if cp is not None:
        cp.get_default_memory_pool().free_all_blocks()
    inner = optimizer_factory(model.parameters())
    opt = inner if isinstance(inner, DistributedOptimizer) else \
        DistributedOptimizer(inner, model=model, process_set=set_arg)
    times, act, io, oom = [], 0, 0, False
    try:
        for i in range(warmup + steps):
            x, y = sample_batch_fn(b)
            t0 = timer()
            opt.zero_grad()
            if i == 0:
                try:
                    with opt.no_sync():
                        io, kept = _forward_backward(model, loss_fn, x, y)
                        act = max(act, kept)
                except MemoryError:
                    oom = True
                except Exception as exc:  # cupy's OutOfMemoryError is no MemoryError subclass
                    if type(exc).__name__ != "OutOfMemoryError":
                        raise
                    oom = True
                if _agreed(max, int(oom), set_arg):
                    model.clear_cache()
                    return _row(b, True, False, 0.0, note="out of memory")
            else:
                io, kept = _forward_backward(model, loss_fn, x, y)
                act = max(act, kept)
            opt.step()
            if cp is not None:
                cp.cuda.get_current_stream().synchronize()
            t1 = timer()
            if i == warmup - 1:
                for k in opt.stats:
                    opt.stats[k] = 0 if k in ("steps", "bytes") else 0.0
            if i >= warmup:
                times.append(t1 - t0)
        fixed = _fixed_bytes(model, opt)
        peak = fixed + act + io
        if cp is not None:
            peak = max(peak, cp.get_default_memory_pool().total_bytes())
        step_times = collectives.allreduce(numpy.array(times), op=ops.Max, name="tune.batch_size.times",
                                           process_set=set_arg)
        stats = collectives.allreduce(numpy.array([opt.stats["comm_s"], opt.stats["wait_s"], peak]),
                                      op=ops.Max, name="tune.batch_size.stats", process_set=set_arg)
        step_s = float(numpy.median(step_times))
        total = float(numpy.sum(step_times))
        row = _row(b, True, True, stats[2], step_s, ranks * b / step_s if step_s > 0 else float("inf"),
                   stats[0] / total if total > 0 else 0.0, stats[1] / total if total > 0 else 0.0)
        row["fixed_bytes"] = float(_agreed(max, fixed, set_arg))
        return row
    finally:
        opt.close()  # also one the factory built: its hooks would count the next trial's gradients


def _forward_backward(model, loss_fn, x, y):
    """Forward, loss, backward; returns (batch + output + its gradient bytes, activation bytes kept)."""
    out = model(x)
    kept = model.activation_bytes()
    loss_fn(out, y)
    model.backward(loss_fn.backward())
    io = int(getattr(x, "nbytes", 0)) + int(getattr(y, "nbytes", 0)) + 2 * int(getattr(out, "nbytes", 0))
    return io, kept


def _fixed_bytes(model, opt):
    """Parameters, gradients, compressed wire buffers and optimizer state: what a bigger batch does not grow."""
    seen, total = set(), 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += p.nbytes + (p.nbytes if p.requires_grad else 0)
    total += sum(int(b.wire.nbytes) for b in opt.buckets if b.wire is not b.flat)
    for st in opt.optimizer.state.values():
        total += sum(int(a.nbytes) for a in st.values() if hasattr(a, "nbytes"))
    return total


def _default_budget(xp, process_set):
    """90 % of free device memory on a GPU; half of MemAvailable per rank of this node on the host."""
    if xp is not numpy:
        free, _ = xp.cuda.runtime.memGetInfo()
        return int(0.9 * (free + xp.get_default_memory_pool().free_bytes()))
    available = 0
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    available = int(line.split()[1]) * 1024
    except OSError:
        pass
    if not available:
        available = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
    return available // (2 * max(1, runtime.local_size()))


def _agreed(how, value, process_set):
    """``how`` (min or max) of a number over the ranks."""
    a = numpy.array([value], dtype=numpy.float64)
    out = collectives.allreduce(a, op=ops.Max if how is max else ops.Min, name="tune.agree",
                                process_set=process_set)
    return out[0]


# --- communication: bucket size and piece size ---------------------------------------------------

class CommResult:
    """What ``communication`` chose: fusion threshold and piece size, and the table it measured."""

    def __init__(self, threshold, piece_bytes, key, table, from_cache, default_ms=None, tuned_ms=None):
        self.threshold, self.piece_bytes, self.key = int(threshold), int(piece_bytes), key
        self.table, self.from_cache = table, from_cache
        self.default_ms, self.tuned_ms = default_ms, tuned_ms

    def __repr__(self):
        how = "cached" if self.from_cache else f"measured {len(self.table)} candidates"
        return (f"CommResult(threshold={self.threshold}, piece_bytes={self.piece_bytes}, {how})")


def apply_fusion_threshold(dist_opt, nbytes):
    """Rebuild ``dist_opt``'s buckets for a fusion threshold of ``nbytes`` between steps.

    The parameter order is unchanged (reverse registration, one dtype per
    bucket, a small first bucket), gradients keep their values (each ``.grad``
    becomes a view into the new buffers), and the next bucket exchange is
    verified across ranks again. Every rank must call it with the same value.
    """
    dist_opt.replan(int(nbytes))


def exchange(dist_opt):
    """Average ``dist_opt``'s bucket buffers once, as its step would (all buckets started, then waited)."""
    handles = []
    for bucket in dist_opt.buckets:
        if bucket.wire is not bucket.flat:
            bucket.wire[...] = bucket.flat
        handles.append(collectives.allreduce_async_(bucket.wire, op=dist_opt.op, name=bucket.name,
                                                    process_set=dist_opt.process_set))
    for bucket, handle in zip(dist_opt.buckets, handles):
        handle.wait()
        if bucket.wire is not bucket.flat:
            bucket.flat[...] = bucket.wire


def cache_key(dist_opt):
    """'model=<hash>|np=N|nodes=M|mpi=<vendor version>|device=<...>': what a tuned setting depends on."""
    from mpi4py import MPI

    rows = [(name, tuple(p.shape), str(p.dtype)) for b in dist_opt.buckets for name, p in zip(b.names, b.params)]
    rows.append(("compression", repr(dist_opt.compression)))
    model = hashlib.blake2b(repr(rows).encode(), digest_size=8).hexdigest()
    _, comm = resolve(dist_opt.process_set)
    vendor, version = MPI.get_vendor()
    flat = dist_opt.buckets[0].flat
    if is_cupy(flat):
        cp = cupy_module()
        name = cp.cuda.runtime.getDeviceProperties(cp.cuda.Device().id)["name"]
        name = name.decode() if isinstance(name, bytes) else name
        device = f"gpu:{name}:{'cuda-aware' if runtime.cuda_aware() else 'staged'}"
    else:
        device = f"cpu:{platform.machine()}:{os.cpu_count()}"
    nodes = runtime.cross_size() if comm.Get_size() == runtime.size() else "?"
    return (f"model={model}|np={comm.Get_size()}|nodes={nodes}|mpi={vendor} {'.'.join(map(str, version))}"
            f"|device={device}")


def load_cache(path=None):
    """The cache file's entries (key -> dict); {} when it is missing or unreadable."""
    path = os.path.expanduser(path or _env.get("MPIDP_AUTOTUNE_CACHE"))
    try:
        with open(path) as f:
            data = json.load(f)
    except (OSError, ValueError):
        return {}
    if not isinstance(data, dict) or data.get("version") != _CACHE_VERSION:
        return {}
    return dict(data.get("entries", {}))


def save_cache(key, entry, path=None):
    """Add or replace ``key`` in the cache file (written whole to a temp file, then renamed)."""
    path = os.path.expanduser(path or _env.get("MPIDP_AUTOTUNE_CACHE"))
    entries = load_cache(path)
    entries[key] = entry
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump({"version": _CACHE_VERSION, "entries": entries}, f, indent=1, sort_keys=True)
    os.replace(tmp, path)


def communication(dist_opt, thresholds=None, pieces=None, reps=5, warmup=1, min_gain=0.03, search="coordinate",
                  tune_threshold=None, tune_piece=None, cache=True, cache_path=None, log_path=None,
                  timer=time.perf_counter, log=None):
    """Choose ``dist_opt``'s fusion threshold and the allreduce piece size by timing its real gradients.

    Call it between steps, or between ``synchronize()`` and the inner step:
    the gradients in the buckets are kept. A candidate (threshold, piece)
    re-plans the buckets (same order) and times the whole exchange ``reps``
    times after ``warmup``, candidates interleaved rep by rep; an exchange's
    time is the slowest rank's and a candidate's the median. Candidates that
    make the same MPI calls are timed once. ``search='coordinate'`` times the
    pieces at the current threshold, then the thresholds at the best piece,
    then the pieces again (about 15 candidates); ``'grid'`` times every pair.
    Each stage also times the current settings; rank 0 keeps them unless the
    fastest beats them by more than ``min_gain`` (0.03 = 3 %), and every rank
    applies its decision.
    Explicit settings win: the threshold is not tuned when
    MPIDP_FUSION_THRESHOLD is set (or ``tune_threshold=False``, which the
    optimizer passes for an explicit ``fusion_threshold_bytes``), the piece size
    not when MPIDP_PIECE_BYTES is set. The piece size is process-wide: it
    applies to every large allreduce. A cached result for the same
    ``cache_key`` is applied without measuring (``cache=False`` measures
    anyway); rank 0 appends what it tried to ``log_path`` (default: the cache
    path with .csv). Returns a ``CommResult``.
    """
    set_arg = dist_opt.process_set
    rank = resolve(dist_opt.process_set)[1].Get_rank()
    if tune_threshold is None:
        tune_threshold = not _env.get("MPIDP_FUSION_THRESHOLD")
    if tune_piece is None:
        tune_piece = not _env.get("MPIDP_PIECE_BYTES")
    current = (int(dist_opt.threshold), int(_buffers.piece_bytes()))
    key = cache_key(dist_opt)
    cache_path = os.path.expanduser(cache_path or _env.get("MPIDP_AUTOTUNE_CACHE"))
    if not (tune_threshold or tune_piece):
        return CommResult(*current, key, [], False)
    if cache:
        entry = load_cache(cache_path).get(key) if rank == 0 else None
        entry = broadcast_object(entry, 0, name="tune.communication.cache", process_set=set_arg)
        if entry is not None:
            chosen = (entry["fusion_threshold"] if tune_threshold else current[0],
                      entry["piece_bytes"] if tune_piece else current[1])
            _apply(dist_opt, chosen)
            return CommResult(*chosen, key, [], True, entry.get("default_ms"), entry.get("tuned_ms"))
    ts = sorted(set(thresholds or THRESHOLDS) | {current[0]}) if tune_threshold else [current[0]]
    ps = sorted(set(pieces or PIECES) | {current[1]}) if tune_piece else [current[1]]
    if search == "grid":
        stages = [lambda best: [(t, p) for t in ts for p in ps]]
    elif search == "coordinate":  # piece at the current threshold, threshold at that piece, piece again
        stages = [lambda best: [(best[0], p) for p in ps], lambda best: [(t, best[1]) for t in ts],
                  lambda best: [(best[0], p) for p in ps]]
    else:
        raise ValueError(f"search must be 'coordinate' or 'grid', got {search!r}")
    grads = [(p, p.grad.copy()) for b in dist_opt.buckets for p in b.params if p.grad is not None]
    table, best = [], current
    try:
        for number, stage in enumerate(stages, 1):
            pairs = _candidates(dist_opt, stage(best) + [current], current)
            if len(pairs) < 2:
                continue
            med, times = _measure(dist_opt, pairs, reps, warmup, timer)
            pick = current
            if rank == 0:
                j = int(numpy.argmin(med))
                if med[j] < med[pairs.index(current)] * (1.0 - min_gain):
                    pick = pairs[j]
            best = tuple(broadcast_object(pick, 0, name="tune.communication.decision", process_set=set_arg))
            table += [{"stage": number, "threshold": t, "piece_bytes": piece, "median_ms": med[j] * 1e3,
                       "min_ms": times[:, j].min() * 1e3, "reps": int(reps), "current": (t, piece) == current}
                      for j, (t, piece) in enumerate(pairs)]
    finally:
        _buffers.set_piece_bytes(current[1])
        if dist_opt.threshold != current[0]:
            apply_fusion_threshold(dist_opt, current[0])
        for p, g in grads:
            p.grad[...] = g
    chosen = best
    _apply(dist_opt, chosen)
    last = [r for r in table if r["stage"] == table[-1]["stage"]] if table else []
    default_ms = next((r["median_ms"] for r in last if r["current"]), None)
    tuned_ms = next((r["median_ms"] for r in last if (r["threshold"], r["piece_bytes"]) == chosen), default_ms)
    for r in table:
        r["chosen"] = r["stage"] == table[-1]["stage"] and (r["threshold"], r["piece_bytes"]) == chosen
    if rank == 0:
        when = datetime.datetime.now().isoformat(timespec="seconds")
        _append_log(log_path or os.path.splitext(cache_path)[0] + ".csv", key, when, table)
        if cache:
            save_cache(key, {"fusion_threshold": chosen[0], "piece_bytes": chosen[1], "default_ms": default_ms,
                             "tuned_ms": tuned_ms, "when": when}, cache_path)
        if log is not None:
            log(f"autotune: threshold {chosen[0]} B, piece {chosen[1]} B: {tuned_ms or 0:.2f} ms per exchange "
                f"(was {default_ms or 0:.2f} ms at {current[0]} B / {current[1]} B; {len(table)} timings)")
    return CommResult(*chosen, key, table, False, default_ms, tuned_ms)


def _measure(dist_opt, pairs, reps, warmup, timer):
    """(median seconds per pair, times reps x pairs): exchanges interleaved, each the slowest rank's."""
    set_arg = dist_opt.process_set
    times = numpy.zeros((int(reps), len(pairs)))
    for r in range(-int(warmup), int(reps)):
        for j, (t, piece) in enumerate(pairs):
            if t != dist_opt.threshold:
                apply_fusion_threshold(dist_opt, t)
            _buffers.set_piece_bytes(piece)
            collectives.barrier(set_arg)
            t0 = timer()
            exchange(dist_opt)
            dt = timer() - t0
            if r >= 0:
                times[r, j] = dt
    times = collectives.allreduce(times, op=ops.Max, name="tune.communication.times", process_set=set_arg)
    return numpy.median(times, axis=0), times


def _layout(dist_opt, threshold, piece):
    """The MPI calls a (threshold, piece) pair makes: per bucket, its elements and its piece length."""
    params = _registered(dist_opt)
    plan = _dopt.plan(params, threshold)
    calls = []
    for idx in plan:
        elems = sum(params[i].size for i in idx)
        item = numpy.dtype(dist_opt.compression.wire(params[idx[0]].dtype)).itemsize
        step = max(1, min(_buffers.MAX_COUNT, piece // item))
        calls.append((elems, step if elems > step else None))
    return tuple(calls)


def _registered(dist_opt):
    """The optimizer's parameters in registration order (its buckets hold them reversed)."""
    return [p for b in reversed(dist_opt.buckets) for p in reversed(b.params)]


def _candidates(dist_opt, pairs, current):
    """The ``pairs`` that make different MPI calls; of equal ones the current, else the smallest.

    Timing equal candidates against each other would only let noise pick one.
    """
    kept = {}
    for pair in sorted(set(pairs), key=lambda pair: (pair != current, pair)):
        kept.setdefault(_layout(dist_opt, *pair), pair)
    return sorted(kept.values())


def _apply(dist_opt, chosen):
    if chosen[0] != dist_opt.threshold:
        apply_fusion_threshold(dist_opt, chosen[0])
    _buffers.set_piece_bytes(chosen[1])


def _append_log(path, key, when, table):
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fields = ["when", "key", "stage", "threshold", "piece_bytes", "median_ms", "min_ms", "reps", "current", "chosen"]
    new = not os.path.exists(path)
    with open(path, "a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        if new:
            w.writeheader()
        for row in table:
            w.writerow({"when": when, "key": key, **row})


# --- hierarchical allreduce: where it starts to pay on this job's nodes ----------------------------

HIERARCHICAL_SIZES = (64 * KiB, 256 * KiB, 1 * MiB, 4 * MiB, 16 * MiB, 64 * MiB)


def hierarchical(sizes=HIERARCHICAL_SIZES, reps=3, cache=True, cache_path=None, timer=time.perf_counter):
    """Learn from which message size the hierarchical allreduce beats MPI's own across this job's nodes.

    Times ``allreduce_`` of float32 messages of each size both ways (median over ``reps`` of
    the slowest rank), takes the smallest size from which the hierarchical path is at least
    as fast at every larger size (None: never), applies it, and caches it under the layout
    and MPI (``MPIDP_HIERARCHICAL=auto`` reads it at the next init). Returns
    ``(from_bytes, table)``, the same on every rank; a job on one node, or with one rank per
    node, has nothing to learn and returns ``(None, [])``.
    """
    comm = runtime.get_comm()
    topo = runtime.topology(comm)
    if topo.nodes == 1 or topo.channels == 1:
        return None, []
    old, table = topo.from_bytes, []
    try:
        for size in sizes:
            x = numpy.ones(max(1, size // 4), dtype=numpy.float32)
            row = {"bytes": int(size)}
            for label, start in (("mpi_s", size + 1), ("hierarchical_s", 0)):
                topo.set_from(start)
                times = []
                for _ in range(reps + 1):  # the first warms the path up
                    collectives.barrier()  # (in order behind what is in flight, as every MPI call on the communicator)
                    t0 = timer()
                    collectives.allreduce_(x, op=ops.Sum, name="tune.hierarchical")
                    times.append(_agreed(max, timer() - t0, None))
                row[label] = float(numpy.median(times[1:]))
            table.append(row)
    finally:
        topo.set_from(old)
    chosen = None
    for row in reversed(table):  # the smallest size from which every larger one pays
        if row["hierarchical_s"] > row["mpi_s"]:
            break
        chosen = row["bytes"]
    chosen = broadcast_object(chosen, 0, name="tune.hierarchical.decision")
    topo.set_from(chosen)
    if cache and comm.Get_rank() == 0:
        save_cache(topo.key(), {"from_bytes": chosen, "table": table,
                                "when": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")},
                   cache_path)
    return chosen, table
