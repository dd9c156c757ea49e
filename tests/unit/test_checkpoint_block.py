"""nn.Checkpoint: same gradients as the plain block (dropout included), fewer kept activation bytes, hooks once."""
import numpy
import pytest

from mpidp import models, nn

f64 = numpy.float64


def _block(seed):
    rng = numpy.random.default_rng(seed)
    return nn.Sequential(nn.Linear(16, 64, dtype=f64, rng=rng), nn.GELU(), nn.Dropout(0.3, seed=seed),
                         nn.BatchNorm1d(64, dtype=f64), nn.Linear(64, 16, dtype=f64, rng=rng), nn.Tanh())


def _net(checkpoint):
    blocks = [_block(s) for s in range(3)]
    return nn.Sequential(*[nn.Residual(nn.Checkpoint(b) if checkpoint else b) for b in blocks])


def _run(m, steps=2):
    x = numpy.random.default_rng(0).standard_normal((8, 16))
    dy = numpy.random.default_rng(1).standard_normal((8, 16))
    out = []
    for _ in range(steps):  # two steps: the dropout streams must advance identically
        m.zero_grad()
        y = m(x)
        kept = m.activation_bytes()
        dx = m.backward(dy)
        out.append((y, dx, kept, [p.grad.copy() for p in m.parameters()]))
    return out


def test_same_gradients_less_memory():
    plain, ckpt = _net(False), _net(True)
    for (y0, dx0, kept0, g0), (y1, dx1, kept1, g1) in zip(_run(plain), _run(ckpt)):
        assert numpy.array_equal(y0, y1) and numpy.array_equal(dx0, dx1)
        assert all(numpy.array_equal(a, b) for a, b in zip(g0, g1))
        assert kept1 < kept0 / 4, (kept1, kept0)
        assert kept1 == 3 * 8 * 16 * 8  # only each block's input
    bn0, bn1 = plain[0].fn[3], ckpt[0].fn.block[3]
    assert int(bn1.num_batches_tracked) == 2 and numpy.array_equal(bn0.running_var, bn1.running_var)
    assert ckpt.activation_bytes() == 0


def test_hooks_fire_once_in_order_with_checkpoint():
    orders = []
    for checkpoint in (False, True):
        m = _net(checkpoint)
        order = []
        for p in m.parameters():
            p.register_hook(lambda q: order.append(q.name.replace(".block", "")))
        _run(m, steps=1)
        orders.append(order)
    assert orders[0] == orders[1] and len(orders[0]) == 18 and len(set(orders[0])) == 18


def test_checkpointed_transformer_matches_plain():
    ids = numpy.random.default_rng(0).integers(0, 13, (3, 8))
    out = []
    for checkpoint in (False, True):
        m = models.transformer(13, 8, embed_dim=16, num_heads=2, num_layers=2, dropout=0.1, checkpoint=checkpoint,
                               dtype=f64, seed=5)
        y = m(ids)
        kept = m.activation_bytes()
        m.backward(numpy.ones_like(y))
        out.append((y, kept, {n.replace(".block", ""): p.grad.copy() for n, p in m.named_parameters()}))
    (y0, kept0, g0), (y1, kept1, g1) = out
    assert numpy.array_equal(y0, y1) and kept1 < kept0
    assert g0.keys() == g1.keys() and all(numpy.array_equal(g0[k], g1[k]) for k in g0)


def test_checkpoint_under_no_grad_and_errors():
    c = nn.Checkpoint(_block(0))
    with nn.no_grad():
        c(numpy.ones((4, 16)))
    assert c.activation_bytes() == 0
    with pytest.raises(TypeError, match="wraps a Module"):
        nn.Checkpoint(lambda x: x)
