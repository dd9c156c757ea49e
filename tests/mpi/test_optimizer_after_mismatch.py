"""A MismatchError in a step's gradient exchange leaves the optimizer ready for the next step, on every
rank: no bucket stays in flight (its error raised again by zero_grad, or its result written into the
next backward's buffers), and the next step gives the average, as a step that never failed would."""
import numpy
import pytest

import mpidp
from mpidp import nn, optim
from mpidp.comm import engine as engine_mod, runtime

from test_review6 import build, data, local_grads


def _optimizer(kind, model, overlap):
    inner = optim.SGD(model.parameters(), lr=1.0)
    if kind == "distributed":
        return mpidp.DistributedOptimizer(inner, model=model, overlap=overlap, fusion_threshold_bytes=64)
    return mpidp.ShardedOptimizer(inner, model=model, stage=int(kind[-1]), bucket_bytes=64)


@pytest.mark.parametrize("overlap", [True, False], ids=["overlap", "no overlap"])
@pytest.mark.parametrize("kind", ["distributed", "sharded1", "sharded2"])
def test_a_step_after_a_mismatch_in_the_exchange_gives_the_average(rank, size, kind, overlap):
    if size < 2:
        pytest.skip("needs two ranks")
    if kind != "distributed" and not overlap:
        pytest.skip("one case for the ShardedOptimizer")
    model = build()
    opt = _optimizer(kind, model, overlap)
    crit = nn.CrossEntropyLoss()

    def step():
        opt.zero_grad()
        crit(model(data(rank)[0]), data(rank)[1])
        model.backward(crit.backward())
        opt.step()

    step()  # the plan checked, the buckets built
    eng = engine_mod.engine_for(runtime.get_comm())
    if rank == 1:
        eng.started()  # rank 1 numbers one collective more: every bucket's check differs
    before = [p.data.copy() for p in model.parameters()]
    with pytest.raises(mpidp.MismatchError, match="sequence number differs"):
        step()
    for p, b in zip(model.parameters(), before):
        numpy.testing.assert_array_equal(p.data, b, err_msg="a failed step changed the parameters")
    if rank != 1:
        eng.started()  # back in step
    step()
    reference = build()
    for p, b in zip(reference.parameters(), before):
        p.data[...] = b
    grads = [local_grads(reference, *data(r)) for r in range(size)]
    for i, (p, b) in enumerate(zip(model.parameters(), before)):
        numpy.testing.assert_allclose(p.data, b - sum(g[i] for g in grads) / size, rtol=0, atol=1e-12)
    mpidp.check_replicas(model)
