"""mpidp.tune: the batch search (budget, agreement, stopping) and communication tuning, made
deterministic with a fake clock whose cost the test controls."""
import math

import numpy
import pytest

import mpidp
from mpidp import nn, optim, tune
from mpidp.comm import _buffers

IN, OUT = 16, 3


class Clock:
    """A clock that only moves when the test says so."""

    def __init__(self):
        self.t = 0.0
        self.calls = 0

    def __call__(self):
        self.calls += 1
        return self.t


class Costly(nn.Module):
    """A Linear layer whose forward costs ``cost(batch)`` seconds on a fake clock."""

    def __init__(self, clock, cost):
        super().__init__()
        self.fc = nn.Linear(IN, OUT, dtype=numpy.float32, rng=numpy.random.default_rng(0))
        self.clock, self.cost = clock, cost

    def forward(self, x):
        self.clock.t += self.cost(len(x))
        return self.fc(x)

    def _backward(self, dy):
        return self.fc.backward(dy)


def sample(rank):
    rng = numpy.random.default_rng(100 + rank)
    return lambda b: (rng.standard_normal((b, IN)).astype(numpy.float32), rng.integers(0, OUT, b))


def sgd(params):
    return optim.SGD(params, lr=0.1, momentum=0.9)


def search(rank, cost, **kw):
    clock = Clock()
    model = Costly(clock, cost)
    before = [p.data.copy() for p in model.parameters()]
    kw.setdefault("budget_bytes", 1 << 30)
    result = tune.batch_size(model, sample(rank), sgd, timer=clock, **kw)
    after = [p.data for p in model.parameters()]
    assert all((a == b).all() for a, b in zip(before, after)), "the model was not restored"
    return result


def tried(result):
    return [r["batch"] for r in result.table]


def test_stops_when_throughput_stops_improving(rank, size):
    # step = 1 + b/100 s: samples/s saturates; 512 -> 1024 gains 8.9 %, 1024 -> 2048 only 4.7 % < 5 %;
    # bisection: 1536 gains 3.1 %, 1280 gains 1.8 %: 1024 stays
    result = search(rank, lambda b: 1.0 + 0.01 * b, start=8, max_batch=1 << 14)
    assert tried(result) == [8, 16, 32, 64, 128, 256, 512, 1024, 2048, 1536, 1280]
    assert result.batch_size == 1024 and result.global_batch == 1024 * size
    row = result.table[tried(result).index(1024)]
    assert row["samples_s"] == pytest.approx(size * 1024 / (1.0 + 10.24))
    assert row["step_s"] == pytest.approx(1.0 + 10.24)


def test_max_batch_and_threshold(rank, size):
    result = search(rank, lambda b: 1.0, start=4, max_batch=64, refine_steps=0)
    assert tried(result) == [4, 8, 16, 32, 64] and result.batch_size == 64
    # a 50 % threshold: 16 -> 32 gains only 2 * (1 + .16) / (1 + .32) - 1 = 76 %, 32 -> 64 gains 57 %,
    # 64 -> 128 gains 2 * 1.64 / 2.28 - 1 = 44 %: stops there
    result = search(rank, lambda b: 1.0 + 0.01 * b, start=16, improve_threshold=0.5, refine_steps=0)
    assert tried(result) == [16, 32, 64, 128] and result.batch_size == 64


def test_same_answer_on_every_rank(rank, size):
    # every rank measures a different cost; the slowest rank's step decides, the same everywhere
    result = search(rank, lambda b: 1.0 + 0.01 * b * (1 + 0.5 * rank), start=8)
    every = mpidp.allgather_object((result.batch_size, tried(result), result.lr_scale))
    assert all(e == every[0] for e in every)
    slowest = 1 + 0.5 * (size - 1)

    def trial(b):
        return {"fits": True, "samples_s": size * b / (1.0 + 0.01 * b * slowest)}

    expect, _ = tune._search(trial, 8, 4096, 0.05, 2)
    assert result.batch_size == expect


def test_respects_the_budget(rank, size):
    probe = search(rank, lambda b: 1.0, start=8, max_batch=16, refine_steps=0)
    p8, p16 = (r["peak_bytes"] for r in probe.table)
    per_sample = (p16 - p8) / 8
    assert per_sample >= IN * 4  # at least the kept input of the Linear layer
    fixed = p8 - 8 * per_sample
    budget = int(fixed + 100.5 * per_sample)
    result = search(rank, lambda b: 1.0, start=8, budget_bytes=budget)
    assert result.budget_bytes == budget
    ran = [r for r in result.table if r["ran"]]
    assert all(r["peak_bytes"] <= budget for r in ran), "a trial over the budget was run"
    assert [r["batch"] for r in result.table if not r["ran"]] == [128, 108]
    assert all(r["note"] == "predicted over budget" for r in result.table if not r["ran"])
    assert result.batch_size == 96  # 64 fits, 128 would not; bisection: 96 fits, 108 would not


def test_start_over_budget_halves(rank, size):
    probe = search(rank, lambda b: 1.0, start=8, max_batch=16, refine_steps=0)
    p8, p16 = (r["peak_bytes"] for r in probe.table)
    budget = int(p8 - (p16 - p8) / 8 * 5)  # room for 3 samples
    result = search(rank, lambda b: 1.0, start=8, budget_bytes=budget, refine_steps=0)
    assert tried(result)[:3] == [8, 4, 2] and result.batch_size == 2


def test_learning_rate_rules(rank, size):
    linear = search(rank, lambda b: 1.0, start=8, max_batch=32, base_lr=0.1, refine_steps=0)
    assert linear.lr == pytest.approx(0.1 * 32 * size / 8)
    sched = linear.warmup_scheduler(optim.SGD(Costly(Clock(), len).parameters(), lr=linear.lr), 10)
    assert sched.optimizer.param_groups[0]["lr"] == pytest.approx(0.1)  # warm-up starts at base_lr
    root = search(rank, lambda b: 1.0, start=8, max_batch=32, base_lr=0.1, base_batch=16, lr_rule="sqrt",
                  refine_steps=0)
    assert root.lr == pytest.approx(0.1 * math.sqrt(32 * size / 16))
    with pytest.raises(ValueError, match="lr_rule"):
        tune.batch_size(Costly(Clock(), len), sample(rank), sgd, lr_rule="cubic", budget_bytes=1 << 20)


def test_a_factory_that_returns_a_distributed_optimizer_leaves_no_hooks(rank, size):
    # each trial's DistributedOptimizer must be closed, also one the factory built itself: its
    # gradient hooks left on the model counted the next trial's gradients as a second backward
    model = Costly(Clock(), lambda b: 1.0)
    hooks = [len(p._hooks) for p in model.parameters()]

    def factory(params):
        return mpidp.DistributedOptimizer(sgd(params), model=model)

    result = tune.batch_size(model, sample(rank), factory, start=4, max_batch=16, refine_steps=0,
                             budget_bytes=1 << 30, timer=model.clock)
    assert tried(result) == [4, 8, 16]
    assert [len(p._hooks) for p in model.parameters()] == hooks


# --- communication ------------------------------------------------------------------------------

def mlp(seed=0):
    rng = numpy.random.default_rng(seed)
    return nn.Sequential(nn.Linear(32, 64, rng=rng), nn.ReLU(), nn.Linear(64, 64, rng=rng), nn.ReLU(),
                         nn.Linear(64, 10, rng=rng))


def backward(model, rank):
    rng = numpy.random.default_rng(7 + rank)
    x, y = rng.standard_normal((8, 32)).astype(numpy.float32), rng.integers(0, 10, 8)
    crit = nn.CrossEntropyLoss()
    crit(model(x), y)
    model.backward(crit.backward())


@pytest.fixture
def cache_path(tmp_path):
    path = mpidp.broadcast_object(str(tmp_path / "tune.json"), root_rank=0)
    yield path
    _buffers.set_piece_bytes(0)


def fake_exchange_clock(opt, best=None, cost=None):
    """A clock on which an exchange costs ``cost(threshold, piece)`` s (default: 0.5 at ``best``, else 1)."""
    clock = Clock()
    cost = cost or (lambda t, p: 0.5 if (t, p) == best else 1.0)

    def timer():
        clock.calls += 1
        if clock.calls % 2 == 0:  # the second reading of a measurement
            clock.t += cost(opt.threshold, _buffers.piece_bytes())
        return clock.t
    return clock, timer


def order(opt):
    return [n for b in opt.buckets for n in b.names]


def test_communication_picks_a_candidate_and_keeps_order(rank, size, cache_path):
    model = mlp()
    opt = mpidp.DistributedOptimizer(optim.SGD(model.parameters(), lr=0.1), model=model,
                                     fusion_threshold_bytes=1 << 20)
    backward(model, rank)
    opt.synchronize()
    grads = [p.grad.copy() for p in model.parameters()]
    names = order(opt)
    current = (opt.threshold, _buffers.piece_bytes())
    best = (4096, 4096)
    clock, timer = fake_exchange_clock(opt, best)
    result = tune.communication(opt, thresholds=[1024, 4096, 16384], pieces=[4096, 1 << 20], reps=2,
                                search="grid", cache_path=cache_path, timer=timer)
    assert (result.threshold, result.piece_bytes) == best and not result.from_cache
    assert (opt.threshold, _buffers.piece_bytes()) == best
    assert {(r["threshold"], r["piece_bytes"]) for r in result.table} >= {best, current}
    assert sum(r["chosen"] for r in result.table) == 1
    assert order(opt) == names, "bucket order changed"
    assert len(opt.buckets) > 1
    assert all((g == p.grad).all() for g, p in zip(grads, model.parameters())), "gradients changed"
    assert all(p.grad.base is not None for p in model.parameters()), "grads are no bucket views"
    every = mpidp.allgather_object((result.threshold, result.piece_bytes, result.key))
    assert all(e == every[0] for e in every)
    opt.step()
    # the re-planned optimizer still averages correctly, hooks and all
    ref = mlp()
    for p, q in zip(ref.parameters(), model.parameters()):
        p.data[...] = q.data
    opt.zero_grad()
    backward(model, rank)
    backward(ref, rank)
    opt.synchronize()
    for p, q in zip(ref.parameters(), model.parameters()):
        numpy.testing.assert_allclose(q.grad, mpidp.allreduce(p.grad), rtol=1e-6, atol=1e-7)
    opt.close()


def test_coordinate_search(rank, size, cache_path):
    model = mlp()
    opt = mpidp.DistributedOptimizer(optim.SGD(model.parameters(), lr=0.1), model=model,
                                     fusion_threshold_bytes=1 << 20)
    backward(model, rank)
    opt.synchronize()
    # separable cost, fastest at threshold 4 KiB and piece 4 KiB
    clock, timer = fake_exchange_clock(opt, cost=lambda t, p: abs(math.log2(t / 4096)) + abs(math.log2(p / 4096)))
    result = tune.communication(opt, thresholds=[1024, 4096, 16384], pieces=[1024, 4096, 1 << 20], reps=1,
                                cache=False, log_path=cache_path + ".csv", timer=timer)
    assert (result.threshold, result.piece_bytes) == (4096, 4096)
    assert [r["stage"] for r in result.table] == sorted(r["stage"] for r in result.table)
    assert len(result.table) < 3 * 4 + 1  # fewer timings than the grid of 4 x 4 would take
    opt.close()


def test_communication_keeps_current_unless_faster(rank, size, cache_path):
    model = mlp()
    opt = mpidp.DistributedOptimizer(optim.SGD(model.parameters(), lr=0.1), model=model,
                                     fusion_threshold_bytes=4096)
    backward(model, rank)
    opt.synchronize()
    current = (opt.threshold, _buffers.piece_bytes())
    clock, timer = fake_exchange_clock(opt, None)  # all candidates cost the same
    result = tune.communication(opt, thresholds=[1024, 4096, 16384], reps=2, cache_path=cache_path, timer=timer)
    assert (result.threshold, result.piece_bytes) == current
    opt.close()


def test_explicit_settings_win(rank, size, cache_path, monkeypatch):
    model = mlp()
    opt = mpidp.DistributedOptimizer(optim.SGD(model.parameters(), lr=0.1), model=model,
                                     fusion_threshold_bytes=1 << 20)
    backward(model, rank)
    opt.synchronize()
    monkeypatch.setenv("MPIDP_PIECE_BYTES", "65536")
    _buffers.set_piece_bytes(65536)
    clock, timer = fake_exchange_clock(opt, (4096, 4096))
    result = tune.communication(opt, thresholds=[4096], pieces=[4096], reps=1, tune_threshold=False,
                                cache_path=cache_path, timer=timer)
    assert (result.threshold, result.piece_bytes) == (1 << 20, 65536) and clock.calls == 0
    monkeypatch.delenv("MPIDP_PIECE_BYTES")
    clock, timer = fake_exchange_clock(opt, (1 << 20, 4096))
    result = tune.communication(opt, thresholds=[4096], pieces=[4096], reps=1, tune_threshold=False,
                                cache_path=cache_path, timer=timer)
    assert result.threshold == 1 << 20 and result.piece_bytes == 4096  # only the piece was free
    opt.close()


def test_cache_round_trip(rank, size, cache_path):
    model = mlp()
    opt = mpidp.DistributedOptimizer(optim.SGD(model.parameters(), lr=0.1), model=model,
                                     fusion_threshold_bytes=1 << 20)
    backward(model, rank)
    opt.synchronize()
    best = (1024, 4096)
    clock, timer = fake_exchange_clock(opt, best)
    first = tune.communication(opt, thresholds=[1024, 16384], pieces=[4096, 1 << 20], reps=1, search="grid",
                               cache_path=cache_path, timer=timer)
    assert (first.threshold, first.piece_bytes) == best
    if rank == 0:
        entries = tune.load_cache(cache_path)
        assert entries[first.key]["fusion_threshold"] == 1024 and entries[first.key]["piece_bytes"] == 4096
        assert f"np={size}|" in first.key
        log = open(cache_path[:-len(".json")] + ".csv").read().splitlines()
        assert log[0].startswith("when,key,stage,threshold") and len(log) == 1 + len(first.table)
    opt.close()
    _buffers.set_piece_bytes(0)
    model2 = mlp()
    opt2 = mpidp.DistributedOptimizer(optim.SGD(model2.parameters(), lr=0.1), model=model2,
                                      fusion_threshold_bytes=1 << 20)
    calls = clock.calls
    second = tune.communication(opt2, cache_path=cache_path, timer=timer)
    assert second.from_cache and clock.calls == calls, "a cached setting was measured again"
    assert (second.threshold, second.piece_bytes) == best == (opt2.threshold, _buffers.piece_bytes())
    assert second.key == first.key
    # another model is another key
    other = nn.Sequential(nn.Linear(32, 10, rng=numpy.random.default_rng(0)))
    opt3 = mpidp.DistributedOptimizer(optim.SGD(other.parameters(), lr=0.1), model=other)
    assert tune.cache_key(opt3) != first.key
    opt2.close()
    opt3.close()


def test_cache_file_helpers(tmp_path):
    path = str(tmp_path / "sub" / "t.json")
    assert tune.load_cache(path) == {}
    tune.save_cache("k1", {"fusion_threshold": 1, "piece_bytes": 2}, path)
    tune.save_cache("k2", {"fusion_threshold": 3, "piece_bytes": 4}, path)
    assert tune.load_cache(path) == {"k1": {"fusion_threshold": 1, "piece_bytes": 2},
                                     "k2": {"fusion_threshold": 3, "piece_bytes": 4}}
    open(path, "w").write("{not json")
    assert tune.load_cache(path) == {}
