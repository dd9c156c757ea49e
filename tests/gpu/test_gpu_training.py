"""Training on CuPy across ranks: the same parameters as on NumPy, from the default stream and a side stream.

Backward kernels fill the gradient buckets while finished buckets are already
being reduced; with two ranks sharing one GPU this is where stream order,
staging through pinned memory and the engine thread meet. Skipped without a GPU.
"""
import numpy
import pytest

import mpidp
from mpidp import nn, optim
from mpidp.backend import asnumpy, cupy_module

pytestmark = pytest.mark.gpu
cp = cupy_module()
B, D, H, C, STEPS = 8, 16, 48, 5, 4


@pytest.fixture(autouse=True)
def _init():
    mpidp.init()


def build(device):
    rng = numpy.random.default_rng(0)
    model = nn.Sequential(nn.Linear(D, H, dtype=numpy.float64, rng=rng), nn.Tanh(),
                          nn.Linear(H, H, dtype=numpy.float64, rng=rng), nn.ReLU(),
                          nn.Linear(H, C, dtype=numpy.float64, rng=rng))
    return model.to(device)


WRAPS = {
    # small buckets: several nonblocking allreduces start during backward
    "distributed": lambda m: mpidp.DistributedOptimizer(optim.SGD(m.parameters(), lr=0.1, momentum=0.9),
                                                        model=m, fusion_threshold_bytes=2048),
    "zero2": lambda m: mpidp.ShardedOptimizer(optim.Adam(m.parameters(), lr=0.01), model=m, stage=2),
}


def train(device, wrap):
    """Parameters (host copies) after STEPS steps, each rank on its slice of one global batch."""
    rank, size = mpidp.rank(), mpidp.size()
    xp = cp if device == "gpu" else numpy
    model = build(device)
    opt = WRAPS[wrap](model)
    crit = nn.CrossEntropyLoss()
    rng = numpy.random.default_rng(42)
    for _ in range(STEPS):
        x, y = rng.standard_normal((size * B, D)), rng.integers(0, C, size * B)
        lo = rank * B
        opt.zero_grad()
        crit(model(xp.asarray(x[lo:lo + B])), xp.asarray(y[lo:lo + B]))
        model.backward(crit.backward())
        opt.step()
    mpidp.check_replicas(model)
    return [numpy.array(asnumpy(p.data)) for p in model.parameters()]


@pytest.mark.parametrize("side_stream", [False, True], ids=["default-stream", "side-stream"])
@pytest.mark.parametrize("wrap", sorted(WRAPS))
def test_training_on_the_gpu_matches_numpy(wrap, side_stream):
    want = train("cpu", wrap)
    if side_stream:  # every kernel of the step on a non-blocking stream, which the null stream does not order
        stream = cp.cuda.Stream(non_blocking=True)
        with stream:
            got = train("gpu", wrap)
        stream.synchronize()
    else:
        got = train("gpu", wrap)
    for i, (g, w) in enumerate(zip(got, want)):
        numpy.testing.assert_allclose(g, w, rtol=1e-9, atol=1e-12, err_msg=f"parameter {i} ({wrap})")


def test_async_in_place_allreduce_from_a_side_stream():
    """The handle's result is on the device before the next kernel on the producing stream reads it."""
    n = mpidp.size()
    stream = cp.cuda.Stream(non_blocking=True)
    with stream:
        x = cp.zeros(1 << 22, dtype=cp.float32)
        for _ in range(50):  # long enough that an unsynchronised copy would see zeros
            x += 1.0
        handle = mpidp.allreduce_async_(x, op=mpidp.Sum)
        doubled = mpidp.synchronize(handle) * 2
    stream.synchronize()
    assert float(doubled[0]) == 100.0 * n and float(doubled[-1]) == 100.0 * n
