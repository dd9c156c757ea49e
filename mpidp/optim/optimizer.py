"""Optimizer base: parameter groups, per-parameter state arrays, state_dict, reused scratch space."""
import numpy

from ..backend.xp import get_array_module, to_module
from ..nn.parameter import Parameter


class Optimizer:
    """Holds ``param_groups`` (dicts with 'params' and hyperparameters) and ``state`` (Parameter -> dict)."""

    def __init__(self, params, defaults):
        self.defaults = dict(defaults)
        self.param_groups = []
        self.state = {}
        self._scratch = {}
        if isinstance(params, Parameter):
            params = [params]
        params = list(params)
        if not params:
            raise ValueError(f"{type(self).__name__} got an empty parameter list; pass model.parameters()")
        if not isinstance(params[0], dict):
            params = [{"params": params}]
        for group in params:
            self.add_param_group(group)

    def add_param_group(self, group):
        """Add a dict with 'params' (Parameters) and optional hyperparameters; the rest come from defaults."""
        group = dict(group)
        ps = group.get("params")
        ps = [ps] if isinstance(ps, Parameter) else list(ps if ps is not None else [])
        for i, p in enumerate(ps):
            if not isinstance(p, Parameter):
                raise TypeError(f"param group entry {i} is a {type(p).__name__}, not an nn.Parameter; "
                                f"pass model.parameters()")
        seen = {id(p) for g in self.param_groups for p in g["params"]}
        dup = [p.name for p in ps if id(p) in seen]
        if dup or len({id(p) for p in ps}) != len(ps):
            raise ValueError(f"parameters {dup or 'in this group'} appear in more than one place; "
                             f"give each parameter to one group once")
        unknown = set(group) - set(self.defaults) - {"params", "initial_lr"}
        if unknown:
            raise KeyError(f"unknown hyperparameters {sorted(unknown)} for {type(self).__name__}; "
                           f"known are {sorted(self.defaults)}")
        for k, v in self.defaults.items():
            group.setdefault(k, v)
        self._check_group(group)
        group["params"] = ps
        self.param_groups.append(group)

    def _check_group(self, group):
        """Validate hyperparameters (subclasses)."""

    def _state_keys(self, group):
        """Names of the state arrays each parameter of ``group`` gets (subclasses)."""
        return ()

    def _new_state(self, p, group):
        xp = get_array_module(p.data)
        st = {k: xp.zeros_like(p.data) for k in self._state_keys(group) if k != "step"}
        if "step" in self._state_keys(group):
            st["step"] = 0
        return st

    def _params(self):
        for group in self.param_groups:
            for p in group["params"]:
                yield p, group

    def _state_for(self, p, group):
        st = self.state.get(p)
        if st is None:
            st = self.state[p] = self._new_state(p, group)
        return st

    def init_state(self):
        """Create every lazily made state entry now (zeros, step 0), e.g. to broadcast it before step 1."""
        for p, group in self._params():
            if p.requires_grad:
                self._state_for(p, group)

    def _work(self, p, slot):
        """A reused scratch array shaped like ``p`` (slot 0 or 1); allocated once per (module, dtype)."""
        xp = get_array_module(p.data)
        key = (xp.__name__, p.dtype, slot)
        buf = self._scratch.get(key)
        if buf is None or buf.size < p.size:
            buf = self._scratch[key] = xp.empty(max(p.size, 1), dtype=p.dtype)
        return buf[:p.size].reshape(p.shape)

    def zero_grad(self):
        """Zero every parameter's grad in place."""
        for p, _ in self._params():
            if p.grad is not None:
                p.grad.fill(0)

    def step(self):
        """Update every parameter with a grad in place; never modifies ``.grad``."""
        for p, group in self._params():
            if p.grad is not None and p.requires_grad:
                self._update(p, p.grad, self._state_for(p, group), group)

    def _update(self, p, g, state, group):
        raise NotImplementedError

    def state_dict(self):
        """{'state': {index: {key: array or int}}, 'param_groups': [hyperparameters, 'params': [indices]]}."""
        index, groups, i = {}, [], 0
        for group in self.param_groups:
            ids = []
            for p in group["params"]:
                index[id(p)] = i
                ids.append(i)
                i += 1
            groups.append({**{k: v for k, v in group.items() if k != "params"}, "params": ids})
        state = {index[id(p)]: dict(st) for p, st in self.state.items() if id(p) in index}
        return {"state": dict(sorted(state.items())), "param_groups": groups}

    def load_state_dict(self, state_dict):
        """Load ``state_dict()`` output of an optimizer over the same parameters (arrays copied in place)."""
        groups = state_dict["param_groups"]
        if len(groups) != len(self.param_groups):
            raise ValueError(f"the state has {len(groups)} param groups but this optimizer has "
                             f"{len(self.param_groups)}; load a state saved for the same parameter groups")
        params = []
        for gi, (saved, group) in enumerate(zip(groups, self.param_groups)):
            if len(saved["params"]) != len(group["params"]):
                raise ValueError(f"param group {gi} has {len(saved['params'])} parameters in the state but "
                                 f"{len(group['params'])} here; load a state saved for the same model")
            params += list(zip(saved["params"], group["params"], [group] * len(group["params"])))
        by_index = {i: (p, group) for i, p, group in params}
        for i, entry in state_dict["state"].items():
            if int(i) not in by_index:
                raise ValueError(f"the state has an entry for parameter index {i} but this optimizer has "
                                 f"{len(by_index)} parameters; load a state saved for the same model")
            p, group = by_index[int(i)]
            want = set(self._state_keys(group))
            if set(entry) != want:
                raise ValueError(f"state of parameter {i} ({p.name}) has keys {sorted(entry)} but "
                                 f"{type(self).__name__} expects {sorted(want)}; check momentum/amsgrad settings")
            for key, value in entry.items():
                if key != "step" and tuple(value.shape) != p.shape:
                    raise ValueError(f"state[{i}][{key!r}] ({p.name}) has shape {tuple(value.shape)} but the "
                                     f"parameter has shape {p.shape}; load a state saved for the same model")
        for group, saved in zip(self.param_groups, groups):
            group.update({k: v for k, v in saved.items() if k != "params"})
        for i, entry in state_dict["state"].items():
            p, group = by_index[int(i)]
            st = self._state_for(p, group)
            xp = get_array_module(p.data)
            for key, value in entry.items():
                if key == "step":
                    st[key] = int(value)
                else:
                    st[key][...] = to_module(value, xp)

    def __repr__(self):
        lines = [f"{type(self).__name__} ("]
        for i, group in enumerate(self.param_groups):
            hp = ", ".join(f"{k}={v}" for k, v in group.items() if k != "params")
            lines.append(f"  group {i}: {len(group['params'])} params, {hp}")
        return "\n".join(lines + [")"])


def check_nonnegative(name, value):
    """Raise a ValueError naming the hyperparameter when ``value`` < 0."""
    if not numpy.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be a finite number >= 0, got {value}")
