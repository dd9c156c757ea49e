"""Gradient clipping by total norm."""
import math

import numpy

from ..backend.xp import get_array_module
from ..nn.functional import acc_dtype
from ..nn.parameter import Parameter


def grad_norm(params, norm_type=2.0):
    """Total ``norm_type`` norm of all gradients together (float); inf is the max-abs norm."""
    if isinstance(params, Parameter):
        params = [params]
    norm_type = float(norm_type)
    total = 0.0
    for p in params:
        g = p.grad
        if g is None:
            continue
        xp = get_array_module(g)
        g = g.astype(acc_dtype(g.dtype), copy=False).ravel()
        if g.size == 0:
            continue
        if norm_type == math.inf:
            total = max(total, float(xp.abs(g).max()))
        elif norm_type == 2.0:
            total += float(xp.vdot(g, g))
        else:
            total += float((xp.abs(g) ** norm_type).sum())
    if norm_type == math.inf:
        return total
    return total ** (1.0 / norm_type)


def clip_grad_norm(params, max_norm, norm_type=2.0, error_if_nonfinite=False):
    """Scale all gradients in place so their total norm is at most ``max_norm``; returns the norm before."""
    params = [params] if isinstance(params, Parameter) else list(params)
    total = grad_norm(params, norm_type)
    if error_if_nonfinite and not numpy.isfinite(total):
        raise FloatingPointError(f"the total gradient norm is {total}; lower the learning rate or use a loss "
                                 f"scaler, or pass error_if_nonfinite=False")
    coef = float(max_norm) / (total + 1e-6)
    if coef < 1.0:
        for p in params:
            if p.grad is not None:
                p.grad *= coef
    return total
