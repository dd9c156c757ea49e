"""DistributedOptimizer: averages gradients in fused buckets that start while backward runs.

It holds the user's optimizer (composition). Gradients live in flat bucket
buffers (each ``p.grad`` is a view), a bucket's nonblocking allreduce starts
from the parameters' gradient-ready hooks as soon as its last gradient is
complete, and ``step()`` waits only for what is still in flight.
"""
import contextlib
import time

import numpy

from .. import _env
from ..backend.pinned import empty_host
from ..backend.xp import get_array_module
from ..comm import check, collectives, ops, process_set as _ps
from ..errors import MpidpError
from ..fusion import Bucket, Compression, ReadyCounts, buffer_kind, plan_buckets, signature
from .. import timeline

# scripts/bench_gradsync.py --sweep on the development machine (np=2, ResNet-50 gradient
# shapes): 8 MiB buckets were fastest in four idle sweeps (1.47x the best raw strategy vs
# 1.56x at 4 MiB); MPIDP_FUSION_THRESHOLD, fusion_threshold_bytes= or MPIDP_AUTOTUNE override.
DEFAULT_FUSION_THRESHOLD = 8 << 20
FIRST_BUCKET_BYTES = 1 << 20


def plan(params, threshold):
    """Bucket plan: a small first bucket (communication starts early, as in DDP) unless every
    gradient fits in one bucket; then one bucket, one call: on 500 tensors of 1 K floats
    (np=2) two calls were 1.08x one."""
    total = sum(p.nbytes for p in params)
    first = min(FIRST_BUCKET_BYTES, threshold) if total > threshold else threshold
    return plan_buckets(params, threshold, first)


def fusion_threshold():
    """Bytes per bucket: MPIDP_FUSION_THRESHOLD, else the calibrated default."""
    return _env.get("MPIDP_FUSION_THRESHOLD") or DEFAULT_FUSION_THRESHOLD


def agree_in_order(comm, owner, signature, advice):
    """The cross-rank plan check, run by ``comm``'s engine behind every collective queued there
    before it (a metric allreduce still in flight must not meet the check from another thread),
    and numbered on ``comm``: a process set's plan check leaves the other ranks' numbering alone."""
    check.agree(comm, owner, "gradients", signature, advice)


def _arena(xp, count, dtype):
    """Memory for the buckets of one kind: huge-page backed on the host (MPI moves it faster)."""
    if xp is not numpy:
        return xp.empty(count, dtype=dtype)
    dtype = numpy.dtype(dtype)
    return empty_host(count * dtype.itemsize).view(dtype)


class _Rounds:
    """What the DistributedOptimizer and the ShardedOptimizer share: the rounds of backward passes
    between exchanges, and the wrapped optimizer's parameter groups and state."""

    @staticmethod
    def _unowned(names, params):
        """Refuse parameters whose gradients another open Distributed/ShardedOptimizer exchanges: both
        would, each backward (and the first one, never stepped, raised 'computed again' at the second)."""
        for name, p in zip(names, params):
            for fn in p._hooks.values():
                owner = getattr(fn, "__self__", None)
                if isinstance(owner, _Rounds):
                    raise MpidpError(f"parameter {name!r} already belongs to an open {type(owner).__name__}: "
                                     f"close() it before building another on the same parameters (one per model)")

    def _new_round(self):
        """No bucket in flight or counted: the next backward passes start the next exchange."""
        for bucket in self.buckets:
            bucket.handle = None
        self._counts.reset()
        self._next_fire = 0

    def _unsynchronized(self, bucket, param):
        """Raise when a gradient arrives between synchronize() and step(): step() does not average
        again, so it would apply this rank's own gradient (the replicas part)."""
        if self._synchronized:
            name = bucket.names[[id(p) for p in bucket.params].index(id(param))]
            raise MpidpError(f"gradient of {name!r} was computed after synchronize() and before step(): "
                             f"step() applies the gradients synchronize() averaged and would add this "
                             f"rank's own; call step() or zero_grad() before the next backward")

    def _requires_grad_as_built(self, trained=()):
        """Raise on every rank when a parameter's ``requires_grad`` changed since the optimizer was built
        (the same change on every rank: a step either way): one frozen then is in no bucket, so its
        gradient would go unaveraged; ``trained`` (ShardedOptimizer) are those whose shards would still
        be updated (momentum, weight decay) if frozen now."""
        what = type(self).__name__
        for p in self._frozen:
            if p.requires_grad:
                raise MpidpError(f"parameter {p.name!r} was frozen (requires_grad=False) when the {what} was "
                                 f"built and requires grad now: its gradient is in no bucket and would not be "
                                 f"averaged; build the {what} again after changing requires_grad")
        for p in trained:
            if not p.requires_grad:
                raise MpidpError(f"parameter {p.name!r} was trainable when the {what} was built and is frozen "
                                 f"(requires_grad=False) now: its shard would still be updated (momentum, weight "
                                 f"decay); build the {what} again after changing requires_grad")

    @contextlib.contextmanager
    def no_sync(self):
        """Accumulate gradients locally: no bucket starts inside (the next step communicates)."""
        self._sync_off = True
        try:
            yield
        finally:
            self._sync_off = False

    @property
    def param_groups(self):
        return self.optimizer.param_groups

    @property
    def state(self):
        return self.optimizer.state


class DistributedOptimizer(_Rounds):
    """Wrap ``optimizer`` so that ``step()`` applies gradients averaged over all ranks.

    ``named_parameters`` (or ``model``) gives the names used in errors; without
    them, parameters are named by their position in the optimizer.
    """

    def __init__(self, optimizer, model=None, named_parameters=None, compression=Compression.none,
                 backward_passes_per_step=1, op=ops.Average, gradient_predivide_factor=1.0,
                 fusion_threshold_bytes=None, process_set=None, overlap=True):
        self.optimizer = optimizer
        self.op = ops.as_op(op)
        if self.op not in (ops.Average, ops.Sum):
            raise ValueError(f"DistributedOptimizer op must be mpidp.Average or mpidp.Sum, not {self.op}")
        if int(backward_passes_per_step) < 1:
            raise ValueError(f"backward_passes_per_step must be >= 1, got {backward_passes_per_step}")
        if compression is None:
            raise ValueError("compression is None: ml_dtypes is missing for bf16; use Compression.fp16 or none")
        self.compression = compression
        self.backward_passes_per_step = int(backward_passes_per_step)
        self.process_set, self._comm = _ps.resolve(process_set)
        self._set_arg = process_set
        self._size = self._comm.Get_size()
        f = float(gradient_predivide_factor)
        if not f > 0:
            raise ValueError(f"gradient_predivide_factor must be > 0, got {gradient_predivide_factor}")
        if self.op is ops.Average:
            self._pre, self._post = 1.0 / f, f / self._size
        else:
            self._pre, self._post = 1.0, 1.0
        self._predivide = f
        names, params = self._collect(optimizer, model, named_parameters)
        self._unowned(names, params)
        self._frozen = [p for g in optimizer.param_groups for p in g["params"] if not p.requires_grad]
        self._names, self._params = names, params
        self.replan(int(fusion_threshold_bytes or fusion_threshold()))
        self._next_fire = 0       # buckets start strictly in index order on every rank
        self._autotune_pending = _env.get("MPIDP_AUTOTUNE")
        self._threshold_given = fusion_threshold_bytes is not None  # explicit settings win over tuning
        self._sync_off = False
        self._skip_sync = False
        self._synchronized = False
        self._hooks = [p.register_hook(self._grad_ready) for p in params] if overlap else []
        self.stats = {"steps": 0, "comm_s": 0.0, "wait_s": 0.0, "bytes": 0}

    @staticmethod
    def _collect(optimizer, model, named_parameters):
        """(names, params): the optimizer's trainable parameters in the model's registration order."""
        owned = [p for group in optimizer.param_groups for p in group["params"]]
        if model is not None:
            named = list(model.named_parameters())
        elif named_parameters is not None:
            named = list(named_parameters)
        else:
            named = [(f"param.{i}", p) for i, p in enumerate(owned)]
        wanted = {id(p) for p in owned}
        named = [(n, p) for n, p in named if id(p) in wanted and p.requires_grad]
        found = {id(p) for _, p in named}
        for i, p in enumerate(owned):
            if id(p) not in found and p.requires_grad:
                raise ValueError(f"optimizer parameter #{i} {getattr(p, 'name', '')!r} {p.shape} is not among "
                                 f"the named parameters given; pass the model that owns it")
        if not named:
            raise ValueError("DistributedOptimizer got no trainable parameters")
        return [n for n, _ in named], [p for _, p in named]

    def replan(self, threshold_bytes):
        """Rebuild the buckets for another fusion threshold, between steps (same order, grads kept)."""
        if any(getattr(b, "handle", None) is not None for b in getattr(self, "buckets", [])):
            raise MpidpError("replan() during a step: call it after step() or synchronize(), "
                             "when no bucket is in flight")
        self.threshold = int(threshold_bytes)
        params, names = self._params, self._names
        layout = plan(params, self.threshold)
        self._signature = signature(names, params, layout)
        self.buckets = self._build(layout)
        self._bucket_of = {id(p): bkt for bkt in self.buckets for p in bkt.params}
        self._counts = ReadyCounts(self.buckets)
        self._verified = False  # the next exchange checks the new plan across ranks
        self._next_fire = 0

    def _build(self, layout):
        """Buckets for ``layout``, all those of one kind (dtype, array module) in one arena."""
        params, names = self._params, self._names
        kinds = {}  # kind -> [bucket index, ...]
        for b, idx in enumerate(layout):
            kinds.setdefault(buffer_kind(params[idx[0]]), []).append(b)
        buckets = [None] * len(layout)
        for kind, members in kinds.items():
            first = params[layout[members[0]][0]]
            xp = get_array_module(first.grad if first.grad is not None else first.data)
            sizes = [sum(params[i].size for i in layout[b]) for b in members]
            arena = _arena(xp, sum(sizes), first.dtype)
            arena.fill(0)
            wire_dtype = self.compression.wire(first.dtype)
            wire = arena if wire_dtype == first.dtype else _arena(xp, sum(sizes), wire_dtype)
            offset = 0
            for b, size in zip(members, sizes):
                flat = arena[offset:offset + size]
                buckets[b] = Bucket(b, [params[i] for i in layout[b]], [names[i] for i in layout[b]],
                                    flat, flat if wire is arena else wire[offset:offset + size])
                offset += size
        return buckets

    # -- the hot path -----------------------------------------------------------------------------
    def _grad_ready(self, param):
        bucket = self._bucket_of[id(param)]
        self._unsynchronized(bucket, param)
        if self._counts.add(bucket, param, self.backward_passes_per_step, bucket.index < self._next_fire,
                            not self._sync_off):
            self._fire_ready()

    def _fire_ready(self, wake=True):
        """Start every bucket that is complete, in index order (a later one waits for its turn)."""
        while self._next_fire < len(self.buckets):
            bucket = self.buckets[self._next_fire]
            if not self._counts.complete(bucket):
                return
            self._fire(bucket, wake)

    def _fire(self, bucket, wake=True):
        if not self._verified:
            self._verify()
        # An average divides by the ranks that contribute: all, unless some joined (mpidp.join)
        average = self.op is ops.Average
        pre, post = self._pre, self._predivide if average else 1.0
        if bucket.wire is not bucket.flat:  # compressed: scale before narrowing so sums stay in range
            xp = get_array_module(bucket.flat)
            xp.multiply(bucket.flat, pre * self._post if average else pre, out=bucket.wire, casting="unsafe")
            # the wire carries 1/size already: times size / contributors, exactly 1 unless some joined
            pre, post = 1.0, float(self._size) if average else 1.0
        elif average and bucket.wire.itemsize <= 2:  # 16-bit sums of loss-scaled gradients overflow: divide
            pre, post = pre * self._post, float(self._size)  # first (as the ShardedOptimizer and DDP do)
        if pre != 1.0:
            bucket.wire *= bucket.wire.dtype.type(pre)  # a typed scalar: NumPy's fast loop
        # The 1/size of an average goes with the exchange: the ring multiplies each part as it
        # completes it, in cache (ResNet-50 gradients, np=2: the average cost 9.5 ms of a 34 ms
        # step as a pass after every bucket was in, about 5 ms folded in). Buckets the ring
        # does not take (small, or device memory under a CUDA-aware MPI) are scaled by wait().
        bucket.handle = collectives.fused_allreduce_async_(bucket.wire, bucket.name, self._set_arg, wake, post,
                                                           average)
        self.stats["bytes"] += bucket.nbytes
        self._next_fire = bucket.index + 1

    def _verify(self):
        """First step: every rank must have built the same buckets from the same parameters."""
        # settings a rank can vary come first: a mismatch error names the setting, not a symptom
        settings = (("op", self.op.name), ("gradient_predivide_factor", self._predivide),
                    ("compression", self.compression.name),
                    ("backward_passes_per_step", self.backward_passes_per_step),
                    ("process_set", tuple(self.process_set.ranks)))
        comm = _ps.resolve(self._set_arg)[1]  # the set's communicator now: a re-init gives it a new one
        agree_in_order(comm, "DistributedOptimizer", settings + self._signature,
                       "build the same model and DistributedOptimizer (op, gradient_predivide_factor, "
                       "compression, backward_passes_per_step, process_set) on every rank")
        self._verified = True

    def synchronize(self):
        """Average the gradients now (start what has not started, wait for everything)."""
        if self._synchronized:
            return
        self._requires_grad_as_built()
        for bucket in self.buckets:
            name = bucket.replaced()
            if name is not None:
                raise MpidpError(f"the gradient of {name!r} was replaced by a new array between backward and "
                                 f"step(): the average arrives in the array it replaced, so step() would apply "
                                 f"this rank's own; change it in place (p.grad[...] = ...) or after synchronize()")
        for bucket in self.buckets:
            if bucket.handle is None:  # unused parameters or no hooks: their grads are as they are
                self._counts.force(bucket)
        self._fire_ready(wake=False)  # waited for below, so run by this thread
        t0 = time.perf_counter()
        failed = []
        with timeline.span("wait gradients", "wait"):
            for bucket in self.buckets:  # every one: none may stay in flight into the next backward's buffers
                try:
                    bucket.handle.wait()
                except Exception as exc:  # (a MismatchError, on every rank alike)
                    failed.append(exc)
        if failed:  # these gradients were not averaged: the next backward starts a new round
            self._new_round()
            raise failed[0]
        for bucket in self.buckets:
            if bucket.wire is not bucket.flat:
                bucket.flat[...] = bucket.wire
        self.stats["wait_s"] += time.perf_counter() - t0
        self.stats["comm_s"] += sum(b.handle.seconds() for b in self.buckets)
        self._new_round()
        self._synchronized = True

    def step(self):
        """Average the gradients (unless ``synchronize()`` already did) and update the parameters."""
        if not self._skip_sync:
            self.synchronize()
        elif not self._synchronized:
            raise MpidpError("step() inside skip_synchronize() before synchronize(): the gradients are not "
                             "averaged yet; call optimizer.synchronize() first, as in Horovod")
        if self._autotune_pending:  # MPIDP_AUTOTUNE=1: measure once, on this step's real gradients
            self._autotune_pending = False
            from .. import tune  # tune drives this optimizer from above; imported only when asked
            tune.communication(self, tune_threshold=False if self._threshold_given else None)
        with timeline.span("optimizer step", "optim"):
            self.optimizer.step()
        self._synchronized = False
        self.stats["steps"] += 1

    def zero_grad(self):
        """Zero every gradient (whole bucket buffers at once) and forget the passes counted so far.

        Buckets still in flight (a backward without step) are waited for first, so MPI never
        writes into the zeroed buffers; the next backward passes start a fresh exchange.
        """
        for bucket in self.buckets:
            if bucket.handle is not None:
                bucket.handle.wait()
        self._new_round()
        self._synchronized = False
        for bucket in self.buckets:
            bucket.rebind()
            bucket.flat.fill(0)

    @contextlib.contextmanager
    def skip_synchronize(self):
        """As in Horovod: ``step()`` inside applies gradients already averaged by ``synchronize()``
        (for clipping between the two) and does not average them again."""
        self._skip_sync = True
        try:
            yield
        finally:
            self._skip_sync = False

    def set_backward_passes_per_step(self, passes):
        """Accumulate ``passes`` backward passes locally before the gradients are averaged (between steps)."""
        if int(passes) < 1:
            raise ValueError(f"backward_passes_per_step must be >= 1, got {passes}")
        if self._counts.pending() or any(b.handle is not None for b in self.buckets):
            raise MpidpError("set_backward_passes_per_step() during accumulation: call it after step(), "
                             "before the next backward pass")
        self.backward_passes_per_step = int(passes)
        self._verified = False  # part of the checked plan: a rank that changed it alone is caught

    # -- pass-through of the wrapped optimizer (param_groups, state: _Rounds) ----------------------
    def state_dict(self):
        return self.optimizer.state_dict()

    def load_state_dict(self, state_dict):
        self.optimizer.load_state_dict(state_dict)

    def hidden_fraction(self):
        """Share of communication time that overlapped backward (1 - waited / communicated)."""
        comm = self.stats["comm_s"]
        return max(0.0, 1.0 - self.stats["wait_s"] / comm) if comm > 0 else 0.0

    def close(self):
        """Remove the gradient hooks (the optimizer can then be dropped)."""
        for h in self._hooks:
            h.remove()
        self._hooks = []

    def __repr__(self):
        return (f"DistributedOptimizer({type(self.optimizer).__name__}, {len(self._params)} parameters in "
                f"{len(self.buckets)} buckets of <= {self.threshold} B, compression={self.compression})")
