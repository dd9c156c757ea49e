"""Review 8: the lead's amp masters change (b081093) against the DistributedOptimizer's own flow."""
import numpy
import pytest

import mpidp
from mpidp import amp, nn, optim

from test_review6 import B, C, D, build


@pytest.mark.parametrize("sharded", [False, True], ids=["distributed", "sharded"])
def test_mixed_precision_follows_weights_the_root_loads_after_the_optimizer_state(rank, size, sharded):
    """Rank 0 loads weights (pretrained, or a model-only checkpoint) after broadcast_optimizer_state, then
    broadcast_parameters: the first step (lr=0) must keep them, as the sharded optimizer's masters now do."""
    model = build(seed=1, dtype=numpy.float32)
    mp = amp.MixedPrecision(model, optim.SGD(model.parameters(), lr=0.0), dtype="float16", init_scale=8.0)
    opt = (mpidp.ShardedOptimizer(mp, model=model, bucket_bytes=64) if sharded
           else mpidp.DistributedOptimizer(mp, model=model))
    mpidp.broadcast_optimizer_state(opt, root_rank=0)
    if rank == 0:  # the weights to train from, loaded on the root alone
        for p in model.parameters():
            p.data[...] = (numpy.arange(p.size).reshape(p.shape) % 7 * 0.125).astype(p.dtype)
    mpidp.broadcast_parameters(model, root_rank=0)
    loaded = [p.data.copy() for p in model.parameters()]
    crit = nn.CrossEntropyLoss()
    opt.zero_grad()
    rng = numpy.random.default_rng(rank)
    crit(model(rng.standard_normal((B, D)).astype(numpy.float16)), rng.integers(0, C, B))
    model.backward(crit.backward(mp.loss_scale))
    opt.step()
    for (name, p), want in zip(model.named_parameters(), loaded):
        numpy.testing.assert_array_equal(p.data, want, err_msg=f"{name}: the weights broadcast were lost")
