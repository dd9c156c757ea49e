"""ShardedOptimizer (ZeRO-1/2) reaches the parameters of one process x the global batch, with 1/N state."""
import numpy
import pytest

import mpidp
from mpidp import nn, optim

B, D, C, STEPS = 4, 7, 5, 12


def build(seed=0, hidden=13):
    model = nn.Sequential(nn.Linear(D, 16, dtype=numpy.float64), nn.Tanh(),
                          nn.Linear(16, hidden, dtype=numpy.float64), nn.ReLU(),
                          nn.Linear(hidden, C, dtype=numpy.float64))
    rng = numpy.random.default_rng(seed)
    for p in model.parameters():
        p.data[...] = rng.standard_normal(p.shape) * 0.4
    return model


def make_opt(kind, model):
    params = list(model.parameters())
    if kind == "adamw-groups":  # two groups with different decay: each bucket stays in one group
        return optim.AdamW([{"params": params[:2], "weight_decay": 0.1},
                            {"params": params[2:], "weight_decay": 0.0, "lr": 0.02}], lr=0.01)
    if kind == "sgd":
        return optim.SGD(params, lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-3)
    return optim.Adam(params, lr=0.01, weight_decay=1e-3)


def batches(size, steps=STEPS, passes=1):
    rng = numpy.random.default_rng(42)
    return [(rng.standard_normal((size * B * passes, D)), rng.integers(0, C, size * B * passes))
            for _ in range(steps)]


def reference(kind, size, passes=1, steps=STEPS, clip=None):
    model = build()
    opt = make_opt(kind, model)
    crit = nn.CrossEntropyLoss()
    for x, y in batches(size, steps, passes):
        model.zero_grad()
        crit(model(x), y)
        model.backward(crit.backward())
        if clip:
            optim.clip_grad_norm(model.parameters(), clip)
        opt.step()
    return model, opt


def train(model, opt, rank, size, passes=1, steps=STEPS, clip=None, first=0):
    crit = nn.CrossEntropyLoss()
    for x, y in batches(size, steps, passes)[first:]:
        opt.zero_grad()
        for k in range(passes):
            lo = (rank * passes + k) * B
            crit(model(x[lo:lo + B]), y[lo:lo + B])
            model.backward(crit.backward() / passes)
        if clip:
            opt.clip_grad_norm(clip)
        opt.step()


def sharded(kind, rank, size, **kw):
    model = build()
    opt = mpidp.ShardedOptimizer(make_opt(kind, model), model=model, **kw)
    return model, opt


def compare(model, ref, atol=1e-10):
    for (name, p), q in zip(model.named_parameters(), ref.parameters()):
        numpy.testing.assert_allclose(p.data, q.data, rtol=0, atol=atol, err_msg=name)


@pytest.mark.parametrize("stage", [1, 2])
@pytest.mark.parametrize("kind", ["adam", "adamw-groups", "sgd"])
@pytest.mark.parametrize("bucket_bytes", [200, 1 << 20])  # many small buckets, and one per group
def test_matches_one_big_batch(rank, size, stage, kind, bucket_bytes):
    model, opt = sharded(kind, rank, size, stage=stage, bucket_bytes=bucket_bytes)
    train(model, opt, rank, size)
    ref, _ = reference(kind, size)
    compare(model, ref)
    mpidp.check_replicas(model)
    assert opt.stats["steps"] == STEPS


@pytest.mark.parametrize("stage", [1, 2])
@pytest.mark.parametrize("bucket_bytes", [200, 1 << 20])
def test_ring_reduce_scatter_matches_one_big_batch(rank, size, stage, bucket_bytes, monkeypatch):
    """Every gradient reduce-scatter around the ring (the average folded in)."""
    from mpidp.comm import _buffers
    monkeypatch.setattr(_buffers, "RING_FROM", 1)
    model, opt = sharded("adam", rank, size, stage=stage, bucket_bytes=bucket_bytes)
    train(model, opt, rank, size)
    compare(model, reference("adam", size)[0])
    mpidp.check_replicas(model)


@pytest.mark.parametrize("stage", [1, 2])
def test_matches_distributed_optimizer(rank, size, stage):
    model, opt = sharded("adam", rank, size, stage=stage, overlap=False)
    train(model, opt, rank, size)
    dmodel = build()
    dopt = mpidp.DistributedOptimizer(make_opt("adam", dmodel), model=dmodel)
    train(dmodel, dopt, rank, size)
    compare(model, dmodel, 1e-12)


@pytest.mark.parametrize("stage", [1, 2])
def test_accumulation_and_no_sync(rank, size, stage):
    model, opt = sharded("adam", rank, size, stage=stage, backward_passes_per_step=2)
    train(model, opt, rank, size, passes=2, steps=6)
    compare(model, reference("adam", size, passes=2, steps=6)[0])
    model, opt = sharded("adam", rank, size, stage=stage)
    crit = nn.CrossEntropyLoss()
    for x, y in batches(size, 6, passes=2):
        opt.zero_grad()
        with opt.no_sync():
            crit(model(x[2 * rank * B:(2 * rank + 1) * B]), y[2 * rank * B:(2 * rank + 1) * B])
            model.backward(crit.backward() / 2)
        crit(model(x[(2 * rank + 1) * B:(2 * rank + 2) * B]), y[(2 * rank + 1) * B:(2 * rank + 2) * B])
        model.backward(crit.backward() / 2)
        opt.step()
    compare(model, reference("adam", size, passes=2, steps=6)[0])


@pytest.mark.parametrize("stage", [1, 2])
def test_state_is_one_nth_per_rank(rank, size, stage):
    model, opt = sharded("adam", rank, size, stage=stage, bucket_bytes=1 << 20)
    train(model, opt, rank, size, steps=2)
    full = 2 * sum(p.nbytes for p in model.parameters())  # Adam: exp_avg and exp_avg_sq
    mine = opt.state_bytes()
    pad = 2 * 8 * len(opt.buckets)  # each bucket pads to a multiple of the ranks: < 1 element per rank
    assert full / size <= mine <= full / size + pad
    total = mpidp.allreduce(numpy.array([mine], dtype=numpy.int64), op=mpidp.Sum)[0]
    assert full <= total <= full + size * pad
    if stage == 2:  # between steps no whole gradient buffer is bound
        assert all(p.grad is None for p in model.parameters())
        assert all(b.grad is None for b in opt.buckets)


def test_stage2_bounds_gradient_bytes(rank, size):
    one, opt1 = sharded("adam", rank, size, stage=1, bucket_bytes=256)
    largest = max(b.padded * 8 for b in opt1.buckets)
    two, opt2 = sharded("adam", rank, size, stage=2, bucket_bytes=256, max_inflight_bytes=largest)
    train(one, opt1, rank, size, steps=3)
    train(two, opt2, rank, size, steps=3)
    compare(two, one, 1e-12)
    full = sum(b.grad.nbytes for b in opt1.buckets)
    # a module's weight and bias sit in different buckets and are bound together: the cap is exceeded
    # only by buffers that are being filled, never by finished reductions
    assert opt2.stats["peak_grad_bytes"] <= 2 * largest < full
    assert opt1.stats["peak_grad_bytes"] == full
    with pytest.raises(ValueError, match="below the largest bucket"):
        sharded("adam", rank, size, stage=2, bucket_bytes=256, max_inflight_bytes=largest - 1)


@pytest.mark.parametrize("stage", [1, 2])
def test_clip_grad_norm(rank, size, stage):
    model, opt = sharded("adam", rank, size, stage=stage, bucket_bytes=300)
    train(model, opt, rank, size, steps=5, clip=0.3)
    compare(model, reference("adam", size, steps=5, clip=0.3)[0])


@pytest.mark.parametrize("stage", [1, 2])
def test_gathered_state_dict_round_trip(rank, size, stage):
    model, opt = sharded("adamw-groups", rank, size, stage=stage, bucket_bytes=300)
    train(model, opt, rank, size, steps=5)
    sd = opt.state_dict()
    ref, ref_opt = reference("adamw-groups", size, steps=5)
    want = ref_opt.state_dict()
    assert sorted(sd["state"]) == sorted(want["state"])
    assert [g["params"] for g in sd["param_groups"]] == [g["params"] for g in want["param_groups"]]
    for i, entry in want["state"].items():
        assert sd["state"][i]["step"] == entry["step"]
        for key in ("exp_avg", "exp_avg_sq"):
            numpy.testing.assert_allclose(sd["state"][i][key], entry[key], rtol=0, atol=1e-10)
    # resume: a fresh model + optimizer loads the gathered state (each rank keeps its part)
    fresh, fresh_opt = sharded("adamw-groups", rank, size, stage=stage, bucket_bytes=300)
    fresh.load_state_dict(model.state_dict())
    fresh_opt.load_state_dict(sd)
    train(fresh, fresh_opt, rank, size, first=5)
    compare(fresh, reference("adamw-groups", size)[0])
    # a gathered state loads into a plain optimizer too
    plain = make_opt("adamw-groups", build())
    plain.load_state_dict(sd)


def test_per_rank_state_dict(rank, size):
    model, opt = sharded("adam", rank, size, bucket_bytes=300)
    train(model, opt, rank, size, steps=4)
    mine = opt.state_dict(gathered=False)
    assert mine["shard"]["rank"] == rank and mine["shard"]["size"] == size
    fresh, fresh_opt = sharded("adam", rank, size, bucket_bytes=300)
    fresh.load_state_dict(model.state_dict())
    fresh_opt.load_state_dict(mine)
    train(fresh, fresh_opt, rank, size, first=4)
    compare(fresh, reference("adam", size)[0])
    other = dict(mine, shard=dict(mine["shard"], rank=rank + 1))
    with pytest.raises(ValueError, match="saved by rank"):
        fresh_opt.load_state_dict(other)


@pytest.mark.mpi(min_size=2)
def test_different_model_on_one_rank_raises_everywhere(rank, size):
    model = build(hidden=11 if rank == 1 else 13)
    opt = mpidp.ShardedOptimizer(make_opt("adam", model), model=model)
    crit = nn.CrossEntropyLoss()
    x, y = batches(size)[0]
    with pytest.raises(mpidp.MismatchError, match="differs") as info:
        crit(model(x[:B]), y[:B])
        model.backward(crit.backward())
        opt.step()
    assert "rank 1 has" in str(info.value)
    assert mpidp.allreduce(numpy.ones(1), op=mpidp.Sum)[0] == size  # still usable


def test_bad_arguments():
    model = build()
    with pytest.raises(ValueError, match="stage must be"):
        mpidp.ShardedOptimizer(make_opt("adam", model), model=model, stage=3)
    with pytest.raises(ValueError, match="needs model="):
        mpidp.ShardedOptimizer(make_opt("adam", model), stage=2)
