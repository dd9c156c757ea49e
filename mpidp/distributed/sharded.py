"""ShardedOptimizer (ZeRO stage 1 and 2): each rank keeps and updates 1/N of the optimizer state.

Parameters are laid out in flat buckets (reverse registration order, one
parameter group and dtype per bucket, padded to a multiple of the ranks) whose
slices are the model's ``p.data``. Rank r owns the r-th equal part of every
bucket: the averaged gradients of that part arrive by a reduce-scatter, the
wrapped optimizer updates only that part (one flat shard Parameter per bucket,
so its per-element state is 1/N of the model's), and an allgather rebuilds the
whole bucket for everyone.

Stage 1 keeps whole gradient buckets (``p.grad`` are views, and the shard's
gradient is this rank's part of them) and starts a bucket's reduce-scatter
from the gradient-ready hooks as soon as it is complete. Stage 2 keeps only
the gradient shard between steps: a bucket's gradient buffer is taken from a
small pool just before the backward of the first module that owns one of its
parameters and given back once its reduce-scatter is done; at most
``max_inflight_bytes`` (default: two of the largest bucket) are bound at once,
more waits for the oldest reduction (buffers still being filled can exceed it).
Outside backward ``p.grad`` is None.
"""
import contextlib
import time

import numpy

from ..backend.xp import asnumpy, get_array_module
from ..comm import check, collectives, ops, process_set as _ps
from ..nn.parameter import Parameter
from ..fusion import ReadyCounts, plan_buckets
from .optimizer import FIRST_BUCKET_BYTES, DistributedOptimizer, _Rounds, agree_in_order, fusion_threshold

try:  # the timeline is optional: spans cost nothing when it is off or absent
    from ..timeline import span as _span
except ImportError:  # pragma: no cover - until mpidp.timeline is installed
    _span = lambda *a, **k: contextlib.nullcontext()  # noqa: E731


class _Bucket:
    """Flat data (and gradient) buffers for ``params``; this rank owns ``[lo, hi)``."""

    def __init__(self, index, params, names, group, size, rank):
        self.index, self.params, self.names, self.group = index, params, names, group
        self.xp = get_array_module(params[0].data)
        self.dtype = params[0].dtype
        self.length = sum(p.size for p in params)
        self.part = -(-self.length // size)          # ceil: every rank owns an equal part
        self.padded = self.part * size
        self.lo, self.hi = rank * self.part, (rank + 1) * self.part
        self.offsets = []
        offset = 0
        for p in params:
            self.offsets.append(offset)
            offset += p.size
        self.data = self.xp.zeros(self.padded, dtype=self.dtype)
        for p, view in zip(params, self.views(self.data)):
            view[...] = p.data
            p.data = view
        self.grad = None
        self.shard = Parameter(self.data[self.lo:self.hi], name=f"shard[{self.name}]")
        self.ready = 0
        self.handle = None

    @property
    def name(self):
        return f"sharded.bucket{self.index}[{self.names[0]}..{self.names[-1]}]"

    def views(self, flat):
        """Each parameter's slice of a bucket-length flat array, shaped like the parameter."""
        return [flat[o:o + p.size].reshape(p.shape) for o, p in zip(self.offsets, self.params)]

    def bind(self, flat, shard_view=False):
        """Make ``flat`` this bucket's gradient buffer (``p.grad`` become its views; stage 1 also the shard's)."""
        self.grad = flat
        for p, view in zip(self.params, self.views(flat)):
            p.grad = view if p.requires_grad else None
        if shard_view:  # the averaged shard overwrites this rank's part: no second buffer
            self.shard.grad = flat[self.lo:self.hi]

    def unbind(self):
        flat, self.grad = self.grad, None
        for p in self.params:
            p.grad = None
        return flat


class ShardedOptimizer(_Rounds):
    """Wrap ``optimizer``: average gradients by reduce-scatter, update this rank's shard, allgather.

    Same use as the DistributedOptimizer (``step``, ``zero_grad``, ``synchronize``,
    ``no_sync``, ``backward_passes_per_step``); ``state_dict()`` gathers the
    shards into the wrapped optimizer's own format (a collective) and
    ``state_dict(gathered=False)`` returns this rank's shard only. The wrapped
    optimizer's ``param_groups`` then hold the shard Parameters. Checkpoint
    code must call ``state_dict()`` on every rank (it gathers).
    """

    sharded = True  # broadcast_optimizer_state would overwrite every shard with the root's

    def __init__(self, optimizer, model=None, named_parameters=None, stage=1, process_set=None,
                 backward_passes_per_step=1, bucket_bytes=None, overlap=True, max_inflight_bytes=None):
        if stage not in (1, 2):
            raise ValueError(f"ShardedOptimizer stage must be 1 (optimizer state) or 2 (+ gradients), "
                             f"got {stage!r}")
        if stage == 2 and model is None:
            raise ValueError("ShardedOptimizer(stage=2) needs model=: gradient buffers are bound just "
                             "before the backward of the modules that own them")
        if int(backward_passes_per_step) < 1:
            raise ValueError(f"backward_passes_per_step must be >= 1, got {backward_passes_per_step}")
        self.optimizer, self.stage = optimizer, stage
        self.backward_passes_per_step = int(backward_passes_per_step)
        self.process_set, self._comm = _ps.resolve(process_set)
        self._set_arg = process_set
        self._size, self._rank = self._comm.Get_size(), self._comm.Get_rank()
        names, params = DistributedOptimizer._collect(optimizer, model, named_parameters)
        self._unowned(names, params)
        self._frozen = [p for g in optimizer.param_groups for p in g["params"] if not p.requires_grad]
        self._trained = params
        groups = optimizer.param_groups
        group_of = {id(p): gi for gi, g in enumerate(groups) for p in g["params"]}
        self._orig_params = [list(g["params"]) for g in groups]  # state_dict indices refer to these
        self.threshold = int(bucket_bytes or fusion_threshold())
        # one group, dtype and array module per bucket (offloaded parameters live on the host)
        plan = plan_buckets(params, self.threshold, FIRST_BUCKET_BYTES,
                            key=lambda p: (group_of[id(p)], numpy.dtype(p.dtype).str,
                                           get_array_module(p.data).__name__))
        self.buckets = [_Bucket(b, [params[i] for i in idx], [names[i] for i in idx],
                                group_of[id(params[idx[0]])], self._size, self._rank)
                        for b, idx in enumerate(plan)]
        self._bucket_of = {id(p): bkt for bkt in self.buckets for p in bkt.params}
        self._counts = ReadyCounts(self.buckets)
        # the layout (what a shard state file must match) and the settings a rank can vary
        self._layout_rows = tuple((f"parameter {n!r}", (tuple(p.shape), str(p.dtype), b.index, b.group))
                                  for b in self.buckets for n, p in zip(b.names, b.params)) + (("stage", stage),)
        self._signature = (("stage", stage), ("backward_passes_per_step", self.backward_passes_per_step),
                           ("process_set", tuple(self.process_set.ranks))) + self._layout_rows
        for gi, group in enumerate(groups):  # the wrapped optimizer now sees only the shards
            group["params"] = [b.shard for b in self.buckets if b.group == gi]
        self._pool = []  # stage 2: free gradient buffers, reused across steps
        # stage 2: gradient buffers bound at once (being filled or in reduction); more waits for the oldest
        largest = max(b.padded * numpy.dtype(b.dtype).itemsize for b in self.buckets)
        self.max_inflight_bytes = int(max_inflight_bytes or 2 * largest)
        if self.max_inflight_bytes < largest:
            raise ValueError(f"max_inflight_bytes={max_inflight_bytes} is below the largest bucket ({largest} "
                             f"bytes); raise it or lower bucket_bytes")
        if stage == 1:
            for b in self.buckets:
                flat = b.xp.zeros(b.padded, dtype=b.dtype)
                for p, view in zip(b.params, b.views(flat)):
                    if p.grad is not None:
                        view[...] = p.grad
                b.bind(flat, shard_view=True)
            self._module_hooks = []
        else:
            for b in self.buckets:
                for p in b.params:
                    p.grad = None
            self._module_hooks = [m.register_backward_pre_hook(self._bind_module)
                                  for m in model.modules()
                                  if any(id(p) in self._bucket_of for _, p in m.named_parameters(recurse=False))]
        self._hooks = [p.register_hook(self._grad_ready) for p in params] if overlap else []
        self._verified = False
        self._next_fire = 0
        self._sync_off = False
        self._synchronized = False
        self.stats = {"steps": 0, "wait_s": 0.0, "reduce_bytes": 0, "gather_bytes": 0,
                      "peak_grad_bytes": self._grad_bytes()}

    # -- gradient buffers (stage 2) ----------------------------------------------------------------
    def _grad_bytes(self):
        live = sum(b.grad.nbytes for b in self.buckets if b.grad is not None)
        return live + sum(buf.nbytes for buf in self._pool)

    def _acquire(self, bucket):
        """Bind a zeroed gradient buffer: a free one that fits, else a new one while the pool stays
        within one whole set of gradients, else wait for the oldest reduction in flight."""
        nbytes = bucket.padded * numpy.dtype(bucket.dtype).itemsize
        while True:
            fits = [i for i, buf in enumerate(self._pool) if buf.nbytes >= nbytes]
            if fits:
                buf = self._pool.pop(min(fits, key=lambda i: self._pool[i].nbytes))
                break
            flying = [b for b in self.buckets if b.handle and b.grad is not None]
            if self._grad_bytes() + nbytes <= self.max_inflight_bytes or not (flying or self._pool):
                buf = bucket.xp.empty(nbytes, dtype=numpy.uint8)
                break
            if flying:
                self._finish(flying[0])
            else:  # free buffers too small for this bucket: drop them to make room
                self._pool.clear()
        flat = buf[:nbytes].view(bucket.dtype)
        flat.fill(0)
        bucket.bind(flat)
        self.stats["peak_grad_bytes"] = max(self.stats["peak_grad_bytes"], self._grad_bytes())

    def _release(self, bucket):
        flat = bucket.unbind()
        self._pool.append(flat.base if flat.base is not None else flat)

    def _bind_module(self, module, dy):
        self._finish_done()
        for _, p in module.named_parameters(recurse=False):
            bucket = self._bucket_of.get(id(p))
            if bucket is not None and bucket.grad is None:
                self._acquire(bucket)

    # -- the hot path --------------------------------------------------------------------------
    def _grad_ready(self, param):
        bucket = self._bucket_of[id(param)]
        self._unsynchronized(bucket, param)
        if self._counts.add(bucket, param, self.backward_passes_per_step, bucket.index < self._next_fire,
                            not self._sync_off):
            self._fire_ready()

    def _fire_ready(self):
        """Start every complete bucket in index order; finish those whose reduction is done."""
        while self._next_fire < len(self.buckets):
            bucket = self.buckets[self._next_fire]
            if not self._counts.complete(bucket):
                break
            self._fire(bucket)
        self._finish_done()

    def _finish_done(self):
        for bucket in self.buckets[:self._next_fire]:
            if bucket.handle and bucket.handle.done():
                self._finish(bucket)

    def _fire(self, bucket):
        if not self._verified:
            agree_in_order(_ps.resolve(self._set_arg)[1], "ShardedOptimizer", self._signature,  # after a re-init too
                           "build the same model, optimizer and ShardedOptimizer (stage, "
                           "backward_passes_per_step, process_set) on every rank")
            self._verified = True
        if bucket.grad is None:  # stage 2, no parameter of it was used: it still takes part
            self._acquire(bucket)
        if bucket.grad.itemsize <= 2:  # 16-bit sums of loss-scaled gradients overflow: divide first
            bucket.handle = collectives.reducescatter_async(bucket.grad, op=ops.Sum, name=bucket.name,
                                                            prescale_factor=1.0 / self._size,
                                                            process_set=self._set_arg)
        else:
            bucket.handle = collectives.reducescatter_async(bucket.grad, op=ops.Average, name=bucket.name,
                                                            process_set=self._set_arg)
        self.stats["reduce_bytes"] += bucket.grad.nbytes
        self._next_fire = bucket.index + 1

    def _finish(self, bucket):
        bucket.shard.grad[...] = bucket.handle.wait()
        bucket.handle = False  # reduced this step
        if self.stage == 2:
            self._release(bucket)

    def synchronize(self):
        """Reduce-scatter every gradient bucket now; afterwards each shard holds its averaged gradients."""
        if self._synchronized:
            return
        self._requires_grad_as_built(self._trained)
        for bucket in self.buckets:
            if bucket.handle is None:
                self._counts.force(bucket)
        self._fire_ready()
        t0 = time.perf_counter()
        failed = []
        with _span("wait gradient shards", "wait"):
            for bucket in self.buckets:  # every one: none may stay in flight into the next round
                if bucket.handle:
                    try:
                        self._finish(bucket)
                    except Exception as exc:  # (a MismatchError, on every rank alike)
                        failed.append(exc)
        if failed:  # these gradients were not averaged: the next backward starts a new round
            self._new_round()
            raise failed[0]
        self.stats["wait_s"] += time.perf_counter() - t0
        self._new_round()
        self._synchronized = True

    def step(self):
        """Average the gradients (unless ``synchronize()`` did), update this rank's shards, allgather them."""
        self.synchronize()
        with _span("optimizer step (shard)", "optim"):
            self.optimizer.step()
        if not getattr(self.optimizer, "last_step_skipped", False):  # amp's agreed skip: same on every rank
            handles = [collectives.allgather_async(b.shard.data, name=f"{b.name}.data",
                                                   process_set=self._set_arg) for b in self.buckets]
            with _span("allgather parameters", "wait"):
                for b, h in zip(self.buckets, handles):
                    b.data[...] = h.wait()
                    self.stats["gather_bytes"] += b.data.nbytes
        self._synchronized = False
        self.stats["steps"] += 1

    def zero_grad(self):
        """Zero the gradients and forget the passes counted so far (stage 2: give back buffers a
        backward left without a step); reductions still in flight are waited for first."""
        for b in self.buckets:
            if b.handle:
                self._finish(b)
        self._new_round()
        self._synchronized = False
        for b in self.buckets:
            if self.stage == 1:
                if any(p.requires_grad and (p.grad is None or p.grad.base is not b.grad) for p in b.params):
                    b.bind(b.grad, shard_view=True)  # re-point a p.grad a user replaced
                b.grad.fill(0)
            elif b.grad is not None:
                self._release(b)
            b.shard.grad.fill(0)

    def clip_grad_norm(self, max_norm):
        """Scale the averaged gradient shards so the global 2-norm is at most ``max_norm``; returns the norm."""
        self.synchronize()
        local = numpy.zeros(1, dtype=numpy.float64)
        for b in self.buckets:
            g = b.shard.grad
            local[0] += float(get_array_module(g).vdot(g.astype(numpy.float64), g.astype(numpy.float64)))
        total = float(collectives.allreduce(local, op=ops.Sum, name="sharded.grad_norm",
                                            process_set=self._set_arg)[0]) ** 0.5
        coef = float(max_norm) / (total + 1e-6)
        if coef < 1.0:
            for b in self.buckets:
                b.shard.grad *= coef
        return total

    # -- state --------------------------------------------------------------------------------------
    def init_state(self):
        self.optimizer.init_state()

    def state_bytes(self):
        """Bytes of optimizer state arrays this rank holds."""
        return sum(int(v.nbytes) for st in self.optimizer.state.values() for v in st.values()
                   if hasattr(v, "nbytes"))

    def _shard_index(self):
        """bucket index -> index of its shard in the wrapped optimizer's state_dict."""
        order, i = {}, 0
        for gi, group in enumerate(self.optimizer.param_groups):
            for shard in group["params"]:
                order[id(shard)] = i
                i += 1
        return {b.index: order[id(b.shard)] for b in self.buckets}

    def _layout(self):
        return check.fingerprint(self._layout_rows + (("ranks", self._size),))

    def state_dict(self, gathered=True):
        """The wrapped optimizer's state_dict over the model's parameters (a collective), or this rank's shard."""
        inner = self.optimizer.state_dict()
        if not gathered:
            return {**inner, "shard": {"rank": self._rank, "size": self._size, "layout": self._layout()}}
        index = {id(p): i for i, p in enumerate(p for ps in self._orig_params for p in ps)}
        shard_index = self._shard_index()
        state = {}
        for b in self.buckets:
            entry = inner["state"].get(shard_index[b.index])
            if entry is None:
                continue
            for key in sorted(entry):
                value = entry[key]
                if hasattr(value, "shape") and tuple(value.shape) == (b.part,):
                    full = collectives.allgather(value, name=f"{b.name}.state.{key}", process_set=self._set_arg)
                    for p, view in zip(b.params, b.views(full)):
                        state.setdefault(index[id(p)], {})[key] = view.copy()
                else:
                    for p in b.params:
                        state.setdefault(index[id(p)], {})[key] = value
        groups = [{**{k: v for k, v in g.items() if k != "params"},
                   "params": [index[id(p)] for p in ps]}
                  for g, ps in zip(inner["param_groups"], self._orig_params)]
        extra = {k: v for k, v in inner.items() if k not in ("state", "param_groups")}
        return {**extra, "state": dict(sorted(state.items())), "param_groups": groups}

    def load_state_dict(self, state_dict):
        """Load a gathered state dict (every rank keeps its part) or this rank's own shard state dict."""
        if "shard" in state_dict:
            meta = state_dict["shard"]
            if (meta["rank"], meta["size"], meta["layout"]) != (self._rank, self._size, self._layout()):
                raise ValueError(f"this shard state was saved by rank {meta['rank']} of {meta['size']} "
                                 f"(layout {meta['layout']:x}); this is rank {self._rank} of {self._size} "
                                 f"(layout {self._layout():x}); load each rank's own file or a gathered state_dict")
            self.optimizer.load_state_dict({k: v for k, v in state_dict.items() if k != "shard"})
            return
        params = [p for ps in self._orig_params for p in ps]
        if len(state_dict["param_groups"]) != len(self._orig_params):
            raise ValueError(f"the state has {len(state_dict['param_groups'])} param groups but this optimizer "
                             f"has {len(self._orig_params)}; load a state saved for the same parameter groups")
        index = {id(p): i for i, p in enumerate(params)}
        shard_index = self._shard_index()
        saved = {int(k): v for k, v in state_dict["state"].items()}
        state = {}
        for b in self.buckets:
            entries = [saved.get(index[id(p)]) for p in b.params]
            present = [e is not None for e in entries]
            if not any(present):
                continue
            if not all(present):
                missing = [n for n, e in zip(b.names, entries) if e is None]
                raise ValueError(f"the state has entries for some parameters of {b.name} but not for {missing}; "
                                 f"load a state saved by the same optimizer over the same model")
            part = {}
            for key, value in entries[0].items():
                if not hasattr(value, "shape") or value.ndim == 0:
                    part[key] = value
                    continue
                full = numpy.zeros(b.padded, dtype=value.dtype)
                for p, view, e in zip(b.params, b.views(full), entries):
                    if tuple(e[key].shape) != p.shape:
                        raise ValueError(f"state[{key!r}] of {p.name} has shape {tuple(e[key].shape)} but the "
                                         f"parameter has {p.shape}; load a state saved for the same model")
                    view[...] = asnumpy(e[key])
                part[key] = full[b.lo:b.hi]
            state[shard_index[b.index]] = part
        groups = [{**{k: v for k, v in g.items() if k != "params"},
                   "params": [shard_index[b.index] for b in self.buckets if b.group == gi]}
                  for gi, g in enumerate(state_dict["param_groups"])]
        extra = {k: v for k, v in state_dict.items() if k not in ("state", "param_groups")}
        self.optimizer.load_state_dict({**extra, "state": state, "param_groups": groups})

    def close(self):
        """Remove the hooks (the model keeps its flat-buffer views)."""
        for h in self._hooks + self._module_hooks:
            h.remove()
        self._hooks, self._module_hooks = [], []

    def __repr__(self):
        return (f"ShardedOptimizer({type(self.optimizer).__name__}, stage={self.stage}, "
                f"{sum(len(b.params) for b in self.buckets)} parameters in {len(self.buckets)} buckets, "
                f"rank {self._rank} of {self._size})")
