"""mpidp.models: determinism, gradients, and that the models really learn (digits, bundled text)."""
import importlib.resources

import numpy
import pytest

from mpidp import models, nn, optim
from mpidp.backend import gpu_available

from _gradcheck import gradcheck_module


def _params(m):
    return [p.data.copy() for p in m.parameters()]


def test_mlp_is_deterministic_given_seed():
    a, b, c = models.mlp(seed=1), models.mlp(seed=1), models.mlp(seed=2)
    assert [p.shape for p in a.parameters()] == [(128, 64), (128,), (10, 128), (10,)]
    assert all(numpy.array_equal(p, q) for p, q in zip(_params(a), _params(b)))
    assert not numpy.array_equal(_params(a)[0], _params(c)[0])
    x = numpy.random.default_rng(0).standard_normal((4, 64)).astype(numpy.float32)
    d1, d2 = models.mlp(hidden=(16, 8), dropout=0.5, seed=3), models.mlp(hidden=(16, 8), dropout=0.5, seed=3)
    assert numpy.array_equal(d1(x), d2(x)) and d1(x).shape == (4, 10)


@pytest.mark.parametrize("size", [8, 28])
def test_cnn_shapes_flat_and_nchw(size):
    m = models.cnn(image_size=size, batchnorm=True, seed=0)
    x = numpy.random.default_rng(0).random((3, size * size), dtype=numpy.float32)
    y = m(x)
    assert y.shape == (3, 10) and m.backward(numpy.ones_like(y)).shape == (3, size * size)
    assert numpy.array_equal(m.eval()(x.reshape(3, 1, size, size)), m(x))


def _digits():
    try:
        path = importlib.resources.files("mpidp.data") / "digits.npz"
        with importlib.resources.as_file(path) as f:
            with numpy.load(f) as d:
                return d["x"], d["y"]
    except (FileNotFoundError, ModuleNotFoundError, OSError):
        pytest.skip("mpidp/data/digits.npz is not in this checkout yet (the data package ships it)")


def test_cnn_reaches_95_percent_on_digits():
    x, y = _digits()
    x, y = (x.reshape(len(x), 64) / 16.0).astype(numpy.float32), y.astype(numpy.int64)
    perm = numpy.random.default_rng(0).permutation(len(x))
    train, test = perm[:1437], perm[1437:]
    m = models.cnn(seed=0)
    opt = optim.Adam(m.parameters(), lr=3e-3)
    crit = nn.CrossEntropyLoss()
    rng = numpy.random.default_rng(1)
    for _ in range(10):
        order = rng.permutation(train)
        for i in range(0, len(order), 32):
            b = order[i:i + 32]
            crit(m(x[b]), y[b])
            m.backward(crit.backward())
            opt.step()
            opt.zero_grad()
    with nn.no_grad():
        acc = float((m.eval()(x[test]).argmax(-1) == y[test]).mean())
    assert acc >= 0.95, f"test accuracy {acc:.3f}"


@pytest.mark.parametrize("tied", [True, False])
def test_transformer_gradcheck_float64(tied):
    m = models.transformer(7, 5, embed_dim=8, num_heads=2, num_layers=2, mlp_ratio=2, tied=tied,
                           dtype=numpy.float64, seed=0)
    ids = numpy.random.default_rng(0).integers(0, 7, (2, 5))
    names = [n for n, _ in m.named_parameters()]
    assert ("head.weight" in names) != tied and names[0] == "embed.weight"
    gradcheck_module(m, ids, n=4, rtol=1e-4)


def test_transformer_tied_weight_hook_fires_once_last():
    m = models.transformer(7, 5, embed_dim=8, num_heads=2, num_layers=1, seed=0)
    order = []
    for p in m.parameters():
        p.register_hook(lambda q: order.append(q.name))
    logits = m(numpy.zeros((2, 5), dtype=numpy.int64))
    m.backward(numpy.ones_like(logits))
    assert len(order) == len(set(order)) == len(list(m.parameters()))
    assert order[0] == "ln_f.weight" and order[-2:] == ["pos.weight", "embed.weight"]


def test_transformer_dtypes_and_determinism():
    ids = numpy.random.default_rng(0).integers(0, 11, (2, 6))
    m64 = models.transformer(11, 6, embed_dim=16, num_heads=2, dropout=0.1, dtype=numpy.float64, seed=4)
    m32 = models.transformer(11, 6, embed_dim=16, num_heads=2, dropout=0.1, dtype=numpy.float32, seed=4)
    y64, y32 = m64(ids), m32(ids)
    assert y32.dtype == numpy.float32 and numpy.allclose(y32, y64, atol=1e-4)
    y16 = m64.eval().to(dtype=numpy.float16)(ids)
    assert y16.dtype == numpy.float16 and numpy.allclose(y16, m32.eval()(ids), atol=3e-2)
    with pytest.raises(ValueError, match=r"ids \(B, T <= 6\)"):
        m32(numpy.zeros((1, 7), dtype=numpy.int64))


def test_transformer_learns_the_bundled_text():
    ids, vocab = models.text_corpus()
    assert len(ids) > 20000 and ids.dtype == numpy.uint8
    assert "".join(vocab[i] for i in ids[:4]) == "The "
    t, b = 32, 16
    m = models.transformer(len(vocab), t, embed_dim=48, num_heads=4, num_layers=2, seed=0)
    opt = optim.Adam(m.parameters(), lr=3e-3)
    crit = nn.CrossEntropyLoss()
    rng = numpy.random.default_rng(0)
    losses = []
    for _ in range(200):
        starts = rng.integers(0, len(ids) - t - 1, b)[:, None] + numpy.arange(t)
        losses.append(crit(m(ids[starts]), ids[starts + 1]))
        m.backward(crit.backward())
        opt.step()
        opt.zero_grad()
    first, last = numpy.mean(losses[:5]), numpy.mean(losses[-20:])
    assert first > 3.5 and last < 2.5, f"loss {first:.2f} -> {last:.2f}"


def test_build_by_name():
    assert isinstance(models.build("mlp", hidden=(4,)), nn.Sequential)
    assert isinstance(models.build("transformer", vocab_size=5, seq_len=3), models.TransformerLM)
    with pytest.raises(ValueError, match=r"unknown model 'resnet'; choose one of \['cnn', 'mlp', 'transformer'\]"):
        models.build("resnet")
    with pytest.raises(ValueError, match="multiple of 4"):
        models.cnn(image_size=10)


@pytest.mark.gpu
@pytest.mark.skipif(not gpu_available(), reason="needs cupy and a CUDA device (none here)")
def test_transformer_on_gpu_matches_cpu():
    import cupy
    ids = numpy.random.default_rng(0).integers(0, 9, (2, 6))
    cpu = models.transformer(9, 6, embed_dim=16, num_heads=2, dtype=numpy.float64, seed=0)
    gpu = models.transformer(9, 6, embed_dim=16, num_heads=2, dtype=numpy.float64, seed=0, device="gpu")
    y, yg = cpu(ids), gpu(cupy.asarray(ids))
    cpu.backward(numpy.ones_like(y))
    gpu.backward(cupy.ones_like(yg))
    assert numpy.allclose(cupy.asnumpy(yg), y)
    for p, q in zip(cpu.parameters(), gpu.parameters()):
        assert numpy.allclose(cupy.asnumpy(q.grad), p.grad), p.name
