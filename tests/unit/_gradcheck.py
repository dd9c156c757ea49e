"""Finite-difference gradient checks for mpidp.nn modules and losses (float64 reference)."""
import numpy

from mpidp import nn


def _sample(shape, n, rng):
    size = int(numpy.prod(shape))
    flat = rng.choice(size, size=min(n, size), replace=False)
    return [numpy.unravel_index(i, shape) for i in flat]


def _numeric(f, arr, idx, eps):
    old = arr[idx].copy()
    arr[idx] = old + eps
    fp = f()
    arr[idx] = old - eps
    fm = f()
    arr[idx] = old
    return (fp - fm) / (2 * eps)


def gradcheck_module(module, x, seed=0, n=20, eps=1e-6, rtol=1e-5, atol=1e-6):
    """Check dx and every parameter's grad of ``module`` at float64 input ``x``; returns (y, dx, grads, dy)."""
    rng = numpy.random.default_rng(seed)
    state = module.rng_state()
    module.zero_grad()
    y = module(x)
    dy = rng.standard_normal(y.shape)
    dx = module.backward(dy)
    grads = {name: p.grad.copy() for name, p in module.named_parameters()}

    def f():
        module.set_rng_state(state)
        with nn.no_grad():
            return float((module(x) * dy).sum())

    if dx is not None and x.dtype.kind == "f":
        assert dx.shape == x.shape
        for idx in _sample(x.shape, n, rng):
            num = _numeric(f, x, idx, eps)
            assert abs(num - dx[idx]) <= atol + rtol * abs(num), f"dx{idx}: numeric {num} analytic {dx[idx]}"
    for name, p in module.named_parameters():
        if not p.requires_grad:
            continue
        for idx in _sample(p.shape, n, rng):
            num = _numeric(f, p.data, idx, eps)
            got = grads[name][idx]
            assert abs(num - got) <= atol + rtol * abs(num), f"{name}{idx}: numeric {num} analytic {got}"
    module.set_rng_state(state)
    return y, dx, grads, dy


def run_in_dtype(module, x, dy, dtype):
    """Forward/backward of ``module`` cast to ``dtype`` on x, dy cast likewise; returns (y, dx, grads)."""
    module.to(dtype=dtype)
    module.zero_grad()
    xc = x.astype(dtype) if x.dtype.kind == "f" else x
    y = module(xc)
    dx = module.backward(dy.astype(dtype))
    return y, dx, {name: p.grad.copy() for name, p in module.named_parameters()}


def close(a, b, rel):
    """max |a - b| <= rel * (max |b| + 1e-3)."""
    a, b = numpy.asarray(a, dtype=numpy.float64), numpy.asarray(b, dtype=numpy.float64)
    return float(numpy.max(numpy.abs(a - b), initial=0.0)) <= rel * (float(numpy.max(numpy.abs(b), initial=0.0)) + 1e-3)


def gradcheck_loss(crit, pred, target, seed=0, eps=1e-6, rtol=1e-5, atol=1e-7):
    """Check crit.backward() against central differences of crit(pred, target)."""
    rng = numpy.random.default_rng(seed)
    crit(pred, target)
    d = crit.backward()
    for idx in _sample(pred.shape, 30, rng):
        num = _numeric(lambda: crit(pred, target), pred, idx, eps)
        assert abs(num - d[idx]) <= atol + rtol * abs(num), f"d{idx}: numeric {num} analytic {d[idx]}"
    return d
