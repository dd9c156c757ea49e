"""SGD with momentum, dampening, Nesterov and L2 weight decay (torch.optim.SGD's rules)."""
from ..backend.xp import get_array_module
from .optimizer import Optimizer, check_nonnegative


class SGD(Optimizer):
    """p -= lr * d with d = g + wd p, buf = m buf + (1 - dampening) d, d = buf (or d + m buf for Nesterov)."""

    def __init__(self, params, lr, momentum=0.0, dampening=0.0, nesterov=False, weight_decay=0.0):
        super().__init__(params, dict(lr=lr, momentum=momentum, dampening=dampening, nesterov=nesterov,
                                      weight_decay=weight_decay))

    def _check_group(self, group):
        for k in ("lr", "momentum", "dampening", "weight_decay"):
            check_nonnegative(k, group[k])
        if group["nesterov"] and (group["momentum"] <= 0 or group["dampening"] != 0):
            raise ValueError(f"Nesterov momentum needs momentum > 0 and dampening 0, got momentum="
                             f"{group['momentum']}, dampening={group['dampening']}")

    def _state_keys(self, group):
        return ("momentum_buffer", "step") if group["momentum"] else ()

    def _update(self, p, g, state, group):
        lr, m, damp, wd = group["lr"], group["momentum"], group["dampening"], group["weight_decay"]
        xp = get_array_module(p.data)
        d, own = g, False  # own: d is scratch space this step may overwrite
        if wd:
            d, own = self._work(p, 0), True
            xp.multiply(p.data, wd, out=d)
            d += g
        if m:
            buf = state["momentum_buffer"]
            if state["step"] == 0:  # torch starts the buffer at d, without dampening
                buf[...] = d
            else:
                buf *= m
                if damp:
                    t = self._work(p, 1)
                    xp.multiply(d, 1.0 - damp, out=t)
                    buf += t
                else:
                    buf += d
            state["step"] += 1
            if group["nesterov"]:
                t = self._work(p, 1)
                xp.multiply(buf, m, out=t)
                t += d
                d, own = t, True
            else:
                d, own = buf, False
        if own:
            d *= lr
        else:
            d = xp.multiply(d, lr, out=self._work(p, 0))
        p.data -= d
