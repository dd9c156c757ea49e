"""Pure forward/backward kernels on NumPy or CuPy arrays (the array module comes from the inputs).

Layers are thin wrappers that cache inputs and accumulate gradients; the math is here.
16-bit inputs are reduced in float32 (softmax, norms, losses) and returned in their dtype.
"""
import math

import numpy

from ..backend.xp import bfloat16, get_array_module

_GELU_C = math.sqrt(2.0 / math.pi)


def acc_dtype(dtype):
    """The dtype reductions run in: float32 for float16/bfloat16, else ``dtype`` itself."""
    dtype = numpy.dtype(dtype)
    if dtype == numpy.float16 or (bfloat16 is not None and dtype == bfloat16):
        return numpy.dtype(numpy.float32)
    return dtype


def _up(x):
    """``x`` in its accumulation dtype (no copy when it already is)."""
    return x.astype(acc_dtype(x.dtype), copy=False)


def matmul(a, b):
    """``a @ b``; NumPy float16 products run in float32 (NumPy's float16 GEMM is ~100x slower)."""
    if a.dtype == numpy.float16 and type(a) is numpy.ndarray:
        return (a.astype(numpy.float32) @ b.astype(numpy.float32)).astype(numpy.float16)
    return a @ b


# -- dense --------------------------------------------------------------------------------------
def linear_forward(x, w, b=None):
    """x (..., in), w (out, in), b (out,) -> y (..., out)."""
    y = matmul(x, w.T)
    if b is not None:
        y += b
    return y


def linear_backward(dy, x, w, need_w=True, need_b=True):
    """dy (..., out) -> dx (..., in), dw (out, in) or None, db (out,) or None."""
    dx = matmul(dy, w)
    dy2 = dy.reshape(-1, dy.shape[-1])
    dw = matmul(dy2.T, x.reshape(-1, x.shape[-1])) if need_w else None
    db = dy2.sum(0) if need_b else None
    return dx, dw, db


# -- convolution via im2col ---------------------------------------------------------------------
def _pad2d(x, padding, value=0.0):
    if not padding:
        return x
    xp = get_array_module(x)
    return xp.pad(x, ((0, 0), (0, 0), (padding, padding), (padding, padding)), constant_values=value)


def _windows(x, kh, kw, stride):
    """Strided view (N, OH, OW, C, KH, KW) of every kernel window of x (N, C, H, W); no copy."""
    xp = get_array_module(x)
    n, c, h, w = x.shape
    oh, ow = (h - kh) // stride + 1, (w - kw) // stride + 1
    if oh < 1 or ow < 1:
        raise ValueError(f"a {kh}x{kw} window does not fit the (padded) {h}x{w} input; "
                         f"use a smaller kernel or more padding")
    sn, sc, sh, sw = x.strides
    return xp.lib.stride_tricks.as_strided(
        x, (n, oh, ow, c, kh, kw), (sn, sh * stride, sw * stride, sc, sh, sw))


def _pad_nhwc(x, padding):
    """x (N, C, H, W) as a padded array laid out (N, H, W, C) in memory (one copy)."""
    xp = get_array_module(x)
    xn = x.transpose(0, 2, 3, 1)
    if padding:
        return xp.pad(xn, ((0, 0), (padding, padding), (padding, padding), (0, 0)))
    return xp.ascontiguousarray(xn)


def im2col(x, kh, kw, stride=1, padding=0):
    """x (N, C, H, W) -> columns (N*OH*OW, KH*KW*C), ordered (kh, kw, c) so copies run over C; and (OH, OW)."""
    xp = get_array_module(x)
    xn = _pad_nhwc(x, padding)
    n, hp, wp, c = xn.shape
    oh, ow = (hp - kh) // stride + 1, (wp - kw) // stride + 1
    if oh < 1 or ow < 1:
        raise ValueError(f"a {kh}x{kw} window does not fit the (padded) {hp}x{wp} input; "
                         f"use a smaller kernel or more padding")
    sn, sh, sw, sc = xn.strides
    win = xp.lib.stride_tricks.as_strided(xn, (n, oh, ow, kh, kw, c), (sn, sh * stride, sw * stride, sh, sw, sc))
    return win.reshape(n * oh * ow, kh * kw * c), (oh, ow)


def col2im(dcols, x_shape, kh, kw, stride=1, padding=0):
    """Adjoint of ``im2col``: columns (N*OH*OW, KH*KW*C) -> dx (N, C, H, W), overlaps summed."""
    xp = get_array_module(dcols)
    n, c, h, w = x_shape
    hp, wp = h + 2 * padding, w + 2 * padding
    oh, ow = (hp - kh) // stride + 1, (wp - kw) // stride + 1
    d6 = dcols.reshape(n, oh, ow, kh, kw, c)
    dxp = xp.zeros((n, hp, wp, c), dtype=dcols.dtype)
    for i in range(kh):
        for j in range(kw):
            dxp[:, i:i + stride * oh:stride, j:j + stride * ow:stride] += d6[:, :, :, i, j]
    return dxp[:, padding:padding + h, padding:padding + w].transpose(0, 3, 1, 2)


def _col2im_t(dcols_t, x_shape, kh, kw, stride=1, padding=0):
    """``col2im`` from transposed columns (KH*KW*C, N*OH*OW): the adds run along image rows, not channels."""
    xp = get_array_module(dcols_t)
    n, c, h, w = x_shape
    hp, wp = h + 2 * padding, w + 2 * padding
    oh, ow = (hp - kh) // stride + 1, (wp - kw) // stride + 1
    d6 = dcols_t.reshape(kh, kw, c, n, oh, ow)
    dxp = xp.zeros((c, n, hp, wp), dtype=dcols_t.dtype)
    for i in range(kh):
        for j in range(kw):
            dxp[:, :, i:i + stride * oh:stride, j:j + stride * ow:stride] += d6[i, j]
    return dxp[:, :, padding:padding + h, padding:padding + w].transpose(1, 0, 2, 3)


def _w2(w):
    """Conv weight (O, C, KH, KW) as the (O, KH*KW*C) matrix matching im2col's column order."""
    return w.transpose(0, 2, 3, 1).reshape(w.shape[0], -1)


def conv2d_forward(x, w, b=None, stride=1, padding=0):
    """x (N, C, H, W), w (O, C, KH, KW), b (O,) -> y (N, O, OH, OW) and the columns backward needs."""
    o, _, kh, kw = w.shape
    cols, (oh, ow) = im2col(x, kh, kw, stride, padding)
    y = matmul(cols, _w2(w).T)
    if b is not None:
        y += b
    return y.reshape(x.shape[0], oh, ow, o).transpose(0, 3, 1, 2), cols


def conv2d_backward(dy, cols, x_shape, w, stride=1, padding=0, need_w=True, need_b=True):
    """dy (N, O, OH, OW) -> dx (N, C, H, W), dw (O, C, KH, KW) or None, db (O,) or None."""
    o, c, kh, kw = w.shape
    dy2 = dy.transpose(0, 2, 3, 1).reshape(-1, o)
    dw = matmul(dy2.T, cols).reshape(o, kh, kw, c).transpose(0, 3, 1, 2) if need_w else None
    db = dy2.sum(0) if need_b else None
    if c < dy.shape[3]:  # few channels: scatter whole output rows at a time
        dx = _col2im_t(matmul(_w2(w).T, dy2.T), x_shape, kh, kw, stride, padding)
    else:
        dx = col2im(matmul(dy2, _w2(w)), x_shape, kh, kw, stride, padding)
    return dx, dw, db


# -- pooling ------------------------------------------------------------------------------------
def maxpool2d_forward(x, k, stride, padding=0):
    """x (N, C, H, W) -> y (N, C, OH, OW) and the flat argmax inside each window."""
    xp = get_array_module(x)
    win = _windows(_pad2d(x, padding, -numpy.inf), k, k, stride)  # (N, OH, OW, C, K, K)
    n, oh, ow, c = win.shape[:4]
    flat = win.reshape(n, oh, ow, c, k * k)
    idx = flat.argmax(-1)
    y = xp.take_along_axis(flat, idx[..., None], -1)[..., 0]
    return y.transpose(0, 3, 1, 2), idx.transpose(0, 3, 1, 2)


def maxpool2d_backward(dy, idx, x_shape, k, stride, padding=0):
    """dy (N, C, OH, OW) -> dx (N, C, H, W): each window's gradient goes to its maximum."""
    xp = get_array_module(dy)
    n, c, h, w = x_shape
    oh, ow = dy.shape[2:]
    dxp = xp.zeros((n, c, h + 2 * padding, w + 2 * padding), dtype=dy.dtype)
    for i in range(k):
        for j in range(k):
            dxp[:, :, i:i + stride * oh:stride, j:j + stride * ow:stride] += dy * (idx == i * k + j)
    return dxp[:, :, padding:padding + h, padding:padding + w] if padding else dxp


def avgpool2d_forward(x, k, stride, padding=0):
    """x (N, C, H, W) -> y (N, C, OH, OW), the mean of each window (zero padding counted)."""
    win = _windows(_pad2d(x, padding), k, k, stride)
    return _up(win).mean(axis=(-2, -1)).astype(x.dtype, copy=False).transpose(0, 3, 1, 2)


def avgpool2d_backward(dy, x_shape, k, stride, padding=0):
    """dy (N, C, OH, OW) -> dx (N, C, H, W)."""
    xp = get_array_module(dy)
    n, c, h, w = x_shape
    oh, ow = dy.shape[2:]
    dxp = xp.zeros((n, c, h + 2 * padding, w + 2 * padding), dtype=dy.dtype)
    share = dy / (k * k)
    for i in range(k):
        for j in range(k):
            dxp[:, :, i:i + stride * oh:stride, j:j + stride * ow:stride] += share
    return dxp[:, :, padding:padding + h, padding:padding + w] if padding else dxp


# -- activations --------------------------------------------------------------------------------
def relu(x):
    """max(x, 0)."""
    return get_array_module(x).maximum(x, 0)


def gelu(x):
    """GELU, tanh approximation: 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))."""
    xp = get_array_module(x)
    return 0.5 * x * (1.0 + xp.tanh(_GELU_C * (x + 0.044715 * x * x * x)))


def gelu_backward(dy, x):
    """dy * GELU'(x) for the tanh approximation."""
    xp = get_array_module(x)
    t = xp.tanh(_GELU_C * (x + 0.044715 * x * x * x))
    return dy * (0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * _GELU_C * (1.0 + 3 * 0.044715 * x * x))


def tanh(x):
    """tanh(x)."""
    return get_array_module(x).tanh(x)


def sigmoid(x):
    """1 / (1 + exp(-x)), written with tanh so large |x| never overflows."""
    return 0.5 * (1.0 + get_array_module(x).tanh(0.5 * x))


def softmax(x, axis=-1):
    """Numerically stable softmax along ``axis`` (reduced in float32 for 16-bit input)."""
    xp = get_array_module(x)
    z = _up(x)
    e = xp.exp(z - z.max(axis=axis, keepdims=True))
    e /= e.sum(axis=axis, keepdims=True)
    return e.astype(x.dtype, copy=False)


def log_softmax(x, axis=-1):
    """log(softmax(x)) without forming softmax first."""
    xp = get_array_module(x)
    z = _up(x)
    z = z - z.max(axis=axis, keepdims=True)
    return z - xp.log(xp.exp(z).sum(axis=axis, keepdims=True))


# -- normalisation ------------------------------------------------------------------------------
def layernorm_forward(x, gamma, beta, eps=1e-5):
    """x (..., D) -> y (..., D), xhat and 1/std (..., 1) normalised over the last axis."""
    xp = get_array_module(x)
    z = _up(x)
    mu = z.mean(-1, keepdims=True)
    xc = z - mu
    inv = 1.0 / xp.sqrt((xc * xc).mean(-1, keepdims=True) + eps)
    xhat = xc * inv
    y = (xhat * gamma + beta).astype(x.dtype, copy=False)
    return y, xhat, inv


def layernorm_backward(dy, xhat, inv, gamma):
    """dy (..., D) -> dx (..., D), dgamma (D,), dbeta (D,)."""
    g = _up(dy)
    dxhat = g * gamma
    dx = inv * (dxhat - dxhat.mean(-1, keepdims=True) - xhat * (dxhat * xhat).mean(-1, keepdims=True))
    g2 = g.reshape(-1, g.shape[-1])
    return dx.astype(dy.dtype, copy=False), (g2 * xhat.reshape(g2.shape)).sum(0), g2.sum(0)


# -- attention ----------------------------------------------------------------------------------
def _causal_mask(xp, t):
    return xp.triu(xp.ones((t, t), dtype=bool), 1)


def attention_forward(q, k, v, causal=True):
    """q, k, v (B, H, T, d) -> out (B, H, T, d) and the attention weights (B, H, T, T)."""
    xp = get_array_module(q)
    s = matmul(q, k.swapaxes(-1, -2)) * (1.0 / math.sqrt(q.shape[-1]))
    if causal:
        s = xp.where(_causal_mask(xp, q.shape[-2]), -numpy.inf, _up(s))
    att = softmax(s).astype(q.dtype, copy=False)
    return matmul(att, v), att


def attention_backward(dout, q, k, v, att):
    """dout (B, H, T, d) -> dq, dk, dv (B, H, T, d); masked weights are zero so need no mask here."""
    scale = 1.0 / math.sqrt(q.shape[-1])
    dv = matmul(att.swapaxes(-1, -2), dout)
    datt = _up(matmul(dout, v.swapaxes(-1, -2)))
    a = _up(att)
    ds = (a * (datt - (datt * a).sum(-1, keepdims=True))).astype(q.dtype, copy=False)
    return matmul(ds, k) * scale, matmul(ds.swapaxes(-1, -2), q) * scale, dv


# -- embedding ----------------------------------------------------------------------------------
def scatter_add_rows(target, index, rows):
    """target[index[i]] += rows[i] for every i, repeated indices summed; in place."""
    xp = get_array_module(target)
    xp.add.at(target, index.reshape(-1), rows.reshape(-1, target.shape[-1]))


# -- losses -------------------------------------------------------------------------------------
def cross_entropy_forward(logits, target, label_smoothing=0.0, ignore_index=-100):
    """logits (M, C), target (M,) class ids -> (mean loss as 0-d array, cache for the backward)."""
    xp = get_array_module(logits)
    logp = log_softmax(logits)
    valid = target != ignore_index
    t = xp.where(valid, target, 0)
    n = max(int(valid.sum()), 1)
    nll = -xp.take_along_axis(logp, t[:, None].astype(xp.int64, copy=False), 1)[:, 0]
    if label_smoothing:
        nll = (1.0 - label_smoothing) * nll - label_smoothing * logp.mean(-1)
    loss = (nll * valid).sum() / n
    return loss, (logp, t, valid, n)


def cross_entropy_backward(cache, label_smoothing=0.0, dtype=None):
    """d(mean loss)/d(logits) (M, C) from ``cross_entropy_forward``'s cache."""
    xp = get_array_module(cache[0])
    logp, t, valid, n = cache
    d = xp.exp(logp)
    rows = xp.arange(d.shape[0])
    d[rows, t] -= 1.0 - label_smoothing
    if label_smoothing:
        d -= label_smoothing / d.shape[1]
    d *= (valid / n)[:, None]
    return d.astype(dtype or d.dtype, copy=False)
