"""OffloadManager: the same training as without it, bit for bit, with offloaded device copies inside the budget.

On a CPU-only machine the "device" copies are separate NumPy arrays, so the
budget, the copies and the prefetch logic run for real; the GPU variants at the
end use pinned memory and a CUDA copy stream and are skipped without a GPU.
"""
import os

import numpy
import pytest

import mpidp
from mpidp import amp, models, nn, optim
from mpidp.offload import OffloadBudgetError, OffloadManager

B, D, H, C, STEPS = 4, 24, 40, 6, 5
THRESHOLD = 2048  # bytes: the weights are offloaded, the biases stay on the "device"


def build(checkpoint=False, seed=0):
    rng = numpy.random.default_rng(seed)

    def block():
        return nn.Sequential(nn.Linear(H, H, dtype=numpy.float64, rng=rng), nn.Tanh())
    blocks = [nn.Checkpoint(block()) if checkpoint else block() for _ in range(3)]
    return nn.Sequential(nn.Linear(D, H, dtype=numpy.float64, rng=rng), nn.ReLU(), *blocks,
                         nn.Linear(H, C, dtype=numpy.float64, rng=rng))


def batches(size, passes=1, steps=STEPS):
    rng = numpy.random.default_rng(3)
    return [(rng.standard_normal((size * B * passes, D)), rng.integers(0, C, size * B * passes))
            for _ in range(steps)]


def train(model, rank, size, manager=None, passes=1, wrap=True, steps=STEPS, data=None):
    inner = optim.Adam(model.parameters(), lr=0.01, weight_decay=1e-3)
    if manager is not None and wrap:
        inner = manager.wrap_optimizer(inner)
    opt = mpidp.DistributedOptimizer(inner, model=model, backward_passes_per_step=passes,
                                     fusion_threshold_bytes=4096)
    crit = nn.CrossEntropyLoss()
    for x, y in data or batches(size, passes, steps):
        opt.zero_grad()
        for k in range(passes):
            lo = (rank * passes + k) * B
            crit(model(x[lo:lo + B]), y[lo:lo + B])
            model.backward(crit.backward() / passes)
        opt.step()
    opt.close()  # (the next call builds another on the same model)
    return model


def same(a, b):
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        numpy.testing.assert_array_equal(p.data, q.data, err_msg=name)


def weight_bytes():
    return H * H * 8  # one offloaded weight


@pytest.mark.parametrize("prefetch", [0, 1, 2])
@pytest.mark.parametrize("copies", ["sync", "thread"])
@pytest.mark.parametrize("budget", ["tight", "roomy"])
def test_bit_identical_within_budget(rank, size, prefetch, copies, budget):
    # tight: one weight and its gradient (the backward of one Linear); roomy: the whole model
    limit = 2 * weight_bytes() if budget == "tight" else 64 * weight_bytes()
    model = build()
    mgr = OffloadManager(model, device_budget_bytes=limit, threshold_bytes=THRESHOLD, prefetch=prefetch,
                         copies=copies)
    train(model, rank, size, mgr)
    same(model, train(build(), rank, size))
    s = mgr.statistics()
    assert s["offloaded_params"] == 4 and s["peak_device_bytes"] <= limit
    assert s["h2d_bytes"] > 0 and s["d2h_bytes"] > 0 and s["copies"] == copies
    if budget == "roomy" and prefetch:
        assert s["prefetch_hits"] > 0
    mpidp.check_replicas(model)
    mgr.close()


def test_modules_compute_on_device_copies(rank, size):
    model = build()
    limit = 3 * weight_bytes()
    mgr = OffloadManager(model, device_budget_bytes=limit, threshold_bytes=THRESHOLD)
    seen = []

    def check(m, *_):  # registered after the manager's hooks: runs with the module's copies in place
        seen.append(m.weight.data is not mgr.host_array(m.weight) and mgr.pool.in_use <= limit)
        assert not numpy.shares_memory(m.weight.data, mgr.host_array(m.weight))
    for m in model.modules():
        if isinstance(m, nn.Linear) and mgr.is_offloaded(m.weight):
            m.register_forward_pre_hook(check)
            m.register_backward_pre_hook(check)
    train(model, rank, size, mgr, steps=2)
    assert seen and all(seen)
    assert all(p.data is mgr.host_array(p) for p in model.parameters() if mgr.is_offloaded(p))


def test_checkpoint_blocks(rank, size):
    model = build(checkpoint=True)
    mgr = OffloadManager(model, device_budget_bytes=2 * weight_bytes(), threshold_bytes=THRESHOLD, prefetch=1)
    train(model, rank, size, mgr)
    same(model, train(build(checkpoint=True), rank, size))
    same(model, train(build(), rank, size))  # recomputation changes nothing either
    assert mgr.statistics()["peak_device_bytes"] <= 2 * weight_bytes()


def test_gradient_accumulation(rank, size):
    model = build()
    mgr = OffloadManager(model, device_budget_bytes=2 * weight_bytes(), threshold_bytes=THRESHOLD)
    train(model, rank, size, mgr, passes=2)
    same(model, train(build(), rank, size, passes=2))


def test_device_update_and_disk_tier(rank, size, tmp_path):
    model = build()
    budget = 4 * weight_bytes()  # Adam on the device: weight, gradient, exp_avg, exp_avg_sq
    mgr = OffloadManager(model, device_budget_bytes=budget, threshold_bytes=THRESHOLD, optimizer_on="device",
                         disk_dir=tmp_path / f"rank{rank}")
    train(model, rank, size, mgr)
    same(model, train(build(), rank, size))
    host = [mgr.host_array(p) for p in model.parameters() if mgr.is_offloaded(p)]
    assert all(isinstance(h, numpy.memmap) for h in host)
    assert mgr.statistics()["peak_device_bytes"] <= budget
    directory = mgr.disk.directory
    assert len(os.listdir(directory)) == 4 * 3  # each offloaded weight and its two Adam moments
    mgr.disk.close()
    assert not os.path.exists(directory)


def test_device_update_needs_the_wrapper_and_room(rank, size):
    model = build()
    mgr = OffloadManager(model, device_budget_bytes=2 * weight_bytes(), threshold_bytes=THRESHOLD,
                         optimizer_on="device")
    with pytest.raises(mpidp.MpidpError, match="wrap_optimizer"):
        train(model, rank, size, mgr, wrap=False, steps=1)
    model = build()
    mgr = OffloadManager(model, device_budget_bytes=2 * weight_bytes(), threshold_bytes=THRESHOLD,
                         optimizer_on="device")
    with pytest.raises(OffloadBudgetError, match="device update"):
        train(model, rank, size, mgr, steps=1)


def test_transformer_with_tied_weights(rank, size):
    kw = dict(vocab_size=48, seq_len=8, embed_dim=16, num_heads=2, num_layers=2, dtype=numpy.float64, seed=1)
    rng = numpy.random.default_rng(0)
    data = [(rng.integers(0, 48, (size * 2 * B, 8)), rng.integers(0, 48, (size * 2 * B, 8))) for _ in range(4)]
    model = models.transformer(checkpoint=True, **kw)
    mgr = OffloadManager(model, device_budget_bytes=2 * 64 * 16 * 8, threshold_bytes=1024, prefetch=2)
    train(model, rank, size, mgr, passes=2, data=data)
    ref = train(models.transformer(**kw), rank, size, passes=2, data=data)
    # accumulated repeated-token rows of the embedding add up in another order: not bit-identical
    for (name, p), q in zip(model.named_parameters(), ref.parameters()):
        numpy.testing.assert_allclose(p.data, q.data, rtol=0, atol=1e-12, err_msg=name)
    assert mgr.statistics()["peak_device_bytes"] <= 2 * 64 * 16 * 8


def test_with_amp_and_sharded(rank, size):
    model = build()
    model.to(dtype=numpy.float32)
    mp = amp.MixedPrecision(model, optim.Adam(model.parameters(), lr=0.01), dtype="float16", init_scale=256.0)
    mgr = OffloadManager(model, device_budget_bytes=H * H * 2 * 2, threshold_bytes=1024, prefetch=1)
    opt = mpidp.ShardedOptimizer(mp, model=model, bucket_bytes=2048)
    crit = nn.CrossEntropyLoss()
    losses = []
    for x, y in batches(size, steps=8):
        x = x.astype(numpy.float32)
        opt.zero_grad()
        losses.append(crit(model(x[rank * B:(rank + 1) * B]), y[rank * B:(rank + 1) * B]))
        model.backward(crit.backward(mp.loss_scale))
        opt.step()
    assert all(numpy.isfinite(losses)) and not mp.skipped_steps
    assert all(p.dtype == numpy.float16 for p in model.parameters())
    assert mgr.statistics()["peak_device_bytes"] <= H * H * 2 * 2
    mpidp.check_replicas(model)


@pytest.mark.parametrize("prefetch", [0, 1])
def test_a_module_called_on_its_own_sees_the_current_parameters(rank, size, prefetch):
    # with room to spare, the last pass's device copies stay cached; a block called directly
    # (not through the model, whose forward starts a new pass) used the weights from before
    # the optimizer step, and again after load_state_dict
    model = build()
    mgr = OffloadManager(model, device_budget_bytes=64 * weight_bytes(), threshold_bytes=THRESHOLD,
                         prefetch=prefetch)
    train(model, rank, size, mgr, steps=2)
    ref = train(build(), rank, size, steps=2)
    x = numpy.random.default_rng(5).standard_normal((3, H))
    block, ref_block = list(model.children())[2], list(ref.children())[2]
    numpy.testing.assert_array_equal(block(x), ref_block(x))
    other = build(seed=1)
    model.load_state_dict(other.state_dict())
    numpy.testing.assert_array_equal(block(x), list(other.children())[2](x))
    with nn.no_grad():
        numpy.testing.assert_array_equal(model(x[:, :D]), other(x[:, :D]))
    same(model, other)  # and the host tier holds what was loaded
    train(model, rank, size, mgr, steps=1)  # training goes on as before
    same(model, train(other, rank, size, steps=1))
    mgr.close()


def test_errors():
    with pytest.raises(OffloadBudgetError, match="raise the budget to at least 25600"):
        OffloadManager(build(), device_budget_bytes=weight_bytes(), threshold_bytes=THRESHOLD)
    model = build()
    mpidp.DistributedOptimizer(optim.SGD(model.parameters(), lr=0.1), model=model)
    with pytest.raises(mpidp.MpidpError, match="before the DistributedOptimizer"):
        OffloadManager(model, device_budget_bytes=10 ** 6, threshold_bytes=THRESHOLD)
    with pytest.raises(ValueError, match="optimizer_on"):
        OffloadManager(build(), device_budget_bytes=10 ** 6, optimizer_on="disk")


# -- on a GPU: pinned host tier, copy stream ------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("prefetch", [0, 2])
def test_gpu_pinned_tier_and_copy_stream(rank, size, prefetch):
    import cupy
    kw = dict(vocab_size=64, seq_len=16, embed_dim=64, num_heads=4, num_layers=2, dtype=numpy.float64, seed=1)
    rng = numpy.random.default_rng(0)
    data = [(cupy.asarray(rng.integers(0, 64, (size * B, 16))), cupy.asarray(rng.integers(0, 64, (size * B, 16))))
            for _ in range(4)]
    model = models.transformer(device="gpu", **kw)
    budget = 6 * 64 * 64 * 8
    mgr = OffloadManager(model, device_budget_bytes=budget, threshold_bytes=16 * 1024, prefetch=prefetch)
    for p in model.parameters():
        if mgr.is_offloaded(p):
            attrs = cupy.cuda.runtime.pointerGetAttributes(p.data.ctypes.data)
            assert attrs.type == cupy.cuda.runtime.memoryTypeHost, "the host tier must be pinned"
    train(model, rank, size, mgr, data=data)
    ref = train(models.transformer(device="gpu", **kw), rank, size, data=data)
    for (name, p), q in zip(model.named_parameters(), ref.parameters()):
        numpy.testing.assert_allclose(mpidp.backend.asnumpy(p.data), cupy.asnumpy(q.data), atol=1e-10,
                                      err_msg=name)
    s = mgr.statistics()
    assert s["copies"] == "stream" and s["copy_s"] > 0 and s["peak_device_bytes"] <= budget
    if prefetch:
        assert s["prefetch_hits"] > 0


@pytest.mark.parametrize("where", ["forward", "backward"])
@pytest.mark.parametrize("budget", ["tight", "roomy"])
def test_training_goes_on_after_a_pass_that_raised(rank, size, where, budget):
    # a module that raised (an out-of-memory a batch-size search catches, a user's assert) left its
    # parameters pinned, pointing at their device copies, with the host arrays held aside
    model = build()
    mgr = OffloadManager(model, device_budget_bytes=(2 if budget == "tight" else 64) * weight_bytes(),
                         threshold_bytes=THRESHOLD)
    block = list(model.children())[3][0]  # an offloaded Linear (the manager hooks the leaves)
    armed = [True]

    def boom(m, *_):
        if armed[0]:
            armed[0] = False
            raise RuntimeError("out of memory (a test)")
    (block.register_forward_pre_hook if where == "forward" else block.register_backward_pre_hook)(boom)
    x, y = batches(size)[0]
    crit = nn.CrossEntropyLoss()
    with pytest.raises(RuntimeError, match="a test"):
        crit(model(x[:B]), y[:B])
        model.backward(crit.backward())
    model.zero_grad()
    train(model, rank, size, mgr)
    same(model, train(build(), rank, size))
    assert all(p.data is mgr.host_array(p) for p in model.parameters() if mgr.is_offloaded(p))
    mgr.close()
