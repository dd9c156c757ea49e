"""Module/Parameter contracts: registration and names, in-place grads, hooks, state, devices, RNG state."""
import numpy
import pytest

from mpidp import nn

f64 = numpy.float64


def _mlp():
    return nn.Sequential(nn.Linear(4, 5, dtype=f64, rng=0), nn.ReLU(), nn.Linear(5, 3, dtype=f64, rng=1))


def _x(*shape, seed=0):
    return numpy.random.default_rng(seed).standard_normal(shape)


class Twice(nn.Module):
    """Applies the same Linear twice: its parameters have two uses per forward."""

    def __init__(self):
        super().__init__()
        self.inner = nn.Linear(3, 3, dtype=f64, rng=0)
        self.out = nn.Linear(3, 2, dtype=f64, rng=1)

    def forward(self, x):
        return self.out(self.inner(self.inner(x)))

    def _backward(self, dy):
        return self.inner.backward(self.inner.backward(self.out.backward(dy)))


class Tied(nn.Module):
    """Embedding and output projection share one weight (registered in both modules)."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(6, 4, dtype=f64, rng=0)
        self.mid = nn.Linear(4, 4, dtype=f64, rng=1)
        self.head = nn.Linear(4, 6, bias=False, dtype=f64)
        self.head.weight = self.embed.weight

    def forward(self, ids):
        return self.head(self.mid(self.embed(ids)))

    def _backward(self, dy):
        return self.embed.backward(self.mid.backward(self.head.backward(dy)))


def test_names_order_and_dedup():
    m = nn.Sequential(_mlp(), nn.Linear(3, 2))
    names = [n for n, _ in m.named_parameters()]
    assert names == ["0.0.weight", "0.0.bias", "0.2.weight", "0.2.bias", "1.weight", "1.bias"]
    assert [p.name for p in m.parameters()] == names
    assert [n for n, _ in m.named_modules()] == ["", "0", "0.0", "0.1", "0.2", "1"]
    assert [type(c).__name__ for c in m.children()] == ["Sequential", "Linear"]
    t = Tied()
    assert [n for n, _ in t.named_parameters()] == ["embed.weight", "mid.weight", "mid.bias"]
    assert t.head.weight.name == "embed.weight" and t.num_parameters() == 24 + 20
    assert list(t.state_dict()) == ["embed.weight", "mid.weight", "mid.bias"]


def test_parameter_basics_and_grad_setter():
    p = nn.Parameter(numpy.ones((2, 3), numpy.float32), name="w")
    assert p.shape == (2, 3) and p.dtype == numpy.float32 and p.size == 6 and p.nbytes == 24
    assert p.grad.shape == (2, 3) and p.grad.dtype == numpy.float32 and not p.grad.any()
    p.grad = numpy.full((2, 3), 2, numpy.float32)
    with pytest.raises(ValueError, match=r"'w' is \(2, 3\) float32 but the new grad is \(3, 2\) float32"):
        p.grad = numpy.zeros((3, 2), numpy.float32)
    with pytest.raises(ValueError, match="float64"):
        p.grad = numpy.zeros((2, 3))


def test_grads_accumulate_in_place_into_external_views():
    m = _mlp()
    flat = numpy.zeros(m.num_parameters())
    off = 0
    for p in m.parameters():  # what a fusion bucket does
        p.grad = flat[off:off + p.size].reshape(p.shape)
        off += p.size
    x, dy = _x(2, 4), _x(2, 3, seed=1)
    m(x)
    m.backward(dy)
    once = flat.copy()
    assert once.any()
    m(x)
    m.backward(dy)
    assert numpy.allclose(flat, 2 * once)
    ids = [id(p.grad) for p in m.parameters()]
    m.zero_grad()
    assert not flat.any() and [id(p.grad) for p in m.parameters()] == ids


def _record(params):
    order = []
    handles = [p.register_hook(lambda q: order.append(q.name)) for p in params]
    return order, handles


def test_hooks_fire_once_in_backward_order_as_soon_as_ready():
    m = _mlp()
    events = []
    for p in m.parameters():
        p.register_hook(lambda q: events.append(("grad", q.name)))
    for name, mod in m.named_modules():
        mod.register_backward_hook(lambda mod, dx, name=name: events.append(("bwd", name)))
    m(_x(2, 4))
    m.backward(_x(2, 3))
    assert events == [("grad", "2.weight"), ("grad", "2.bias"), ("bwd", "2"), ("bwd", "1"),
                      ("grad", "0.weight"), ("grad", "0.bias"), ("bwd", "0"), ("bwd", "")]


def test_hook_after_last_use_for_module_called_twice():
    m = Twice()
    seen = {}
    m.inner.weight.register_hook(lambda p: seen.setdefault("inner", p.grad.copy()))
    order, _ = _record(m.parameters())
    x, dy = _x(2, 3), _x(2, 2, seed=1)
    m(x)
    m.backward(dy)
    assert order == ["out.weight", "out.bias", "inner.weight", "inner.bias"]
    assert numpy.array_equal(seen["inner"], m.inner.weight.grad)  # complete when fired
    h = 1e-6  # and the stacked caches give the right gradient for two uses
    w = m.inner.weight.data
    w[0, 1] += h
    fp = float((m(x) * dy).sum())
    w[0, 1] -= 2 * h
    fm = float((m(x) * dy).sum())
    w[0, 1] += h
    assert abs((fp - fm) / (2 * h) - m.inner.weight.grad[0, 1]) < 1e-6


def test_tied_weight_fires_after_its_last_use():
    m = Tied()
    order, _ = _record(m.parameters())
    m(numpy.array([[1, 2, 2]]))
    m.backward(_x(1, 3, 6))
    assert order == ["mid.weight", "mid.bias", "embed.weight"]


def test_unused_and_frozen_parameters_fire_nothing():
    m = Twice()
    m.unused = nn.Linear(2, 2)  # registered, never called
    m.inner.weight.requires_grad = False
    order, _ = _record(m.parameters())
    m(_x(2, 3))
    m.backward(_x(2, 2))
    assert order == ["out.weight", "out.bias", "inner.bias"]
    assert not m.inner.weight.grad.any() and not m.unused.weight.grad.any() and m.inner.bias.grad.any()


def test_forward_without_backward_does_not_break_next_pass():
    m = _mlp()
    order, handles = _record(m.parameters())
    m(_x(2, 4))  # e.g. an evaluation forward in training mode
    with nn.no_grad():
        m(_x(2, 4))
    assert m.activation_bytes() > 0
    m(_x(2, 4))
    m.backward(_x(2, 3))
    assert order == ["2.weight", "2.bias", "0.weight", "0.bias"]
    handles[0].remove()
    order.clear()
    m(_x(2, 4))
    m.backward(_x(2, 3))
    assert order == ["2.weight", "2.bias", "0.bias"]


def test_no_grad_keeps_nothing():
    m = _mlp()
    with nn.no_grad():
        assert not nn.is_grad_enabled()
        m(_x(2, 4))
    assert nn.is_grad_enabled() and m.activation_bytes() == 0
    with pytest.raises(nn.module.MpidpError, match="no forward left"):
        m.backward(_x(2, 3))


def test_module_hooks_run_around_every_module_and_can_be_removed():
    m = _mlp()
    log = []
    handles = []
    for name, mod in m.named_modules():
        handles += [mod.register_forward_pre_hook(lambda mod, x, n=name: log.append(("pre", n))),
                    mod.register_forward_hook(lambda mod, x, y, n=name: log.append(("fwd", n))),
                    mod.register_backward_pre_hook(lambda mod, dy, n=name: log.append(("bpre", n))),
                    mod.register_backward_hook(lambda mod, dx, n=name: log.append(("bwd", n)))]
    m(_x(2, 4))
    m.backward(_x(2, 3))
    assert log[:8] == [("pre", ""), ("pre", "0"), ("fwd", "0"), ("pre", "1"), ("fwd", "1"), ("pre", "2"),
                       ("fwd", "2"), ("fwd", "")]
    assert log[8:] == [("bpre", ""), ("bpre", "2"), ("bwd", "2"), ("bpre", "1"), ("bwd", "1"), ("bpre", "0"),
                       ("bwd", "0"), ("bwd", "")]
    for h in handles:
        h.remove()
    log.clear()
    m(_x(2, 4))
    assert log == []


def test_hooks_may_replace_values():
    lin = nn.Linear(2, 2, dtype=f64)
    lin.register_forward_pre_hook(lambda mod, x: x * 0)
    lin.register_forward_hook(lambda mod, x, y: y + 1)
    assert numpy.allclose(lin(numpy.ones((1, 2))), lin.bias.data + 1)


def test_state_dict_round_trip_and_errors():
    a, b = _mlp(), nn.Sequential(nn.Linear(4, 5, dtype=f64, rng=7), nn.ReLU(), nn.Linear(5, 3, dtype=f64, rng=8))
    ids = [id(p.data) for p in b.parameters()]
    b.load_state_dict({k: v.copy() for k, v in a.state_dict().items()})
    assert all(numpy.array_equal(p.data, q.data) for p, q in zip(a.parameters(), b.parameters()))
    assert [id(p.data) for p in b.parameters()] == ids  # copied in place
    sd = dict(a.state_dict())
    sd["2.weight"] = numpy.zeros((2, 5))
    with pytest.raises(ValueError, match=r"'2.weight'.*\(2, 5\).*\(3, 5\)"):
        b.load_state_dict(sd)
    del sd["2.weight"]
    sd["extra"] = numpy.zeros(1)
    with pytest.raises(KeyError, match=r"missing keys \['2.weight'\], unexpected keys \['extra'\]"):
        b.load_state_dict(sd)
    missing, unexpected = b.load_state_dict(sd, strict=False)
    assert missing == ["2.weight"] and unexpected == ["extra"]


def test_to_keeps_identity_and_casts():
    m = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    params = list(m.parameters())
    m.to("cpu", dtype=numpy.float16)
    assert list(m.parameters()) == params and all(p.dtype == numpy.float16 == p.grad.dtype for p in params)
    assert m[1].running_mean.dtype == numpy.float16 and m[1].num_batches_tracked.dtype == numpy.int64
    assert m.state_dict()["1.running_var"] is m[1].running_var
    with pytest.raises(ValueError, match="unknown array module or device"):
        m.to("tpu")


def test_train_eval_and_requires_grad():
    m = nn.Sequential(nn.Linear(2, 2), nn.Dropout(0.5))
    assert m.eval() is m and not any(x.training for x in m.modules())
    assert all(x.training for x in m.train().modules())
    m.requires_grad_(False)
    assert not any(p.requires_grad for p in m.parameters())


def test_rng_state_covers_every_dropout():
    nn.manual_seed(0)
    m = nn.Sequential(nn.Dropout(0.5), nn.Linear(8, 8), nn.Sequential(nn.Dropout(0.2)))
    state = m.rng_state()
    assert sorted(state) == ["0", "2.0"]
    x = numpy.ones((4, 8), numpy.float32)
    y = m(x)
    m.set_rng_state(state)
    assert numpy.array_equal(m(x), y)
    with pytest.raises(KeyError, match="no RNG state for module '2.0'"):
        m.set_rng_state({"0": state["0"]})


def test_setattr_errors():
    class Bad(nn.Module):
        def __init__(self):
            self.w = nn.Parameter(numpy.zeros(2))
    with pytest.raises(AttributeError, match="call super"):
        Bad()
    m = nn.Linear(2, 2)
    with pytest.raises(TypeError, match="'weight' is a parameter of Linear"):
        m.weight = numpy.zeros((2, 2))
    with pytest.raises(TypeError, match="argument 1 is a int"):
        nn.Sequential(nn.ReLU(), 3)


def test_containers():
    s = nn.Sequential(nn.Linear(2, 3)).append(nn.Identity())
    assert len(s) == 2 and isinstance(s[-1], nn.Identity) and [type(m).__name__ for m in s] == ["Linear", "Identity"]
    lst = nn.ModuleList([nn.Linear(2, 2), nn.Linear(2, 2)])
    assert len(lst) == 2 and [n for n, _ in lst.named_parameters()] == ["0.weight", "0.bias", "1.weight", "1.bias"]
    s(_x(3, 2).astype(numpy.float32))
    dy = numpy.ones((3, 3), numpy.float32)
    assert numpy.array_equal(s.backward(dy), dy @ s[0].weight.data)
