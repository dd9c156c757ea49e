"""MPIDP_AUTOTUNE=1: the first step measures bucket and piece size on the real gradients, once."""
import numpy

import mpidp
from mpidp import nn, optim
from mpidp.comm import _buffers


def test_autotune_first_step_keeps_results_and_order(rank, size, monkeypatch, tmp_path):
    monkeypatch.setenv("MPIDP_AUTOTUNE", "1")
    monkeypatch.setenv("MPIDP_AUTOTUNE_CACHE", str(tmp_path / f"tune{rank}.json"))
    old_piece = _buffers.piece_bytes()
    rng = numpy.random.default_rng(0)
    model = nn.Sequential(nn.Linear(20, 64, dtype=numpy.float64), nn.Tanh(), nn.Linear(64, 3, dtype=numpy.float64))
    for p in model.parameters():
        p.data[...] = rng.standard_normal(p.shape) * 0.3
    ref = nn.Sequential(nn.Linear(20, 64, dtype=numpy.float64), nn.Tanh(), nn.Linear(64, 3, dtype=numpy.float64))
    ref.load_state_dict(model.state_dict())
    opt = mpidp.DistributedOptimizer(optim.SGD(model.parameters(), lr=0.1), model=model)
    ref_opt = optim.SGD(ref.parameters(), lr=0.1)
    crit = nn.CrossEntropyLoss()
    try:
        for step in range(3):
            x = numpy.random.default_rng(step).standard_normal((4 * size, 20))
            y = numpy.arange(4 * size) % 3
            opt.zero_grad()
            crit(model(x[4 * rank:4 * rank + 4]), y[4 * rank:4 * rank + 4])
            model.backward(crit.backward())
            opt.step()
            ref.zero_grad()
            crit(ref(x), y)
            ref.backward(crit.backward())
            ref_opt.step()
            assert not opt._autotune_pending  # measured once, in the first step
        for p, q in zip(model.parameters(), ref.parameters()):  # tuning never changed the result
            numpy.testing.assert_allclose(p.data, q.data, atol=1e-12)
        mpidp.check_replicas(model)
        thresholds = mpidp.allgather_object(opt.threshold)
        assert len(set(thresholds)) == 1  # every rank applied the same decision
    finally:
        _buffers.set_piece_bytes(old_piece)
