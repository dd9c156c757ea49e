"""Optimizers against hand-written reference formulas (torch.optim's documented algorithms), clipping, schedules."""
import math
import tracemalloc

import numpy
import pytest

from mpidp import nn, optim
from mpidp.backend import gpu_available
from mpidp.optim import lr_scheduler

SHAPES = [(3, 4), (5,)]


def _params(dtype=numpy.float64, seed=0):
    rng = numpy.random.default_rng(seed)
    return [nn.Parameter(rng.standard_normal(s).astype(dtype)) for s in SHAPES]


def _grads(step, dtype=numpy.float64):
    rng = numpy.random.default_rng(100 + step)
    return [rng.standard_normal(s).astype(dtype) for s in SHAPES]


def ref_sgd(p, grads, lr, momentum=0.0, dampening=0.0, nesterov=False, weight_decay=0.0):
    """torch.optim.SGD, written out."""
    p, buf = p.copy(), None
    for g in grads:
        d = g + weight_decay * p
        if momentum:
            buf = d.copy() if buf is None else momentum * buf + (1 - dampening) * d
            d = d + momentum * buf if nesterov else buf
        p = p - lr * d
    return p, buf


def ref_adam(p, grads, lr, b1, b2, eps, weight_decay=0.0, decoupled=False, amsgrad=False):
    """torch.optim.Adam / AdamW, written out."""
    p, m, v, vmax = p.copy(), 0 * p, 0 * p, 0 * p
    for t, g in enumerate(grads, start=1):
        if decoupled:
            p = p * (1 - lr * weight_decay)
        else:
            g = g + weight_decay * p
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        vhat = v / (1 - b2 ** t)
        if amsgrad:
            vmax = numpy.maximum(vmax, v)
            vhat = vmax / (1 - b2 ** t)
        p = p - lr * (m / (1 - b1 ** t)) / (numpy.sqrt(vhat) + eps)
    return p, m, v


def _run(opt_cls, kw, steps=5, dtype=numpy.float64):
    ps = _params(dtype)
    start = [p.data.copy() for p in ps]
    opt = opt_cls(ps, **kw)
    for s in range(steps):
        for p, g in zip(ps, _grads(s, dtype)):
            p.grad[...] = g
        before = [p.grad.copy() for p in ps]
        opt.step()
        assert all(numpy.array_equal(p.grad, b) for p, b in zip(ps, before)), "step() modified .grad"
    return ps, start, opt


SGD_CASES = [dict(lr=0.1), dict(lr=0.1, momentum=0.9), dict(lr=0.05, momentum=0.8, dampening=0.3),
             dict(lr=0.1, momentum=0.9, nesterov=True), dict(lr=0.1, weight_decay=0.01),
             dict(lr=0.1, momentum=0.9, nesterov=True, weight_decay=0.1),
             dict(lr=0.1, momentum=0.5, dampening=0.5, weight_decay=0.2)]


@pytest.mark.parametrize("kw", SGD_CASES, ids=lambda kw: ",".join(f"{k}={v}" for k, v in kw.items()))
def test_sgd_matches_reference(kw):
    ps, start, opt = _run(optim.SGD, kw)
    for i, (p, p0) in enumerate(zip(ps, start)):
        want, buf = ref_sgd(p0, [_grads(s)[i] for s in range(5)], **kw)
        assert numpy.allclose(p.data, want, rtol=1e-12, atol=1e-12)
        if kw.get("momentum"):
            assert numpy.allclose(opt.state[p]["momentum_buffer"], buf, rtol=1e-12, atol=1e-12)


ADAM_CASES = [(optim.Adam, dict(lr=0.01)), (optim.Adam, dict(lr=0.01, betas=(0.8, 0.99), eps=1e-6)),
              (optim.Adam, dict(lr=0.01, weight_decay=0.1)), (optim.Adam, dict(lr=0.01, amsgrad=True)),
              (optim.AdamW, dict(lr=0.01)), (optim.AdamW, dict(lr=0.02, weight_decay=0.3, amsgrad=True))]


@pytest.mark.parametrize("cls,kw", ADAM_CASES, ids=lambda c: c.__name__ if isinstance(c, type) else str(c))
def test_adam_matches_reference(cls, kw):
    ps, start, opt = _run(cls, kw)
    full = dict(betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01 if cls is optim.AdamW else 0.0, amsgrad=False)
    full.update(kw)
    b1, b2 = full["betas"]
    for i, (p, p0) in enumerate(zip(ps, start)):
        want, m, v = ref_adam(p0, [_grads(s)[i] for s in range(5)], full["lr"], b1, b2, full["eps"],
                              full["weight_decay"], cls is optim.AdamW, full["amsgrad"])
        assert numpy.allclose(p.data, want, rtol=1e-12, atol=1e-12)
        st = opt.state[p]
        assert st["step"] == 5 and numpy.allclose(st["exp_avg"], m) and numpy.allclose(st["exp_avg_sq"], v)


def test_defaults_follow_torch():
    ps = _params()
    assert optim.Adam(ps).defaults == dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, amsgrad=False)
    assert optim.AdamW(ps).defaults["weight_decay"] == 1e-2
    assert optim.SGD(ps, lr=0.1).defaults == dict(lr=0.1, momentum=0.0, dampening=0.0, nesterov=False,
                                                  weight_decay=0.0)


def test_float32_params_track_float64_reference():
    ps, start, _ = _run(optim.Adam, dict(lr=0.01), dtype=numpy.float32)
    want, _, _ = ref_adam(start[0].astype(numpy.float64), [_grads(s)[0] for s in range(5)], 0.01, 0.9, 0.999, 1e-8)
    assert ps[0].dtype == numpy.float32 and numpy.allclose(ps[0].data, want, atol=1e-5)


def test_skips_frozen_and_gradless_params_and_groups_have_own_lr():
    a, b, c = _params() + [nn.Parameter(numpy.ones(2))]
    a0, b0, c0 = a.data.copy(), b.data.copy(), c.data.copy()
    b.requires_grad = False
    c.grad = None
    opt = optim.SGD([{"params": [a, b]}, {"params": [c], "lr": 1.0}], lr=0.5)
    a.grad[...] = 1.0
    b.grad[...] = 1.0
    opt.step()
    assert numpy.allclose(a.data, a0 - 0.5) and numpy.array_equal(b.data, b0) and numpy.array_equal(c.data, c0)
    assert [g["lr"] for g in opt.param_groups] == [0.5, 1.0]
    opt.param_groups[0]["lr"] = 0.25
    opt.step()
    assert numpy.allclose(a.data, a0 - 0.75)
    assert b not in opt.state and c not in opt.state


def test_zero_grad_in_place():
    ps = _params()
    opt = optim.SGD(ps, lr=0.1)
    ids = [id(p.grad) for p in ps]
    for p in ps:
        p.grad[...] = 3.0
    opt.zero_grad()
    assert all(id(p.grad) == i and not p.grad.any() for p, i in zip(ps, ids))


@pytest.mark.parametrize("cls,kw", [(optim.SGD, dict(lr=0.1, momentum=0.9, dampening=0.5)),
                                    (optim.Adam, dict(amsgrad=True))])
def test_init_state_creates_zeros_and_changes_nothing(cls, kw):
    ps, _, lazy = _run(cls, kw, steps=3)
    qs = _params()
    eager = cls(qs, **kw)
    eager.init_state()
    for p in qs:
        st = eager.state[p]
        assert st["step"] == 0 and all(not v.any() for k, v in st.items() if k != "step")
    for s in range(3):
        for p, g in zip(qs, _grads(s)):
            p.grad[...] = g
        eager.step()
    assert all(numpy.array_equal(p.data, q.data) for p, q in zip(ps, qs))


def test_state_dict_round_trip_resumes_exactly():
    ps = _params()
    extra = nn.Parameter(numpy.zeros(3))
    extra.grad = None  # never stepped, so it has no state entry
    opt = optim.Adam([{"params": ps}, {"params": [extra], "lr": 0.1}], lr=0.01)
    for s in range(3):
        for p, g in zip(ps, _grads(s)):
            p.grad[...] = g
        opt.step()
    sd = opt.state_dict()
    assert sorted(sd["state"]) == [0, 1]
    assert [g["params"] for g in sd["param_groups"]] == [[0, 1], [2]]
    assert sd["param_groups"][1]["lr"] == 0.1 and sd["state"][0]["step"] == 3
    copy = [nn.Parameter(p.data.copy()) for p in ps] + [nn.Parameter(extra.data.copy())]
    copy[2].grad = None
    opt2 = optim.Adam([{"params": copy[:2]}, {"params": copy[2:], "lr": 0.5}], lr=0.5)
    opt2.load_state_dict({"state": {k: {kk: (vv.copy() if kk != "step" else vv) for kk, vv in v.items()}
                                    for k, v in sd["state"].items()}, "param_groups": sd["param_groups"]})
    assert opt2.param_groups[0]["lr"] == 0.01 and opt2.param_groups[1]["lr"] == 0.1
    for s in range(3, 5):
        for p, q, g in zip(ps, copy, _grads(s)):
            p.grad[...] = g
            q.grad[...] = g
        opt.step()
        opt2.step()
    assert all(numpy.array_equal(p.data, q.data) for p, q in zip(ps, copy))


def test_load_state_dict_errors_name_what_differs():
    ps = _params()
    opt = optim.SGD(ps, lr=0.1, momentum=0.9)
    opt.init_state()
    sd = opt.state_dict()
    with pytest.raises(ValueError, match="1 param groups but this optimizer has 2"):
        optim.SGD([{"params": ps[:1]}, {"params": ps[1:]}], lr=0.1, momentum=0.9).load_state_dict(sd)
    bad = {"state": {0: {"momentum_buffer": numpy.zeros((4, 3)), "step": 0}}, "param_groups": sd["param_groups"]}
    with pytest.raises(ValueError, match=r"state\[0\]\['momentum_buffer'\].*shape \(4, 3\).*\(3, 4\)"):
        opt.load_state_dict(bad)
    with pytest.raises(ValueError, match=r"keys \['exp_avg'\] but SGD expects \['momentum_buffer', 'step'\]"):
        opt.load_state_dict({"state": {1: {"exp_avg": numpy.zeros(5)}}, "param_groups": sd["param_groups"]})
    with pytest.raises(ValueError, match="parameter index 7"):
        opt.load_state_dict({"state": {7: {}}, "param_groups": sd["param_groups"]})


def test_bad_hyperparameters_and_inputs():
    ps = _params()
    with pytest.raises(ValueError, match="lr must be a finite number >= 0, got -1"):
        optim.SGD(ps, lr=-1)
    with pytest.raises(ValueError, match="Nesterov"):
        optim.SGD(ps, lr=0.1, nesterov=True)
    with pytest.raises(ValueError, match="betas"):
        optim.Adam(ps, betas=(0.9, 1.0))
    with pytest.raises(ValueError, match="empty parameter list"):
        optim.Adam([])
    with pytest.raises(TypeError, match="not an nn.Parameter"):
        optim.Adam([numpy.zeros(3)])
    with pytest.raises(ValueError, match="more than one place"):
        optim.Adam([{"params": ps}, {"params": ps[:1]}])


@pytest.mark.parametrize("cls,kw", [(optim.SGD, dict(lr=0.1, momentum=0.9, nesterov=True, weight_decay=0.1)),
                                    (optim.SGD, dict(lr=0.1, momentum=0.9, dampening=0.1)),
                                    (optim.Adam, dict(weight_decay=0.1, amsgrad=True)), (optim.AdamW, {})])
def test_step_allocates_nothing_after_the_first(cls, kw):
    p = nn.Parameter(numpy.ones((256, 256), dtype=numpy.float32))
    p.grad[...] = 0.5
    opt = cls([p], **kw)
    opt.step()
    opt.step()
    tracemalloc.start()
    opt.step()
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert peak < 16 * 1024, f"a step allocated {peak} bytes for a {p.nbytes}-byte parameter"


def test_clip_grad_norm():
    ps = _params()
    for p, g in zip(ps, _grads(0)):
        p.grad[...] = g
    total = math.sqrt(sum(float((g * g).sum()) for g in _grads(0)))
    ids = [id(p.grad) for p in ps]
    assert abs(optim.clip_grad_norm(ps, 1e9) - total) < 1e-12  # no scaling under the limit
    assert abs(optim.clip_grad_norm(ps, 1.0) - total) < 1e-12
    assert abs(optim.grad_norm(ps) - 1.0) < 1e-5 and [id(p.grad) for p in ps] == ids
    assert abs(optim.grad_norm(ps, math.inf) - max(float(abs(p.grad).max()) for p in ps)) < 1e-15
    one = optim.grad_norm(ps, 1)
    assert abs(one - sum(float(abs(p.grad).sum()) for p in ps)) < 1e-12
    ps[0].grad[0, 0] = numpy.nan
    with pytest.raises(FloatingPointError, match="total gradient norm is nan"):
        optim.clip_grad_norm(ps, 1.0, error_if_nonfinite=True)


def _lrs(sched, n):
    out = []
    for _ in range(n):
        out.append(sched.get_last_lr()[0])
        sched.step()
    return out


def test_schedules_values():
    opt = optim.SGD(_params(), lr=1.0)
    assert numpy.allclose(_lrs(lr_scheduler.LinearWarmup(opt, 4, start_factor=0.2), 6),
                          [0.2, 0.4, 0.6, 0.8, 1.0, 1.0])
    opt = optim.SGD(_params(), lr=1.0)
    assert numpy.allclose(_lrs(lr_scheduler.StepLR(opt, 2, gamma=0.5), 5), [1, 1, 0.5, 0.5, 0.25])
    opt = optim.SGD(_params(), lr=2.0)
    want = [0.5 + 1.5 * (1 + math.cos(math.pi * min(t, 4) / 4)) / 2 for t in range(6)]
    assert numpy.allclose(_lrs(lr_scheduler.CosineAnnealing(opt, 4, eta_min=0.5), 6), want)
    opt = optim.SGD(_params(), lr=1.0)
    got = _lrs(lr_scheduler.warmup_cosine(opt, 2, 6, start_factor=0.5, final_factor=0.1), 8)
    assert numpy.allclose(got[:3], [0.5, 0.75, 1.0]) and numpy.allclose(got[6:], [0.1, 0.1])
    assert opt.param_groups[0]["lr"] == 0.1


def test_schedule_state_round_trip():
    opt = optim.SGD(_params(), lr=1.0)
    a = lr_scheduler.CosineAnnealing(opt, 10)
    for _ in range(3):
        a.step()
    opt2 = optim.SGD(_params(), lr=1.0)
    b = lr_scheduler.CosineAnnealing(opt2, 10)
    b.load_state_dict(a.state_dict())
    assert b.get_last_lr() == a.get_last_lr() == [opt2.param_groups[0]["lr"]]
    a.step(), b.step()
    assert a.get_last_lr() == b.get_last_lr()


@pytest.mark.gpu
@pytest.mark.skipif(not gpu_available(), reason="needs cupy and a CUDA device (none here)")
@pytest.mark.parametrize("cls,kw", [(optim.SGD, dict(lr=0.1, momentum=0.9, nesterov=True, weight_decay=0.1)),
                                    (optim.AdamW, dict(lr=0.01, amsgrad=True))])
def test_gpu_step_matches_cpu(cls, kw):
    import cupy
    ps, _, _ = _run(cls, kw)
    qs = _params()
    for q in qs:
        q._move(cupy)
    opt = cls(qs, **kw)
    for s in range(5):
        for q, g in zip(qs, _grads(s)):
            q.grad[...] = cupy.asarray(g)
        opt.step()
    assert all(numpy.allclose(cupy.asnumpy(q.data), p.data) for p, q in zip(ps, qs))
