"""Adam (L2 weight decay added to the gradient) and AdamW (decoupled decay), torch.optim's rules."""
import math

from ..backend.xp import get_array_module
from .optimizer import Optimizer, check_nonnegative


class Adam(Optimizer):
    """m = b1 m + (1-b1) g, v = b2 v + (1-b2) g^2, p -= lr/(1-b1^t) * m / (sqrt(v)/sqrt(1-b2^t) + eps)."""

    _decoupled = False

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, amsgrad=False):
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay,
                                      amsgrad=bool(amsgrad)))

    def _check_group(self, group):
        for k in ("lr", "eps", "weight_decay"):
            check_nonnegative(k, group[k])
        b1, b2 = group["betas"]
        if not (0.0 <= b1 < 1.0 and 0.0 <= b2 < 1.0):
            raise ValueError(f"betas must lie in [0, 1), got {group['betas']}")

    def _state_keys(self, group):
        keys = ("step", "exp_avg", "exp_avg_sq")
        return keys + ("max_exp_avg_sq",) if group["amsgrad"] else keys

    def _update(self, p, g, state, group):
        lr, (b1, b2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
        xp = get_array_module(p.data)
        t = self._work(p, 1)
        if wd and self._decoupled:
            p.data *= 1.0 - lr * wd
        elif wd:
            gw = self._work(p, 0)
            xp.multiply(p.data, wd, out=gw)
            gw += g
            g = gw
        state["step"] += 1
        step = state["step"]
        m, v = state["exp_avg"], state["exp_avg_sq"]
        m *= b1
        xp.multiply(g, 1.0 - b1, out=t)
        m += t
        v *= b2
        xp.multiply(g, g, out=t)
        t *= 1.0 - b2
        v += t
        if group["amsgrad"]:
            v = xp.maximum(state["max_exp_avg_sq"], v, out=state["max_exp_avg_sq"])
        xp.sqrt(v, out=t)
        t /= math.sqrt(1.0 - b2 ** step)
        t += eps
        xp.divide(m, t, out=t)
        t *= lr / (1.0 - b1 ** step)
        p.data -= t


class AdamW(Adam):
    """Adam with decoupled weight decay: p *= 1 - lr * weight_decay before the Adam step."""

    _decoupled = True

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2, amsgrad=False):
        super().__init__(params, lr, betas, eps, weight_decay, amsgrad)
