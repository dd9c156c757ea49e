"""Module: registered parameters, buffers and submodules, the forward/backward protocol and its hooks.

A module's ``__call__(x)`` runs ``forward`` and keeps what backward needs on a
per-module stack (so a module may be called several times in one forward);
``backward(dy)`` pops it, accumulates into each parameter's ``.grad`` and
returns dx. A call on a module while no other module is running starts a new
pass: it drops the caches and use counts left by forwards that never saw a
backward (evaluation), so one model is one root module.
"""
import collections
import contextlib

from ..backend.xp import get_array_module, is_float_dtype, resolve_module, to_module
from ..errors import MpidpError
from .parameter import Parameter, add_hook


class _Mode:
    """Process-wide autograd switches (nn is single-threaded per rank)."""

    caching = True       # layers keep what backward needs
    counting = True      # parameter uses are counted for the gradient-ready hooks
    recomputing = False  # a Checkpoint re-runs a forward (BatchNorm then leaves its running stats)
    depth = 0            # modules currently inside __call__


_mode = _Mode()


@contextlib.contextmanager
def _switch(**values):
    old = {k: getattr(_mode, k) for k in values}
    for k, v in values.items():
        setattr(_mode, k, v)
    try:
        yield
    finally:
        for k, v in old.items():
            setattr(_mode, k, v)


def no_grad():
    """Context manager: forwards inside keep no activations and count no parameter uses."""
    return _switch(caching=False, counting=False)


def is_grad_enabled():
    """True unless inside ``no_grad()``."""
    return _mode.caching


IncompatibleKeys = collections.namedtuple("IncompatibleKeys", ["missing_keys", "unexpected_keys"])


class Module:
    """Base class of layers and models: ``y = m(x)``, ``dx = m.backward(dy)``."""

    def __init__(self):
        d = self.__dict__
        d["_parameters"], d["_buffers"], d["_modules"] = {}, {}, {}
        d["_cache"] = []
        d["training"] = True
        d["_forward_pre_hooks"], d["_forward_hooks"] = {}, {}
        d["_backward_pre_hooks"], d["_backward_hooks"] = {}, {}

    # -- registration -------------------------------------------------------------------------
    def __setattr__(self, name, value):
        d = self.__dict__
        if "_parameters" not in d:
            raise AttributeError(f"cannot set {name!r} on {type(self).__name__} before Module.__init__ ran; "
                                 f"call super().__init__() first in __init__")
        params, mods, bufs = d["_parameters"], d["_modules"], d["_buffers"]
        if isinstance(value, Parameter):
            mods.pop(name, None)
            bufs.pop(name, None)
            params[name] = value
            if value.name is None:
                value.name = name
        elif isinstance(value, Module):
            params.pop(name, None)
            bufs.pop(name, None)
            mods[name] = value
            _prefix_names(value, name)
        elif name in bufs:
            bufs[name] = value
        elif name in params or name in mods:
            if value is not None:
                kind = "parameter" if name in params else "submodule"
                raise TypeError(f"{name!r} is a {kind} of {type(self).__name__}; assign a "
                                f"{'Parameter' if kind == 'parameter' else 'Module'} or None, "
                                f"not {type(value).__name__}")
            params.pop(name, None)
            mods.pop(name, None)
        object.__setattr__(self, name, value)

    def __delattr__(self, name):
        for store in (self._parameters, self._buffers, self._modules):
            store.pop(name, None)
        object.__delattr__(self, name)

    def register_buffer(self, name, array):
        """Register ``array`` as state that is saved in ``state_dict`` but not trained."""
        if name in self._parameters or name in self._modules:
            raise KeyError(f"{name!r} is already a parameter or submodule of {type(self).__name__}; "
                           f"choose another buffer name")
        self._buffers[name] = array
        object.__setattr__(self, name, array)

    def add_module(self, name, module):
        """Register ``module`` as a child called ``name`` (for names that are not identifiers)."""
        setattr(self, name, module)

    # -- the forward / backward protocol -------------------------------------------------------
    def forward(self, x):
        """Compute the output; layers call ``self._save(...)`` for what backward needs."""
        raise NotImplementedError(f"{type(self).__name__} defines no forward; implement forward(x)")

    def _backward(self, dy):
        """Return dx from dy, accumulating into the parameters' ``.grad`` (layers implement this)."""
        raise NotImplementedError(f"{type(self).__name__} defines no backward; implement _backward(dy)")

    def __call__(self, x):
        mode = _mode
        if mode.depth == 0 and mode.caching:
            self._start_pass()
        for fn in tuple(self._forward_pre_hooks.values()):
            r = fn(self, x)
            x = x if r is None else r
        if mode.counting:
            for p in self._parameters.values():
                p._use()
        mode.depth += 1
        try:
            y = self.forward(x)
        finally:
            mode.depth -= 1
        for fn in tuple(self._forward_hooks.values()):
            r = fn(self, x, y)
            y = y if r is None else r
        return y

    def backward(self, dy):
        """Backpropagate ``dy`` through the last un-backpropagated call; returns dx."""
        for fn in tuple(self._backward_pre_hooks.values()):
            r = fn(self, dy)
            dy = dy if r is None else r
        dx = self._backward(dy)
        for p in self._parameters.values():
            p._release()
        for fn in tuple(self._backward_hooks.values()):
            r = fn(self, dx)
            dx = dx if r is None else r
        return dx

    def _save(self, *items):
        if _mode.caching:
            self._cache.append(items)

    def _pop(self):
        if not self._cache:
            raise MpidpError(f"{type(self).__name__}.backward has no forward left to undo; call the module "
                             f"(outside no_grad) once before each backward")
        return self._cache.pop()

    def _start_pass(self):
        for m in self.modules():
            m._cache.clear()
            for p in m._parameters.values():
                p._uses = 0

    def clear_cache(self):
        """Drop every kept activation in this module tree (and pending hook counts)."""
        self._start_pass()

    def activation_bytes(self):
        """Bytes of the arrays this module tree keeps for backward right now."""
        seen, total = set(), 0
        for m in self.modules():
            for entry in m._cache:
                for a in entry:
                    if hasattr(a, "nbytes") and id(a) not in seen:
                        seen.add(id(a))
                        total += int(a.nbytes)
        return total

    # -- hooks ----------------------------------------------------------------------------------
    def register_forward_pre_hook(self, fn):
        """``fn(module, x)`` before forward; a non-None return replaces x."""
        return add_hook(self._forward_pre_hooks, fn)

    def register_forward_hook(self, fn):
        """``fn(module, x, y)`` after forward; a non-None return replaces y."""
        return add_hook(self._forward_hooks, fn)

    def register_backward_pre_hook(self, fn):
        """``fn(module, dy)`` before backward; a non-None return replaces dy."""
        return add_hook(self._backward_pre_hooks, fn)

    def register_backward_hook(self, fn):
        """``fn(module, dx)`` after backward and after its parameters' gradient hooks; may replace dx."""
        return add_hook(self._backward_hooks, fn)

    # -- traversal ------------------------------------------------------------------------------
    def named_modules(self, prefix="", _seen=None):
        """(dotted name, module) for this module and every descendant, pre-order, no duplicates."""
        seen = set() if _seen is None else _seen
        if id(self) in seen:
            return
        seen.add(id(self))
        yield prefix, self
        for name, child in self._modules.items():
            yield from child.named_modules(f"{prefix}.{name}" if prefix else name, seen)

    def modules(self):
        """This module and its descendants, pre-order."""
        for _, m in self.named_modules():
            yield m

    def named_children(self):
        """(name, child) in registration order."""
        return iter(self._modules.items())

    def children(self):
        """Direct submodules in registration order."""
        return iter(self._modules.values())

    def named_parameters(self, prefix="", recurse=True):
        """(dotted name, Parameter) in registration order, each shared Parameter once."""
        seen = set()
        mods = self.named_modules(prefix) if recurse else [(prefix, self)]
        for mname, m in mods:
            for name, p in m._parameters.items():
                if id(p) not in seen:
                    seen.add(id(p))
                    yield (f"{mname}.{name}" if mname else name), p

    def parameters(self, recurse=True):
        """Parameters in registration order, each once."""
        for _, p in self.named_parameters(recurse=recurse):
            yield p

    def named_buffers(self, prefix=""):
        """(dotted name, array) of every registered buffer."""
        for mname, m in self.named_modules(prefix):
            for name, b in m._buffers.items():
                yield (f"{mname}.{name}" if mname else name), b

    def buffers(self):
        """Registered buffers in order."""
        for _, b in self.named_buffers():
            yield b

    def num_parameters(self):
        """Total number of trainable elements."""
        return sum(p.size for p in self.parameters())

    def apply(self, fn):
        """Call ``fn(module)`` on every module of the tree; returns self."""
        for m in self.modules():
            fn(m)
        return self

    # -- modes and gradients --------------------------------------------------------------------
    def train(self, mode=True):
        """Training mode (dropout on, batch statistics); returns self."""
        for m in self.modules():
            m.__dict__["training"] = bool(mode)
        return self

    def eval(self):
        """Evaluation mode (dropout off, running statistics); returns self."""
        return self.train(False)

    def requires_grad_(self, flag=True):
        """Freeze (False) or unfreeze every parameter; returns self."""
        for p in self.parameters():
            p.requires_grad = bool(flag)
        return self

    def zero_grad(self):
        """Set every gradient to zero in place (the arrays keep their identity)."""
        for p in self.parameters():
            if p.grad is not None:
                p.grad.fill(0)

    # -- state ----------------------------------------------------------------------------------
    def state_dict(self):
        """Ordered name -> live array of every parameter and buffer (copy them to snapshot)."""
        sd = collections.OrderedDict()
        seen = set()
        for mname, m in self.named_modules():
            for name, p in m._parameters.items():
                if id(p) not in seen:
                    seen.add(id(p))
                    sd[f"{mname}.{name}" if mname else name] = p.data
            for name, b in m._buffers.items():
                sd[f"{mname}.{name}" if mname else name] = b
        return sd

    def load_state_dict(self, state_dict, strict=True):
        """Copy arrays from ``state_dict`` into this module in place; returns (missing, unexpected)."""
        own = self.state_dict()
        missing = [k for k in own if k not in state_dict]
        unexpected = [k for k in state_dict if k not in own]
        if strict and (missing or unexpected):
            raise KeyError(f"state_dict does not match {type(self).__name__}: missing keys {missing}, "
                           f"unexpected keys {unexpected}; load the state of the same model or pass strict=False")
        for key, target in own.items():
            if key not in state_dict:
                continue
            value = state_dict[key]
            if tuple(value.shape) != tuple(target.shape):
                raise ValueError(f"state_dict[{key!r}] has shape {tuple(value.shape)} but the model's {key!r} has "
                                 f"shape {tuple(target.shape)}; load a state saved from the same architecture")
            target[...] = to_module(value, get_array_module(target))
        return IncompatibleKeys(missing, unexpected)

    def to(self, device=None, dtype=None):
        """Move parameters (data and grad, same Parameter objects) and buffers to a device/xp and/or float dtype."""
        for m in self.modules():
            m._cache.clear()
            for p in m._parameters.values():
                xp = resolve_module(device) if device is not None else get_array_module(p.data)
                p._move(xp, dtype)
            for name, b in list(m._buffers.items()):
                xp = resolve_module(device) if device is not None else get_array_module(b)
                b = to_module(b, xp)
                if dtype is not None and is_float_dtype(b.dtype):
                    b = b.astype(dtype)
                setattr(m, name, b)
        return self

    def rng_state(self):
        """dotted module name -> RNG state of every module that draws random numbers (Dropout)."""
        return {name: m._get_rng_state() for name, m in self.named_modules() if hasattr(m, "_get_rng_state")}

    def set_rng_state(self, states):
        """Restore what ``rng_state()`` returned, so masks repeat bit for bit."""
        for name, m in self.named_modules():
            if hasattr(m, "_get_rng_state"):
                if name not in states:
                    raise KeyError(f"no RNG state for module {name!r}; pass the dict rng_state() returned "
                                   f"for the same model (it has {sorted(states)})")
                m._set_rng_state(states[name])

    # -- printing -------------------------------------------------------------------------------
    def extra_repr(self):
        """The arguments shown in ``repr`` (layers override)."""
        return ""

    def __repr__(self):
        lines = [f"({name}): " + repr(m).replace("\n", "\n  ") for name, m in self._modules.items()]
        head = f"{type(self).__name__}({self.extra_repr()}"
        return head + ")" if not lines else head + "\n  " + "\n  ".join(lines) + "\n)"


def _prefix_names(child, prefix):
    """Give the parameters a just-attached child registered first their dotted names."""
    for rel, p in child.named_parameters():
        if p.name is None or p.name == rel:
            p.name = f"{prefix}.{rel}"
