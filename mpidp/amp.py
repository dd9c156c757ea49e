"""Mixed precision: float16/bfloat16 compute parameters, float32 master weights, a dynamic loss scaler.

The model computes in the low-precision dtype (its Parameters are cast in
place); ``MixedPrecision`` wraps the optimizer and keeps a float32 master copy
of every parameter it updates. Wrap it in turn with the DistributedOptimizer
(gradients are averaged in the compute dtype, as Horovod does with apex) or
the ShardedOptimizer (then masters and moments exist only for this rank's
shard)::

    model = mpidp.models.transformer(...)                  # built in float32
    mp = amp.MixedPrecision(model, optim.AdamW(model.parameters()), dtype="float16")
    opt = mpidp.DistributedOptimizer(mp, model=model)      # or mpidp.ShardedOptimizer(mp, model=model)
    for x, y in loader:
        loss = crit(model(x), y)
        model.backward(crit.backward(mp.loss_scale))       # scaled loss gradient
        opt.step()                                         # unscale into the masters, step, cast back
        opt.zero_grad()

A step whose gradients hold inf or NaN on any rank is skipped on every rank
(one MAX allreduce of a flag) and the scale backs off, so replicas never
diverge; the same allreduce checks that every rank has the same loss scale.
``amp.initialize(model, optimizer, ...)`` returns ``(model, mp)``.
"""
import sys

import numpy

from .backend.xp import bfloat16, get_array_module
from .errors import MismatchError, describe_ranks
from .nn.parameter import Parameter

__all__ = ["LossScaler", "MixedPrecision", "initialize", "resolve_dtype"]


def resolve_dtype(dtype):
    """'float16'/'fp16'/'half' or 'bfloat16'/'bf16' (needs ml_dtypes) -> a NumPy dtype."""
    name = getattr(dtype, "name", None) or str(numpy.dtype(dtype) if not isinstance(dtype, str) else dtype)
    name = {"fp16": "float16", "half": "float16", "bf16": "bfloat16"}.get(name, name)
    if name == "float16":
        return numpy.dtype(numpy.float16)
    if name == "bfloat16":
        if bfloat16 is None:
            raise ValueError("bfloat16 needs the ml_dtypes package; pip install ml_dtypes or use float16")
        return bfloat16
    raise ValueError(f"mixed precision computes in float16 or bfloat16, not {dtype!r}")


class LossScaler:
    """Dynamic loss scale: halve it on a step with inf/NaN, double it after ``growth_interval`` good steps.

    ``dynamic=False`` keeps ``init_scale`` fixed (steps with inf/NaN are still skipped).
    """

    def __init__(self, init_scale=2.0 ** 16, growth_factor=2.0, backoff_factor=0.5, growth_interval=2000,
                 dynamic=True):
        if not init_scale > 0 or not growth_factor >= 1 or not 0 < backoff_factor <= 1 or growth_interval < 1:
            raise ValueError(f"LossScaler needs init_scale > 0, growth_factor >= 1, 0 < backoff_factor <= 1 and "
                             f"growth_interval >= 1; got {init_scale}, {growth_factor}, {backoff_factor}, "
                             f"{growth_interval}")
        self.scale = float(init_scale)
        self.growth_factor, self.backoff_factor = float(growth_factor), float(backoff_factor)
        self.growth_interval, self.dynamic = int(growth_interval), bool(dynamic)
        self.growth_tracker = 0  # good steps since the last change of scale

    def scale_loss(self, x):
        """``x * scale``: a loss, or the loss gradient handed to ``model.backward`` (dtype kept)."""
        if hasattr(x, "dtype"):
            with numpy.errstate(over="ignore"):  # an overflow here is what the scaler detects and backs off from
                return x * x.dtype.type(self.scale)
        return x * self.scale

    def unscale(self, params):
        """Divide every ``p.grad`` by the scale in place; True when any of them holds inf or NaN (this rank)."""
        inv = 1.0 / self.scale
        found = False
        for p in params:
            if p.grad is not None:
                p.grad *= inv
                found = found or not _finite(p.grad)
        return found

    def update(self, found_inf):
        """Back off after an overflow, grow after ``growth_interval`` clean steps."""
        if not self.dynamic:
            return
        if found_inf:
            self.scale *= self.backoff_factor
            self.growth_tracker = 0
        else:
            self.growth_tracker += 1
            if self.growth_tracker == self.growth_interval:
                self.scale *= self.growth_factor
                self.growth_tracker = 0

    def state_dict(self):
        return {"scale": self.scale, "growth_tracker": self.growth_tracker, "growth_factor": self.growth_factor,
                "backoff_factor": self.backoff_factor, "growth_interval": self.growth_interval,
                "dynamic": self.dynamic}

    def load_state_dict(self, state):
        self.scale = float(state["scale"])
        self.growth_tracker = int(state["growth_tracker"])
        for key in ("growth_factor", "backoff_factor"):
            setattr(self, key, float(state.get(key, getattr(self, key))))
        self.growth_interval = int(state.get("growth_interval", self.growth_interval))
        self.dynamic = bool(state.get("dynamic", self.dynamic))

    def __repr__(self):
        return (f"LossScaler(scale={self.scale}, growth_factor={self.growth_factor}, backoff_factor="
                f"{self.backoff_factor}, growth_interval={self.growth_interval}, dynamic={self.dynamic})")


def _finite(a):
    """True when every element of ``a`` is finite (a float64 sum is inf/NaN exactly when one element is)."""
    with numpy.errstate(over="ignore", invalid="ignore"):  # an overflow is an answer here, not a warning
        return bool(numpy.isfinite(float(get_array_module(a).sum(a, dtype=numpy.float64))))


def overflow_everywhere(found, process_set=None, scale=None):
    """``found`` on any rank -> True on every rank (one MAX allreduce; local when MPI is not running).

    ``scale``, the loss scale this rank's gradients carry, travels in the same exchange: one that
    differs between ranks raises MismatchError on every rank (each would unscale the sum of
    gradients scaled alike by its own scale, and the replicas part).
    """
    runtime = sys.modules.get("mpidp.comm.runtime")  # never start MPI for a single-process user
    if runtime is None or not runtime.is_initialized():
        return bool(found)
    from .comm import collectives, objects, ops, process_set as _ps
    s = 0.0 if scale is None else float(scale)
    flag = numpy.array([1.0 if found else 0.0, s, -s], dtype=numpy.float64)
    out = collectives.allreduce(flag, op=ops.Max, name="amp.overflow", process_set=process_set)
    if out[1] != -out[2]:  # every rank sees the same largest and smallest scale: all raise together
        scales = objects.allgather_object(s, name="amp.loss_scale", process_set=process_set)
        by_rank = dict(zip(_ps.resolve(process_set)[0].ranks, scales))
        raise MismatchError(f"the loss scale differs between ranks ({describe_ranks(by_rank)}): each rank would "
                            f"unscale the averaged gradients by its own; give every rank the same loss scaler state "
                            f"(load it everywhere, or broadcast_optimizer_state from one rank)",
                            tensor="amp.loss_scale", field="scale", ranks=by_rank)
    return bool(out[0])


class MixedPrecision:
    """Optimizer wrapper: float32 masters for the (float16/bfloat16) parameters of ``optimizer``.

    ``model`` (optional) is cast to ``dtype`` in place (parameters and float
    buffers, same Parameter objects). ``loss_scale``: 'dynamic' (default for
    float16), a number (static), or None (no scaling; default for bfloat16).
    ``param_groups`` are the wrapped optimizer's own (learning-rate schedules
    keep working); masters are made from the compute parameters the first time
    they are needed and follow the parameters a ShardedOptimizer substitutes.
    """

    def __init__(self, model, optimizer, dtype="float16", loss_scale="default", process_set=None,
                 master_dtype=numpy.float32, **scaler_args):
        self.dtype = resolve_dtype(dtype)
        self.master_dtype = numpy.dtype(master_dtype)
        self.optimizer = optimizer
        self.process_set = process_set
        if loss_scale == "default":
            loss_scale = "dynamic" if self.dtype == numpy.float16 else None
        if loss_scale == "dynamic":
            self.scaler = LossScaler(**scaler_args)
        elif loss_scale is None:
            self.scaler = LossScaler(1.0, dynamic=False)
        else:
            self.scaler = LossScaler(float(loss_scale), dynamic=False)
        if model is not None:
            model.to(dtype=self.dtype)
        self._masters = {}  # id(compute param) -> (compute param, master Parameter)
        self._fresh = set()  # id(master) of masters made or loaded since the last step: they follow the model
        self._grad_buffers = {}  # array module name -> float32 scratch for one master's gradient
        self.skipped_steps = 0
        self.last_step_skipped = False

    # -- masters ------------------------------------------------------------------------------
    def _pairs(self):
        """[(compute param, master)] per param group, made or dropped to follow the current groups."""
        out, live = [], {}
        for group in self.optimizer.param_groups:
            pairs = []
            for p in group["params"]:
                entry = self._masters.get(id(p))
                if entry is None or entry[0] is not p:
                    entry = (p, self._make_master(p))
                live[id(p)] = entry
                pairs.append(entry)
            out.append(pairs)
        for key, (p, m) in self._masters.items():
            if key not in live and m is not p:
                self.optimizer.state.pop(m, None)
                self._fresh.discard(id(m))
        self._masters = live
        return out

    def _make_master(self, p):
        if numpy.dtype(p.dtype).itemsize >= self.master_dtype.itemsize:
            return p  # already full precision: it is its own master
        m = Parameter(p.data.astype(self.master_dtype), name=p.name, requires_grad=p.requires_grad)
        m.grad = None  # bound to a shared buffer only while the master is updated
        self._fresh.add(id(m))
        return m

    def _swapped(self, groups_pairs):
        """Context: the wrapped optimizer's groups hold the masters instead of the compute parameters."""
        return _Swap(self.optimizer.param_groups, [[m for _, m in pairs] for pairs in groups_pairs])

    def masters(self):
        """[(compute parameter, float32 master)] of every parameter this optimizer updates (a parameter that is
        already float32 is its own master)."""
        return [pair for pairs in self._pairs() for pair in pairs]

    def master_bytes(self):
        """Bytes of float32 masters and the shared float32 gradient buffer (not counting the optimizer state)."""
        return (sum(m.nbytes for p, m in self.masters() if m is not p)
                + sum(b.nbytes for b in self._grad_buffers.values()))

    def refresh_masters(self):
        """Copy the compute parameters into the masters (after loading weights into the model)."""
        for pairs in self._pairs():
            for p, m in pairs:
                if m is not p:
                    m.data[...] = p.data

    def _refresh_fresh(self, groups):
        """Until the next step, a master made or loaded follows its compute parameter where the two no
        longer agree: the model's weights may have changed since (weights loaded, or
        ``broadcast_parameters`` after ``broadcast_optimizer_state``, which made or loaded the masters; a
        sharded state is never broadcast, so each rank's own starting weights would have gone into its
        shard). Where they agree the master keeps its precision (a resume)."""
        for pairs in groups:
            for p, m in pairs:
                if id(m) in self._fresh and not get_array_module(p.data).array_equal(m.data.astype(p.dtype), p.data):
                    m.data[...] = p.data
        self._fresh.clear()

    # -- the step -------------------------------------------------------------------------------
    @property
    def loss_scale(self):
        """The current loss scale (multiply the loss gradient by it before ``model.backward``)."""
        return self.scaler.scale

    def scale_loss(self, x):
        """``x * loss_scale`` (a loss or a loss gradient)."""
        return self.scaler.scale_loss(x)

    def step(self):
        """Skip on every rank if any rank's gradients hold inf/NaN; else unscale into float32, step, cast back.

        Masters are updated one at a time through one reused float32 gradient
        buffer, so float32 gradients cost the largest parameter, not the model.
        """
        groups = self._pairs()
        inv = 1.0 / self.scaler.scale  # the scale this backward used (update() may change it below)
        found = any(not _finite(p.grad) for pairs in groups for p, _ in pairs
                    if p.grad is not None and p.requires_grad)
        found = overflow_everywhere(found, self.process_set, self.scaler.scale)
        self.scaler.update(found)
        self.last_step_skipped = found
        if found:
            self.skipped_steps += 1
            return
        if self._fresh:
            self._refresh_fresh(groups)
        own = [[m for p, m in pairs if m is p and p.grad is not None and p.requires_grad] for pairs in groups]
        for ps in own:
            for p in ps:
                p.grad *= inv
        if any(own):
            with _Swap(self.optimizer.param_groups, own):
                self.optimizer.step()
        for gi, pairs in enumerate(groups):
            only = [[] for _ in groups]
            for p, m in pairs:
                if m is p or p.grad is None or not p.requires_grad:
                    continue
                g = self._scratch(m)
                g[...] = p.grad
                g *= inv
                m.grad = g
                only[gi] = [m]
                with _Swap(self.optimizer.param_groups, only):
                    self.optimizer.step()
                m.grad = None
                p.data[...] = m.data

    def _scratch(self, m):
        """A float32 view shaped like ``m`` into one buffer that fits the largest master."""
        xp = get_array_module(m.data)
        buf = self._grad_buffers.get(xp.__name__)
        if buf is None or buf.size < m.size:
            buf = self._grad_buffers[xp.__name__] = xp.empty(max(m.size, 1), dtype=self.master_dtype)
        return buf[:m.size].reshape(m.shape)

    def zero_grad(self):
        """Zero the compute parameters' gradients (the masters' are overwritten every step)."""
        for group in self.optimizer.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    p.grad.fill(0)

    # -- the optimizer interface ------------------------------------------------------------------
    @property
    def param_groups(self):
        return self.optimizer.param_groups

    @property
    def state(self):
        """compute param -> the wrapped optimizer's state of its master, plus 'master' (the float32 weights)."""
        out = {}
        for pairs in self._pairs():
            for p, m in pairs:
                st = self.optimizer.state.get(m)
                if st is not None:
                    out[p] = st if m is p else {**st, "master": m.data}
        return out

    def init_state(self):
        groups = self._pairs()
        with self._swapped(groups):
            self.optimizer.init_state()

    def state_dict(self):
        """The wrapped optimizer's state_dict of the masters, a 'master' array per entry, and 'loss_scaler'."""
        groups = self._pairs()
        with self._swapped(groups):
            sd = self.optimizer.state_dict()
        flat = [m for pairs in groups for m in (mm for _, mm in pairs)]
        compute = [p for pairs in groups for p, _ in pairs]
        for i, (p, m) in enumerate(zip(compute, flat)):
            if m is not p:
                sd["state"].setdefault(i, {})
                sd["state"][i] = {**sd["state"][i], "master": m.data.copy()}
        sd["loss_scaler"] = self.scaler.state_dict()
        return sd

    def load_state_dict(self, state_dict):
        """Load ``state_dict()`` output (masters, moments, loss scale); the model gets the masters cast down."""
        groups = self._pairs()
        flat = [pair for pairs in groups for pair in pairs]
        inner = {}
        for i, entry in state_dict["state"].items():
            entry = dict(entry)
            master = entry.pop("master", None)
            i = int(i)
            if master is not None:
                if i >= len(flat):
                    raise ValueError(f"the state has a master for parameter index {i} but this optimizer has "
                                     f"{len(flat)} parameters; load a state saved for the same model")
                p, m = flat[i]
                if m is not p:
                    self._fresh.add(id(m))
                    xp = get_array_module(m.data)
                    m.data[...] = master if xp is numpy else xp.asarray(master)
                    p.data[...] = m.data
            if entry:
                inner[i] = entry
        if "loss_scaler" in state_dict:
            self.scaler.load_state_dict(state_dict["loss_scaler"])
        rest = {k: v for k, v in state_dict.items() if k not in ("state", "loss_scaler")}
        with self._swapped(groups):
            self.optimizer.load_state_dict({**rest, "state": inner})

    def __repr__(self):
        return (f"MixedPrecision({type(self.optimizer).__name__}, dtype={self.dtype}, "
                f"master_dtype={self.master_dtype}, {self.scaler})")


class _Swap:
    """Put ``lists`` into ``groups[i]['params']`` for the duration of a with-block."""

    def __init__(self, groups, lists):
        self.groups, self.lists, self.saved = groups, lists, None

    def __enter__(self):
        self.saved = [g["params"] for g in self.groups]
        for g, ps in zip(self.groups, self.lists):
            g["params"] = ps
        return self

    def __exit__(self, *exc):
        for g, ps in zip(self.groups, self.saved):
            g["params"] = ps


def initialize(model, optimizer, dtype="float16", loss_scale="default", process_set=None, **scaler_args):
    """apex-style: cast ``model`` to ``dtype`` and return ``(model, MixedPrecision(optimizer))``."""
    mp = MixedPrecision(model, optimizer, dtype, loss_scale, process_set, **scaler_args)
    return model, mp
