"""Work on a process set numbers collectives on that set only: ranks outside the set must not see
the job-wide numbering move, or the next collective of all ranks raises a bogus MismatchError."""
import numpy
import pytest

import mpidp
from mpidp import nn, optim


def _members(size):
    return list(range(size - 1))  # every rank but the last: a set some ranks are not in


def _global_sum_still_agrees(rank, size):
    got = mpidp.allreduce(numpy.array([rank + 1.0]), op=mpidp.Sum, name="after the set")
    numpy.testing.assert_allclose(got, [size * (size + 1) / 2])


@pytest.mark.mpi(min_size=3)
def test_grouped_collectives_on_a_set_leave_the_job_numbering_alone(rank, size):
    ps = mpidp.add_process_set(_members(size))
    try:
        if ps.included():
            parts = [numpy.full((2, 3), float(rank)), numpy.arange(4.0) + rank]
            gathered = mpidp.grouped_allgather(parts, process_set=ps)
            numpy.testing.assert_allclose(gathered[0], numpy.repeat(numpy.arange(size - 1.0), 2)[:, None] * numpy.ones(3))
            scattered = mpidp.grouped_reducescatter([numpy.ones((size - 1, 2)) * (rank + 1)], op=mpidp.Sum,
                                                    process_set=ps)
            numpy.testing.assert_allclose(scattered[0], numpy.full((1, 2), (size - 1) * size / 2))
        _global_sum_still_agrees(rank, size)
    finally:
        mpidp.remove_process_set(ps)


@pytest.mark.mpi(min_size=3)
@pytest.mark.parametrize("sharded", [False, True])
def test_optimizer_on_a_set_checks_its_plan_on_the_set_only(rank, size, sharded):
    ps = mpidp.add_process_set(_members(size))
    try:
        if ps.included():
            numpy.random.seed(0)
            model = nn.Sequential(nn.Linear(4, 3))
            inner = optim.SGD(model.parameters(), lr=0.1)
            opt = (mpidp.ShardedOptimizer(inner, model=model, process_set=ps) if sharded else
                   mpidp.DistributedOptimizer(inner, model=model, process_set=ps))
            x = numpy.full((2, 4), rank + 1.0)
            opt.zero_grad()
            model.backward(model(x) * 0 + 1.0)
            opt.step()  # the first step checks the plan across the set's ranks
            opt.close() if hasattr(opt, "close") else None
        _global_sum_still_agrees(rank, size)
    finally:
        mpidp.remove_process_set(ps)
