"""Multi-head self-attention on (batch, time, embed) inputs."""
import numpy

from ...backend.xp import get_array_module
from .. import functional as F
from .. import init
from ..module import Module
from .linear import Linear


class MultiHeadAttention(Module):
    """Self-attention x (B, T, E) -> (B, T, E): fused qkv Linear(E, 3E), softmax(q k^T / sqrt(d)) v, Linear(E, E)."""

    def __init__(self, embed_dim, num_heads, causal=True, bias=True, dtype=numpy.float32, rng=None):
        super().__init__()
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim {embed_dim} is not divisible by num_heads {num_heads}; "
                             f"pick num_heads that divides embed_dim")
        rng = init.as_rng(rng)
        self.embed_dim, self.num_heads, self.causal = int(embed_dim), int(num_heads), bool(causal)
        self.qkv = Linear(embed_dim, 3 * embed_dim, bias, dtype, rng)
        self.proj = Linear(embed_dim, embed_dim, bias, dtype, rng)

    def forward(self, x):
        if x.ndim != 3 or x.shape[2] != self.embed_dim:
            raise ValueError(f"{self!r} expects input (B, T, {self.embed_dim}) but got shape {tuple(x.shape)}")
        b, t, e = x.shape
        h = self.num_heads
        qkv = self.qkv(x).reshape(b, t, 3, h, e // h).transpose(2, 0, 3, 1, 4)  # (3, B, H, T, d)
        q, k, v = qkv[0], qkv[1], qkv[2]
        out, att = F.attention_forward(q, k, v, self.causal)
        self._save(q, k, v, att)
        return self.proj(out.transpose(0, 2, 1, 3).reshape(b, t, e))

    def _backward(self, dy):
        d = self.proj.backward(dy)
        q, k, v, att = self._pop()
        b, h, t, dh = q.shape
        dq, dk, dv = F.attention_backward(d.reshape(b, t, h, dh).transpose(0, 2, 1, 3), q, k, v, att)
        dqkv = get_array_module(dq).stack([dq, dk, dv]).transpose(1, 3, 0, 2, 4).reshape(b, t, 3 * h * dh)
        return self.qkv.backward(dqkv)

    def extra_repr(self):
        return f"{self.embed_dim}, num_heads={self.num_heads}, causal={self.causal}"
