"""Mixed precision: float32 masters, loss scaling, and a skip decision that every rank shares."""
import numpy
import pytest

import mpidp
from mpidp import amp, nn, optim
from mpidp.backend import bfloat16

B, D, C, STEPS = 4, 8, 5, 8


def build(seed=0):
    model = nn.Sequential(nn.Linear(D, 32), nn.Tanh(), nn.Linear(32, 16), nn.ReLU(), nn.Linear(16, C))
    rng = numpy.random.default_rng(seed)
    for p in model.parameters():
        p.data[...] = rng.standard_normal(p.shape) * 0.3
    return model


def batches(size, steps=STEPS):
    rng = numpy.random.default_rng(7)
    return [(rng.standard_normal((size * B, D)).astype(numpy.float32), rng.integers(0, C, size * B))
            for _ in range(steps)]


def make_opt(kind, params):
    return optim.Adam(params, lr=0.01) if kind == "adam" else optim.SGD(params, lr=0.2, momentum=0.5)


def run(rank, size, wrap="dist", dtype="float16", plant=None, steps=STEPS, kind="adam", **mp_args):
    """Train with amp; ``plant(step, opt)`` may poison this rank's gradients after they are averaged."""
    model = build()
    if dtype == "float16":  # 2^16 x gradients summed over 4 ranks in float16 would overflow every step
        mp_args.setdefault("init_scale", 2.0 ** 10)
    mp = amp.MixedPrecision(model, make_opt(kind, model.parameters()), dtype=dtype, **mp_args)
    opt = (mpidp.DistributedOptimizer(mp, model=model) if wrap == "dist"
           else mpidp.ShardedOptimizer(mp, model=model, bucket_bytes=256))
    crit = nn.CrossEntropyLoss()
    history = []
    for step, (x, y) in enumerate(batches(size, steps)):
        opt.zero_grad()
        crit(model(x[rank * B:(rank + 1) * B]), y[rank * B:(rank + 1) * B])
        model.backward(crit.backward(mp.loss_scale))
        opt.synchronize()
        if plant is not None:
            plant(step, opt)
        before = [p.data.copy() for p in model.parameters()]
        opt.step()
        history.append((mp.last_step_skipped, mp.loss_scale,
                        all(numpy.array_equal(a, p.data) for a, p in zip(before, model.parameters()))))
    return model, mp, opt, history


def test_loss_scaler_growth_and_backoff():
    s = amp.LossScaler(init_scale=8.0, growth_factor=2.0, backoff_factor=0.25, growth_interval=3)
    seen = []
    for found in [False, False, False, False, True, False, False, False, True, True]:
        s.update(found)
        seen.append(s.scale)
    assert seen == [8, 8, 16, 16, 4, 4, 4, 8, 2, 0.5]
    assert s.growth_tracker == 0
    fresh = amp.LossScaler()
    fresh.load_state_dict(s.state_dict())
    assert (fresh.scale, fresh.growth_interval, fresh.backoff_factor) == (0.5, 3, 0.25)
    static = amp.LossScaler(128.0, dynamic=False)
    static.update(True)
    assert static.scale == 128.0
    assert amp.LossScaler().scale == 2.0 ** 16
    g = numpy.ones(3, dtype=numpy.float16)
    assert s.scale_loss(g).dtype == numpy.float16 and s.scale_loss(2.0) == 1.0


def test_unscale_reports_inf():
    p = nn.Parameter(numpy.ones(4, dtype=numpy.float32))
    p.grad[...] = [2, 4, 6, 8]
    s = amp.LossScaler(2.0)
    assert s.unscale([p]) is False and list(p.grad) == [1, 2, 3, 4]
    p.grad[1] = numpy.inf
    assert s.unscale([p]) is True


def test_model_computes_in_float16_with_float32_masters(rank, size):
    model, mp, opt, history = run(rank, size, kind="sgd")
    assert all(p.dtype == numpy.float16 for p in model.parameters())
    masters = [mp.state[p]["master"] for p in model.parameters()]
    assert all(m.dtype == numpy.float32 for m in masters)
    for p, m in zip(model.parameters(), masters):  # the model holds the masters rounded to float16
        numpy.testing.assert_array_equal(p.data, m.astype(numpy.float16))
    assert all(b.flat.dtype == numpy.float16 for b in opt.buckets)  # averaged in the compute dtype
    assert not any(skipped for skipped, _, _ in history)
    mpidp.check_replicas(model)
    # close to float32 training of the same batches
    ref = build()
    ref_opt = make_opt("sgd", ref.parameters())
    crit = nn.CrossEntropyLoss()
    for x, y in batches(size):
        ref.zero_grad()
        crit(ref(x), y)
        ref.backward(crit.backward())
        ref_opt.step()
    for p, q in zip(masters, ref.parameters()):
        numpy.testing.assert_allclose(p, q.data, atol=2e-2)  # float16 forward: ~1e-3 relative


@pytest.mark.parametrize("wrap", ["dist", "sharded"])
def test_overflow_on_one_rank_skips_everywhere(rank, size, wrap):
    bad = size - 1

    def plant(step, opt):  # after averaging, so only this rank's own check can see it
        if step == 3 and rank == bad:
            p = list(opt.param_groups[0]["params"])[0]
            p.grad.reshape(-1)[0] = numpy.inf
    model, mp, opt, history = run(rank, size, wrap=wrap, plant=plant, growth_interval=1000)
    skipped = [s for s, _, _ in history]
    assert skipped == [i == 3 for i in range(STEPS)]
    assert history[3][2], "a skipped step must leave the parameters as they were"
    assert history[3][1] == 2.0 ** 9 and mp.loss_scale == 2.0 ** 9  # backed off once, everywhere
    assert mp.skipped_steps == 1
    mpidp.check_replicas(model)


@pytest.mark.mpi(min_size=2)
def test_without_agreement_replicas_diverge(rank, size, monkeypatch):
    """The test above is meaningful: with a local-only decision the ranks part ways."""
    monkeypatch.setattr(amp, "overflow_everywhere", lambda found, process_set=None, scale=None: found)

    def plant(step, opt):
        if step == 3 and rank == 1:
            opt.param_groups[0]["params"][0].grad.reshape(-1)[0] = numpy.inf
    model, *_ = run(rank, size, plant=plant)
    with pytest.raises(mpidp.MismatchError, match="replicas differ"):
        mpidp.check_replicas(model)


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning",
                            "ignore:invalid value encountered:RuntimeWarning")
def test_overflow_in_loss_gradient_skips(rank, size):
    model = build()
    mp = amp.MixedPrecision(model, optim.SGD(model.parameters(), lr=0.1), init_scale=2.0 ** 40)
    opt = mpidp.DistributedOptimizer(mp, model=model)
    crit = nn.CrossEntropyLoss()
    x, y = batches(size)[0]
    crit(model(x[rank * B:(rank + 1) * B]), y[rank * B:(rank + 1) * B])
    model.backward(crit.backward(mp.loss_scale))  # 2^40 overflows float16
    opt.step()
    assert mp.last_step_skipped and mp.loss_scale == 2.0 ** 39
    mpidp.check_replicas(model)


def test_sharded_masters_are_one_nth(rank, size):
    model, mp, opt, history = run(rank, size, wrap="sharded")
    n_params = sum(p.size for p in model.parameters())
    masters = sum(st["master"].size for st in mp.state.values())
    assert n_params / size <= masters <= n_params / size + len(opt.buckets)
    assert all(st["exp_avg"].dtype == numpy.float32 for st in mp.state.values())
    dist_model, *_ = run(rank, size, wrap="dist")
    for p, q in zip(model.parameters(), dist_model.parameters()):  # float16 sums in another order
        numpy.testing.assert_allclose(p.data, q.data, atol=5e-3)
    mpidp.check_replicas(model)


def test_sharded_gathered_state_has_full_masters(rank, size):
    model, mp, opt, _ = run(rank, size, wrap="sharded", steps=3)
    sd = opt.state_dict()
    assert sd["loss_scaler"]["scale"] == mp.loss_scale
    for i, p in enumerate(model.parameters()):
        assert sd["state"][i]["master"].shape == p.shape and sd["state"][i]["master"].dtype == numpy.float32
        numpy.testing.assert_array_equal(sd["state"][i]["master"].astype(numpy.float16), p.data)


def test_state_dict_round_trip(rank, size):
    model, mp, opt, _ = run(rank, size, steps=4)
    sd = mp.state_dict()
    fresh = build(seed=5)
    fresh_mp = amp.MixedPrecision(fresh, optim.Adam(fresh.parameters(), lr=0.01))
    fresh_mp.load_state_dict(sd)
    assert fresh_mp.loss_scale == mp.loss_scale
    for p, q in zip(fresh.parameters(), model.parameters()):
        numpy.testing.assert_array_equal(p.data, q.data)
        numpy.testing.assert_array_equal(fresh_mp.state[p]["master"], mp.state[q]["master"])
        numpy.testing.assert_array_equal(fresh_mp.state[p]["exp_avg"], mp.state[q]["exp_avg"])


@pytest.mark.skipif(bfloat16 is None, reason="bfloat16 needs ml_dtypes")
def test_bfloat16_needs_no_scaling(rank, size):
    model, mp, opt, history = run(rank, size, dtype="bf16")
    assert all(p.dtype == bfloat16 for p in model.parameters())
    assert mp.loss_scale == 1.0 and not any(s for s, _, _ in history)
    mpidp.check_replicas(model)


def test_bad_dtype():
    with pytest.raises(ValueError, match="float16 or bfloat16"):
        amp.MixedPrecision(None, optim.SGD(build().parameters(), lr=0.1), dtype="int8")
