"""Models that examples, tests and benchmarks train: ``mlp``, ``cnn``, ``transformer``; ``build(name, **kw)``.

Every builder takes ``seed=`` (parameters and dropout streams come from
``numpy.random.default_rng(seed)``), ``dtype=`` and ``device=`` ('cpu' or 'gpu').
"""
import importlib.resources

import numpy

from . import nn


def _finish(model, device):
    return model if device is None else model.to(device)


def _dropout(p, rng):
    return nn.Dropout(p, seed=int(rng.integers(2 ** 31))) if p else nn.Identity()


_ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "tanh": nn.Tanh, "sigmoid": nn.Sigmoid}


def mlp(in_features=64, hidden=(128,), num_classes=10, activation="relu", dropout=0.0,
        dtype=numpy.float32, seed=0, device=None):
    """x (N, in_features) -> logits (N, num_classes): Linear + activation per hidden width, then Linear."""
    if activation not in _ACTIVATIONS:
        raise ValueError(f"unknown activation {activation!r}; use one of {sorted(_ACTIVATIONS)}")
    rng = numpy.random.default_rng(seed)
    layers, width = [], in_features
    for h in hidden:
        layers += [nn.Linear(width, h, dtype=dtype, rng=rng), _ACTIVATIONS[activation]()]
        if dropout:
            layers.append(_dropout(dropout, rng))
        width = h
    layers.append(nn.Linear(width, num_classes, dtype=dtype, rng=rng))
    return _finish(nn.Sequential(*layers), device)


def cnn(in_channels=1, image_size=8, num_classes=10, channels=(16, 32), batchnorm=False, dropout=0.0,
        dtype=numpy.float32, seed=0, device=None):
    """Images (N, C, S, S) or flat (N, C*S*S) -> logits: [conv3x3, (BN), ReLU, maxpool2] x 2, Linear."""
    if image_size % 4:
        raise ValueError(f"cnn pools twice by 2, so image_size must be a multiple of 4, got {image_size}")
    rng = numpy.random.default_rng(seed)
    layers, c = [nn.Reshape(in_channels, image_size, image_size)], in_channels
    for width in channels[:2]:
        layers.append(nn.Conv2d(c, width, 3, padding=1, dtype=dtype, rng=rng))
        if batchnorm:
            layers.append(nn.BatchNorm2d(width, dtype=dtype))
        layers += [nn.ReLU(), nn.MaxPool2d(2)]
        c = width
    layers.append(nn.Flatten())
    if dropout:
        layers.append(_dropout(dropout, rng))
    layers.append(nn.Linear(c * (image_size // 4) ** 2, num_classes, dtype=dtype, rng=rng))
    return _finish(nn.Sequential(*layers), device)


class TransformerBlock(nn.Module):
    """Pre-norm decoder block (B, T, E) -> (B, T, E): x + attn(ln1(x)), then + fc2(gelu(fc1(ln2(x))))."""

    def __init__(self, embed_dim, num_heads, mlp_ratio=4, dropout=0.0, dtype=numpy.float32, rng=None):
        super().__init__()
        rng = nn.init.as_rng(rng)
        self.ln1 = nn.LayerNorm(embed_dim, dtype=dtype)
        self.attn = nn.MultiHeadAttention(embed_dim, num_heads, causal=True, dtype=dtype, rng=rng)
        self.drop1 = _dropout(dropout, rng)
        self.ln2 = nn.LayerNorm(embed_dim, dtype=dtype)
        self.fc1 = nn.Linear(embed_dim, mlp_ratio * embed_dim, dtype=dtype, rng=rng)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(mlp_ratio * embed_dim, embed_dim, dtype=dtype, rng=rng)
        self.drop2 = _dropout(dropout, rng)

    def forward(self, x):
        x = x + self.drop1(self.attn(self.ln1(x)))
        return x + self.drop2(self.fc2(self.act(self.fc1(self.ln2(x)))))

    def _backward(self, dy):
        d = self.fc1.backward(self.act.backward(self.fc2.backward(self.drop2.backward(dy))))
        dx = dy + self.ln2.backward(d)
        return dx + self.ln1.backward(self.attn.backward(self.drop1.backward(dx)))


class TransformerLM(nn.Module):
    """Decoder-only language model: ids (B, T <= seq_len) -> next-token logits (B, T, vocab_size)."""

    def __init__(self, vocab_size, seq_len, embed_dim=64, num_heads=4, num_layers=2, mlp_ratio=4,
                 dropout=0.0, tied=True, checkpoint=False, dtype=numpy.float32, rng=None):
        super().__init__()
        rng = nn.init.as_rng(rng)
        self.vocab_size, self.seq_len = int(vocab_size), int(seq_len)
        self.embed = nn.Embedding(vocab_size, embed_dim, dtype=dtype, rng=rng, std=0.02)
        self.pos = nn.PositionalEmbedding(seq_len, embed_dim, dtype=dtype, rng=rng)
        self.drop = _dropout(dropout, rng)
        blocks = [TransformerBlock(embed_dim, num_heads, mlp_ratio, dropout, dtype, rng) for _ in range(num_layers)]
        self.blocks = nn.Sequential(*[nn.Checkpoint(b) if checkpoint else b for b in blocks])
        self.ln_f = nn.LayerNorm(embed_dim, dtype=dtype)
        self.head = nn.Linear(embed_dim, vocab_size, bias=False, dtype=dtype, rng=rng)
        if tied:  # the same Parameter in both modules: one gradient, hooks fire after the embedding's backward
            self.head.weight = self.embed.weight

    def forward(self, ids):
        if ids.ndim != 2 or ids.shape[1] > self.seq_len:
            raise ValueError(f"TransformerLM expects ids (B, T <= {self.seq_len}), got shape {tuple(ids.shape)}")
        return self.head(self.ln_f(self.blocks(self.drop(self.pos(self.embed(ids))))))

    def _backward(self, dy):
        d = self.blocks.backward(self.ln_f.backward(self.head.backward(dy)))
        self.embed.backward(self.pos.backward(self.drop.backward(d)))
        return None


def transformer(vocab_size, seq_len, embed_dim=64, num_heads=4, num_layers=2, mlp_ratio=4, dropout=0.0,
                tied=True, checkpoint=False, dtype=numpy.float32, seed=0, device=None):
    """Small GPT-style model: token + learned position embeddings, causal pre-norm blocks, tied output."""
    model = TransformerLM(vocab_size, seq_len, embed_dim, num_heads, num_layers, mlp_ratio, dropout, tied,
                          checkpoint, dtype, numpy.random.default_rng(seed))
    return _finish(model, device)


_BUILDERS = {"mlp": mlp, "cnn": cnn, "transformer": transformer}


def build(name, **kw):
    """The model called ``name`` ('mlp', 'cnn' or 'transformer') built with ``kw``."""
    if name not in _BUILDERS:
        raise ValueError(f"unknown model {name!r}; choose one of {sorted(_BUILDERS)}")
    return _BUILDERS[name](**kw)


def text_corpus():
    """The bundled English text as (ids uint8 (n,), vocabulary str) for character-level models."""
    text = importlib.resources.files("mpidp").joinpath("data", "text.txt").read_text(encoding="utf-8")
    vocab = "".join(sorted(set(text)))
    table = numpy.zeros(max(map(ord, vocab)) + 1, dtype=numpy.uint8)
    table[[ord(c) for c in vocab]] = numpy.arange(len(vocab), dtype=numpy.uint8)
    return table[numpy.frombuffer(text.encode("utf-32-le"), dtype=numpy.uint32)], vocab
