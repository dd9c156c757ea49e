"""DistributedSampler maths for every rank of jobs of 1-4 ranks, simulated through rank/size arguments."""
import numpy
import pytest

from mpidp.data import DistributedSampler

SIZES = [1, 2, 3, 4]
COUNTS = [0, 1, 2, 3, 5, 7, 10, 13, 64, 97, 1797]  # n < size, n = 1, primes, a multiple, the digits


def shards(n, size, **kw):
    return [DistributedSampler(n, rank=r, size=size, **kw) for r in range(size)]


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("n", COUNTS)
def test_equal_shares_padded_by_wrapping_cover_everything(n, size):
    samplers = shards(n, size, seed=5)
    parts = [list(s) for s in samplers]
    want = -(-n // size)
    assert all(len(p) == want == len(s) for p, s in zip(parts, samplers))
    merged = numpy.concatenate([numpy.asarray(p, dtype=numpy.int64) for p in parts]) if parts else []
    assert set(merged.tolist()) == set(range(n))
    counts = numpy.bincount(merged, minlength=n) if n else numpy.zeros(0)
    assert counts.sum() == want * size
    # padding repeats the permutation from its start: no index appears more than ceil(size/n) + 1 times
    if n:
        assert counts.max() <= -(-want * size // n)
    if n % size == 0:
        assert (counts == 1).all()  # disjoint when nothing is padded


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("n", COUNTS)
def test_drop_last_gives_disjoint_equal_shards(n, size):
    parts = [list(s) for s in shards(n, size, seed=1, drop_last=True)]
    assert all(len(p) == n // size for p in parts)
    merged = sum(parts, [])
    assert len(set(merged)) == len(merged) == (n // size) * size
    assert set(merged) <= set(range(n))


@pytest.mark.parametrize("size", [2, 3, 4])
def test_every_rank_draws_the_same_permutation_per_epoch(size):
    n = 41
    for epoch in range(3):
        samplers = shards(n, size, seed=9)
        for s in samplers:
            s.set_epoch(epoch)
        perms = [s.global_indices() for s in samplers]
        assert all((p == perms[0]).all() for p in perms)
        # a rank's shard is every size-th entry of the shared permutation
        for r, s in enumerate(samplers):
            assert (s.indices() == perms[0][r::size]).all()
    a, b = DistributedSampler(n, seed=9, rank=0, size=1), DistributedSampler(n, seed=9, rank=0, size=1)
    b.set_epoch(1)
    assert not (a.indices() == b.indices()).all(), "epochs must reshuffle"
    c = DistributedSampler(n, seed=10, rank=0, size=1)
    assert not (a.indices() == c.indices()).all(), "seeds must differ"


def test_no_shuffle_is_in_order_and_pads_from_the_start():
    assert [list(DistributedSampler(10, shuffle=False, rank=r, size=3)) for r in range(3)] == \
        [[0, 3, 6, 9], [1, 4, 7, 0], [2, 5, 8, 1]]
    assert [list(DistributedSampler(1, shuffle=False, rank=r, size=4)) for r in range(4)] == [[0]] * 4


def test_position_resumes_mid_epoch_and_finished_epochs_roll_over():
    full = DistributedSampler(50, seed=2, rank=1, size=3)
    full.set_epoch(4)
    order = list(full)
    s = DistributedSampler(50, seed=2, rank=1, size=3)
    s.set_epoch(4)
    it = iter(s)
    head = [next(it) for _ in range(6)]
    state = s.state_dict()
    assert state["epoch"] == 4 and state["position"] == 6
    resumed = DistributedSampler(50, seed=2, rank=1, size=3)
    resumed.load_state_dict(state)
    resumed.set_epoch(4)  # the resumed loop calls set_epoch(epoch) again: the position stays
    assert head + list(resumed) == order
    # a checkpoint taken after the last index continues with the next epoch
    resumed.load_state_dict({**state, "position": len(resumed)})
    assert (resumed.epoch, resumed.position) == (5, 0)
    # a new epoch starts at 0; iterating a finished epoch again starts it over
    s.set_epoch(5)
    assert s.position == 0
    again = list(s)
    assert again == list(s)


def test_resume_at_a_different_size_keeps_the_global_progress():
    s = DistributedSampler(100, rank=0, size=4)
    s.advance(10)  # 40 samples of the job consumed
    t = DistributedSampler(100, rank=0, size=2)
    t.load_state_dict(s.state_dict())
    assert t.position == 20


def test_state_from_another_data_set_is_refused():
    s = DistributedSampler(100, seed=1, rank=0, size=1)
    with pytest.raises(ValueError, match="n_samples=100.*n_samples=99"):
        DistributedSampler(99, seed=1, rank=0, size=1).load_state_dict(s.state_dict())
    with pytest.raises(ValueError, match="seed"):
        DistributedSampler(100, seed=2, rank=0, size=1).load_state_dict(s.state_dict())


@pytest.mark.parametrize("kw, match", [
    (dict(n_samples=-1), "n_samples"), (dict(n_samples=5, seed=-1), "seed"),
    (dict(n_samples=5, rank=2, size=2), "rank 2"), (dict(n_samples=5, rank=0, size=0), "size 0"),
])
def test_bad_arguments(kw, match):
    with pytest.raises(ValueError, match=match):
        DistributedSampler(**kw)


def test_defaults_come_from_the_runtime_or_one_rank():
    import sys
    runtime = sys.modules.get("mpidp.comm.runtime")
    want = (runtime.rank(), runtime.size()) if runtime and runtime.is_initialized() else (0, 1)
    s = DistributedSampler(7)
    assert (s.rank, s.size) == want
