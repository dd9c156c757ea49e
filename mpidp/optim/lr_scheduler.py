"""Learning-rate schedules as closed-form functions of the step count (so their state is one integer).

Call ``scheduler.step()`` after each ``optimizer.step()``. To scale with the job size, build the
optimizer with ``lr = base_lr * mpidp.size()`` and warm up from ``start_factor = 1 / mpidp.size()``.
"""
import math


class LRScheduler:
    """Base: writes ``get_lr()`` into the optimizer's param groups at every ``step()``."""

    def __init__(self, optimizer, last_epoch=-1):
        self.optimizer = optimizer
        for group in optimizer.param_groups:
            group.setdefault("initial_lr", group["lr"])
        self.base_lrs = [group["initial_lr"] for group in optimizer.param_groups]
        self.last_epoch = int(last_epoch)
        self.step()

    def get_lr(self):
        """The lrs for step ``self.last_epoch``, one per param group."""
        raise NotImplementedError

    def step(self):
        """Advance one step and write the new lrs into the param groups."""
        self.last_epoch += 1
        self._last_lr = [float(lr) for lr in self.get_lr()]
        for group, lr in zip(self.optimizer.param_groups, self._last_lr):
            group["lr"] = lr

    def get_last_lr(self):
        """The lrs set by the last ``step()``."""
        return list(self._last_lr)

    def state_dict(self):
        """{'last_epoch': t, 'base_lrs': [...]}; functions are code, not state."""
        return {"last_epoch": self.last_epoch, "base_lrs": list(self.base_lrs)}

    def load_state_dict(self, state):
        """Resume at the saved step and set its lrs."""
        if len(state["base_lrs"]) != len(self.base_lrs):
            raise ValueError(f"the schedule state has {len(state['base_lrs'])} base lrs but the optimizer has "
                             f"{len(self.base_lrs)} param groups; load a state saved for the same optimizer")
        self.base_lrs = [float(b) for b in state["base_lrs"]]
        self.last_epoch = int(state["last_epoch"]) - 1
        self.step()


def _positive(name, value):
    if int(value) < 1:
        raise ValueError(f"{name} must be a positive number of steps, got {value}")
    return int(value)


class LambdaLR(LRScheduler):
    """lr_i(t) = base_lr_i * lr_lambda(t)."""

    def __init__(self, optimizer, lr_lambda, last_epoch=-1):
        self.lr_lambda = lr_lambda
        super().__init__(optimizer, last_epoch)

    def get_lr(self):
        f = self.lr_lambda(self.last_epoch)
        return [base * f for base in self.base_lrs]


def linear_warmup_factor(warmup_steps, start_factor=0.0):
    """t -> start_factor + (1 - start_factor) * min(t, warmup_steps) / warmup_steps."""
    warmup_steps = _positive("warmup_steps", warmup_steps)
    return lambda t: start_factor + (1.0 - start_factor) * min(t, warmup_steps) / warmup_steps


def cosine_factor(t_max, final_factor=0.0):
    """t -> final + (1 - final) (1 + cos(pi min(t, t_max) / t_max)) / 2."""
    t_max = _positive("T_max", t_max)
    return lambda t: final_factor + (1.0 - final_factor) * 0.5 * (1.0 + math.cos(math.pi * min(t, t_max) / t_max))


class LinearWarmup(LambdaLR):
    """lr rises linearly from start_factor * base_lr at step 0 to base_lr at ``warmup_steps``, then stays."""

    def __init__(self, optimizer, warmup_steps, start_factor=0.0, last_epoch=-1):
        super().__init__(optimizer, linear_warmup_factor(warmup_steps, start_factor), last_epoch)


class CosineAnnealing(LRScheduler):
    """lr = eta_min + (base_lr - eta_min) (1 + cos(pi t / T_max)) / 2, held at eta_min after T_max."""

    def __init__(self, optimizer, T_max, eta_min=0.0, last_epoch=-1):
        self.T_max, self.eta_min = _positive("T_max", T_max), float(eta_min)
        super().__init__(optimizer, last_epoch)

    def get_lr(self):
        c = 0.5 * (1.0 + math.cos(math.pi * min(self.last_epoch, self.T_max) / self.T_max))
        return [self.eta_min + (base - self.eta_min) * c for base in self.base_lrs]


class StepLR(LambdaLR):
    """lr = base_lr * gamma ** (t // step_size)."""

    def __init__(self, optimizer, step_size, gamma=0.1, last_epoch=-1):
        step_size = _positive("step_size", step_size)
        super().__init__(optimizer, lambda t: gamma ** (t // step_size), last_epoch)


def warmup_cosine(optimizer, warmup_steps, total_steps, start_factor=0.0, final_factor=0.0):
    """LambdaLR: linear warm-up to base_lr over ``warmup_steps``, cosine to final_factor * base_lr at total_steps."""
    up = linear_warmup_factor(warmup_steps, start_factor)
    down = cosine_factor(_positive("total_steps - warmup_steps", total_steps - warmup_steps), final_factor)
    return LambdaLR(optimizer, lambda t: up(t) if t < warmup_steps else down(t - warmup_steps))
