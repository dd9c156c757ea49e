"""Every layer: finite-difference gradcheck in float64, float32 agreement, float16 forward; GPU variants."""
import numpy
import pytest

from mpidp import nn
from mpidp.backend import gpu_available

from _gradcheck import close, gradcheck_loss, gradcheck_module, run_in_dtype

f64 = numpy.float64


def _x(*shape, seed=1):
    return numpy.random.default_rng(seed).standard_normal(shape)


def _ids(*shape, high=7):
    return numpy.random.default_rng(2).integers(0, high, size=shape)


def _affine(m):
    """Random weight and bias so the gradcheck sees a non-trivial affine part."""
    rng = numpy.random.default_rng(4)
    for p in m.parameters():
        p.data[...] = rng.standard_normal(p.shape)
    return m


def _bn_eval():
    bn = _affine(nn.BatchNorm2d(3, dtype=f64))
    for s in range(3):  # give the running statistics something non-trivial
        bn(_x(4, 3, 3, 3, seed=10 + s) * 2 + 1)
    return bn.eval()


CASES = {
    "linear": (lambda: nn.Linear(5, 4, dtype=f64, rng=0), lambda: _x(3, 5)),
    "linear-3d-nobias": (lambda: nn.Linear(5, 4, bias=False, dtype=f64, rng=0), lambda: _x(2, 3, 5)),
    "conv-pad": (lambda: nn.Conv2d(2, 3, 3, padding=1, dtype=f64, rng=0), lambda: _x(2, 2, 5, 5)),
    "conv-stride-rect": (lambda: nn.Conv2d(2, 3, (3, 2), stride=2, dtype=f64, rng=0), lambda: _x(2, 2, 7, 6)),
    "conv-wide-channels": (lambda: nn.Conv2d(6, 2, 3, padding=1, dtype=f64, rng=0), lambda: _x(2, 6, 3, 3)),
    "maxpool": (lambda: nn.MaxPool2d(2), lambda: _x(2, 2, 4, 4)),
    "maxpool-overlap-pad": (lambda: nn.MaxPool2d(3, stride=2, padding=1), lambda: _x(1, 2, 5, 5)),
    "avgpool": (lambda: nn.AvgPool2d(2), lambda: _x(2, 2, 4, 4)),
    "avgpool-overlap-pad": (lambda: nn.AvgPool2d(3, stride=2, padding=1), lambda: _x(1, 2, 5, 5)),
    "layernorm": (lambda: _affine(nn.LayerNorm(6, dtype=f64)), lambda: _x(2, 3, 6)),
    "batchnorm1d": (lambda: _affine(nn.BatchNorm1d(4, dtype=f64)), lambda: _x(5, 4)),
    "batchnorm1d-3d": (lambda: _affine(nn.BatchNorm1d(4, dtype=f64)), lambda: _x(3, 4, 2)),
    "batchnorm2d": (lambda: _affine(nn.BatchNorm2d(3, dtype=f64)), lambda: _x(2, 3, 3, 3)),
    "batchnorm2d-eval": (_bn_eval, lambda: _x(2, 3, 3, 3)),
    "relu": (nn.ReLU, lambda: _x(3, 4)),
    "gelu": (nn.GELU, lambda: _x(3, 4)),
    "tanh": (nn.Tanh, lambda: _x(3, 4)),
    "sigmoid": (nn.Sigmoid, lambda: _x(3, 4) * 3),
    "dropout": (lambda: nn.Dropout(0.3, seed=5), lambda: _x(4, 5)),
    "embedding": (lambda: nn.Embedding(7, 4, dtype=f64, rng=0), lambda: _ids(2, 5)),
    "positional": (lambda: nn.PositionalEmbedding(5, 4, dtype=f64, rng=0), lambda: _x(2, 3, 4)),
    "mha-causal": (lambda: nn.MultiHeadAttention(8, 2, dtype=f64, rng=0), lambda: _x(2, 4, 8)),
    "mha-full": (lambda: nn.MultiHeadAttention(8, 4, causal=False, dtype=f64, rng=0), lambda: _x(2, 3, 8)),
    "sequential": (lambda: nn.Sequential(nn.Linear(4, 6, dtype=f64, rng=0), nn.Tanh(),
                                         nn.Linear(6, 3, dtype=f64, rng=1)), lambda: _x(3, 4)),
    "residual": (lambda: nn.Residual(nn.Sequential(nn.Linear(4, 4, dtype=f64, rng=0), nn.GELU())),
                 lambda: _x(3, 4)),
    "residual-shortcut": (lambda: nn.Residual(nn.Linear(4, 3, dtype=f64, rng=0), nn.Linear(4, 3, dtype=f64, rng=1)),
                          lambda: _x(3, 4)),
    "flatten": (lambda: nn.Sequential(nn.Flatten(), nn.Linear(12, 2, dtype=f64, rng=0)), lambda: _x(2, 3, 2, 2)),
    "reshape": (lambda: nn.Sequential(nn.Reshape(1, 4, 4), nn.Conv2d(1, 2, 3, dtype=f64, rng=0)), lambda: _x(2, 16)),
    "checkpoint": (lambda: nn.Checkpoint(nn.Sequential(nn.Linear(4, 5, dtype=f64, rng=0), nn.Dropout(0.5, seed=1),
                                                       nn.GELU())), lambda: _x(3, 4)),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_gradcheck_float64_then_float32_and_float16(name):
    build, make_x = CASES[name]
    module, x = build(), make_x()
    y64, dx64, g64, dy = gradcheck_module(module, x)
    y32, dx32, g32 = run_in_dtype(module, x, dy, numpy.float32)
    assert y32.dtype == numpy.float32
    assert close(y32, y64, 1e-5)
    if dx64 is not None:
        assert dx32.dtype == numpy.float32 and close(dx32, dx64, 1e-4)
    for k in g64:
        assert g32[k].dtype == numpy.float32 and close(g32[k], g64[k], 1e-4), k
    module.to(dtype=numpy.float16)
    module.set_rng_state(module.rng_state())
    y16 = module(x.astype(numpy.float16) if x.dtype.kind == "f" else x)
    assert y16.dtype == numpy.float16 and numpy.isfinite(y16).all()
    if "dropout" not in name and "checkpoint" not in name:  # masks moved on; values differ by design
        assert close(y16, y64, 2e-2), name


def test_linear_float32_matches_numpy_reference():
    lin = nn.Linear(5, 3, rng=0)
    x = _x(4, 5).astype(numpy.float32)
    y = lin(x)
    assert numpy.allclose(y, x @ lin.weight.data.T + lin.bias.data, rtol=1e-6)
    dy = _x(4, 3, seed=3).astype(numpy.float32)
    dx = lin.backward(dy)
    assert numpy.allclose(dx, dy @ lin.weight.data, rtol=1e-5)
    assert numpy.allclose(lin.weight.grad, dy.T @ x, rtol=1e-5)
    assert numpy.allclose(lin.bias.grad, dy.sum(0), rtol=1e-5)


def test_conv2d_matches_direct_loops():
    conv = nn.Conv2d(2, 3, 3, stride=2, padding=1, dtype=f64, rng=0)
    x = _x(2, 2, 5, 6)
    y = conv(x)
    xp = numpy.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1)))
    ref = numpy.zeros((2, 3, 3, 3))
    for i in range(3):
        for j in range(3):
            patch = xp[:, :, 2 * i:2 * i + 3, 2 * j:2 * j + 3]
            ref[:, :, i, j] = numpy.einsum("nckl,ockl->no", patch, conv.weight.data) + conv.bias.data
    assert numpy.allclose(y, ref)


def test_pooling_values():
    x = numpy.arange(16, dtype=f64).reshape(1, 1, 4, 4)
    assert numpy.array_equal(nn.MaxPool2d(2)(x)[0, 0], [[5, 7], [13, 15]])
    assert numpy.array_equal(nn.AvgPool2d(2)(x)[0, 0], [[2.5, 4.5], [10.5, 12.5]])


def test_batchnorm_statistics_and_running_buffers():
    bn = nn.BatchNorm2d(3, momentum=0.1, dtype=f64)
    x = _x(4, 3, 2, 2) * 3 + 2
    y = bn(x)
    assert numpy.allclose(y.mean(axis=(0, 2, 3)), 0, atol=1e-12)
    assert numpy.allclose(y.var(axis=(0, 2, 3)), 1, atol=1e-4)
    mean, var = x.mean(axis=(0, 2, 3)), x.var(axis=(0, 2, 3), ddof=1)
    assert numpy.allclose(bn.running_mean, 0.1 * mean)
    assert numpy.allclose(bn.running_var, 0.9 + 0.1 * var)
    assert int(bn.num_batches_tracked) == 1
    assert list(bn.state_dict()) == ["weight", "bias", "running_mean", "running_var", "num_batches_tracked"]
    assert [n for n, _ in bn.named_parameters()] == ["weight", "bias"]


def test_batchnorm_reduce_sums_is_the_hook_for_global_statistics():
    """Doubling the batch through _reduce_sums equals running on the batch concatenated with itself."""
    class Twice(nn.BatchNorm1d):
        def _reduce_sums(self, sums):
            return [2 * s for s in sums]

    x, dy = _x(6, 4), _x(6, 4, seed=9)
    a, b = Twice(4, dtype=f64), nn.BatchNorm1d(4, dtype=f64)
    ya, yb = a(x), b(numpy.concatenate([x, x]))
    assert numpy.allclose(ya, yb[:6])
    dxa, dxb = a.backward(dy), b.backward(numpy.concatenate([dy, dy]))
    assert numpy.allclose(dxa, dxb[:6])
    assert numpy.allclose(2 * a.weight.grad, b.weight.grad)  # parameter grads stay local sums


def test_layernorm_values():
    ln = nn.LayerNorm(5, dtype=f64)
    x = _x(3, 5)
    y = ln(x)
    ref = (x - x.mean(-1, keepdims=True)) / numpy.sqrt(x.var(-1, keepdims=True) + 1e-5)
    assert numpy.allclose(y, ref)


def test_attention_matches_naive_loops_and_is_causal():
    mha = nn.MultiHeadAttention(4, 2, dtype=f64, rng=0)
    x = _x(1, 3, 4)
    y = mha(x)
    qkv = x[0] @ mha.qkv.weight.data.T + mha.qkv.bias.data
    out = numpy.zeros((3, 4))
    for h in range(2):
        q, k, v = (qkv[:, i * 4 + 2 * h:i * 4 + 2 * h + 2] for i in range(3))
        for t in range(3):
            s = q[t] @ k[:t + 1].T / numpy.sqrt(2)
            w = numpy.exp(s - s.max())
            out[t, 2 * h:2 * h + 2] = (w / w.sum()) @ v[:t + 1]
    assert numpy.allclose(y[0], out @ mha.proj.weight.data.T + mha.proj.bias.data)
    x2 = x.copy()
    x2[0, 2] += 1.0  # the future must not change the past
    assert numpy.allclose(mha(x2)[0, :2], y[0, :2])


def test_dropout_masks_reproducible_per_seed_and_differ_by_stream():
    x = numpy.ones((50, 40))
    nn.manual_seed(3)
    a, b = nn.Dropout(0.5), nn.Dropout(0.5)
    nn.manual_seed(3)
    a2 = nn.Dropout(0.5)
    ya, yb, ya2 = a(x), b(x), a2(x)
    assert numpy.array_equal(ya, ya2)
    assert not numpy.array_equal(ya, yb)
    assert set(numpy.unique(ya)) <= {0.0, 2.0} and abs((ya == 0).mean() - 0.5) < 0.05
    state = a.rng_state()
    first = a(x)
    a.set_rng_state(state)
    assert numpy.array_equal(a(x), first)
    assert numpy.array_equal(a.eval()(x), x)


def test_dropout_rank_changes_the_mask(monkeypatch):
    from mpidp.nn import init
    masks = []
    for rank in (0, 1):
        monkeypatch.setattr(init, "process_rank", lambda r=rank: r)
        masks.append(nn.Dropout(0.5, seed=7)(numpy.ones((20, 20))))
    assert not numpy.array_equal(*masks)


def test_process_rank_is_zero_without_mpi():
    import sys
    from mpidp.nn import init
    if "mpi4py.MPI" not in sys.modules:
        assert init.process_rank() == 0


def test_embedding_repeated_ids_accumulate():
    emb = nn.Embedding(4, 2, dtype=f64, rng=0)
    ids = numpy.array([[1, 1, 3]])
    assert numpy.array_equal(emb(ids), emb.weight.data[ids])
    assert emb.backward(numpy.ones((1, 3, 2))) is None
    assert numpy.array_equal(emb.weight.grad, [[0, 0], [2, 2], [0, 0], [1, 1]])


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_cross_entropy_gradcheck_and_value(smoothing):
    logits, target = _x(6, 5), numpy.array([0, 4, 2, -100, 1, 3])
    crit = nn.CrossEntropyLoss(label_smoothing=smoothing)
    gradcheck_loss(crit, logits, target)
    logp = logits - numpy.log(numpy.exp(logits).sum(-1, keepdims=True))
    rows = [0, 1, 2, 4, 5]
    nll = -logp[rows, target[rows]]
    ref = ((1 - smoothing) * nll - smoothing * logp[rows].mean(-1)).mean()
    assert abs(crit(logits, target) - ref) < 1e-12
    d = crit.backward()
    assert numpy.all(d[3] == 0)
    d32 = (crit(logits.astype(numpy.float32), target), crit.backward())[1]
    assert d32.dtype == numpy.float32 and close(d32, d, 1e-5)
    crit(logits.astype(numpy.float16), target)
    assert crit.backward().dtype == numpy.float16


def test_cross_entropy_takes_class_axis_last():
    crit = nn.CrossEntropyLoss()
    logits, target = _x(2, 3, 5), _ids(2, 3, high=5)
    loss = crit(logits, target)
    assert abs(loss - crit(logits.reshape(6, 5), target.reshape(6))) < 1e-12
    assert crit.backward().shape == (6, 5)


def test_mse_gradcheck_and_value():
    pred, target = _x(3, 4), _x(3, 4, seed=5)
    crit = nn.MSELoss()
    gradcheck_loss(crit, pred, target)
    assert abs(crit(pred, target) - ((pred - target) ** 2).mean()) < 1e-12
    assert numpy.allclose(crit.backward(), 2 * (pred - target) / 12)
    crit(pred.astype(numpy.float32), target)
    d32 = crit.backward()
    assert d32.dtype == numpy.float32 and close(d32, 2 * (pred - target) / 12, 1e-6)


def test_errors_are_clear():
    with pytest.raises(ValueError, match=r"expects input \(\.\.\., 5\) but got shape \(3, 4\)"):
        nn.Linear(5, 2)(numpy.zeros((3, 4)))
    with pytest.raises(ValueError, match="not divisible"):
        nn.MultiHeadAttention(6, 4)
    with pytest.raises(TypeError, match="integer class ids"):
        nn.CrossEntropyLoss()(numpy.zeros((2, 3)), numpy.zeros(2))
    with pytest.raises(ValueError, match="do not match"):
        nn.CrossEntropyLoss()(numpy.zeros((2, 3)), numpy.zeros(3, dtype=int))
    with pytest.raises(nn.module.MpidpError, match="no forward left"):
        nn.ReLU().backward(numpy.zeros(3))
    with pytest.raises(ValueError, match="does not fit"):
        nn.Conv2d(1, 1, 5)(numpy.zeros((1, 1, 3, 3)))


gpu = pytest.mark.skipif(not gpu_available(), reason="needs cupy and a CUDA device (none here)")


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("name", ["linear", "conv-pad", "maxpool-overlap-pad", "batchnorm2d", "layernorm",
                                  "mha-causal", "embedding", "dropout", "checkpoint"])
def test_gpu_matches_cpu(name):
    import cupy
    build, make_x = CASES[name]
    module, x = build(), make_x()
    state = module.rng_state()
    y = module(x)
    dy = numpy.random.default_rng(0).standard_normal(y.shape)
    dx = module.backward(dy)
    grads = {k: p.grad.copy() for k, p in module.named_parameters()}
    module.set_rng_state(state)
    module.to("gpu").zero_grad()
    assert all(isinstance(p.grad, cupy.ndarray) for p in module.parameters())
    yg = module(cupy.asarray(x))
    dxg = module.backward(cupy.asarray(dy))
    if name not in ("dropout", "checkpoint"):  # device masks come from another generator
        assert numpy.allclose(cupy.asnumpy(yg), y)
        if dx is not None:
            assert numpy.allclose(cupy.asnumpy(dxg), dx)
        for k, p in module.named_parameters():
            assert numpy.allclose(cupy.asnumpy(p.grad), grads[k]), k


def test_bench_layers_quick_run_writes_table(tmp_path):
    import pathlib
    import runpy
    script = pathlib.Path(__file__).resolve().parents[2] / "scripts" / "bench_layers.py"
    rows = runpy.run_path(str(script))["main"](["--quick", "--out", str(tmp_path)])
    assert [r["case"].split()[0] for r in rows] == ["Linear", "Conv2d"]
    assert all(r["layer_ms"] > 0 and r["gemm_ms"] > 0 for r in rows)
    assert (tmp_path / "bench_layers.csv").read_text().startswith("case,layer_ms")
    assert (tmp_path / "bench_layers.png").stat().st_size > 1000
