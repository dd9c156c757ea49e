"""Concurrency torture: a thousand mixed collectives under random delays, every result against NumPy.

Every rank issues the same program (one seed): blocking, async and grouped collectives on the
whole job and on overlapping process sets, checks from the caller's thread while work is queued,
and object collectives. What differs per rank is timing: random sleeps where callers submit and
wait and where the engine threads pick up work (``engine.test_delay_s``), callers that sleep
between calls, and the order in which each rank waits for its outstanding handles.
"""
import random
import time

import numpy
import pytest

import mpidp
from mpidp.comm import check, engine as engine_mod, runtime

OPS = 3000
SEED = 1234
MAX_OUTSTANDING = 6


def contribution(i, r, shape, dtype):
    """Rank r's data for operation i: small integers, exact in every dtype."""
    rng = numpy.random.default_rng([SEED, i, r])
    return rng.integers(-4, 5, size=shape).astype(dtype)


class Program:
    def __init__(self, rank, size):
        self.rank, self.size = rank, size
        self.plan = None  # what is issued: one generator per operation, equal on every rank
        self.timing = random.Random(SEED * 7919 + rank)  # when: different on every rank
        self.pairs = [mpidp.ProcessSet({k, (k + 1) % size}) for k in range(size)]
        self.evens = mpidp.ProcessSet(range(0, size, 2))
        self.pending = []  # (handle, check) of outstanding async collectives
        self.counts = {}

    def pick_set(self):
        choice = self.plan.random()
        if choice < 0.6:
            return None, list(range(self.size))
        ps = self.plan.choice(self.pairs + [self.evens])
        return ps, ps.ranks

    def one(self, i):
        self.plan = random.Random(SEED * 1000003 + i)  # ranks outside a set draw no fewer numbers later
        kind = self.plan.choice(["allreduce", "allreduce", "allreduce_", "grouped", "allgather",
                                 "broadcast", "alltoall", "reducescatter", "barrier", "object", "agree"])
        ps, members = self.pick_set()
        mode = self.plan.choice(["blocking", "async", "async"])
        big = self.plan.random() < 0.03  # now and then a message that goes around the ring
        if self.rank not in members:
            return  # the other members run it; this rank's program order on that set is unchanged
        self.counts[kind] = self.counts.get(kind, 0) + 1
        getattr(self, "_" + kind)(i, ps, members, mode, big)
        if self.timing.random() < 0.3:
            time.sleep(self.timing.random() * 0.002)
        while len(self.pending) > MAX_OUTSTANDING or (self.pending and self.timing.random() < 0.25):
            self.settle(self.pending.pop(self.timing.randrange(len(self.pending))))

    def settle(self, item):
        handle, verify = item
        verify(handle.wait())

    def finish(self):
        self.timing.shuffle(self.pending)
        for item in self.pending:
            self.settle(item)
        self.pending = []

    def launch(self, mode, start, verify):
        if mode == "blocking":
            verify(start(False))
        else:
            self.pending.append((start(True), verify))

    # --- the operations ---------------------------------------------------------------------

    def _allreduce(self, i, ps, members, mode, big, inplace=False):
        op = self.plan.choice([mpidp.Sum, mpidp.Average, mpidp.Max, mpidp.Min])
        dtype = self.plan.choice(["float32", "float64"])
        shape = (self.size * 40000,) if big else (self.plan.randint(0, 40),)
        parts = numpy.stack([contribution(i, r, shape, dtype) for r in members])
        expect = {mpidp.Sum: parts.sum(0), mpidp.Average: parts.mean(0), mpidp.Max: parts.max(0),
                  mpidp.Min: parts.min(0)}[op]
        x = contribution(i, self.rank, shape, dtype)

        def start(asynchronous):
            name = None if self.plan.random() < 0.5 else f"t{i}"
            if inplace:
                call = mpidp.allreduce_async_ if asynchronous else mpidp.allreduce_
            else:
                call = mpidp.allreduce_async if asynchronous else mpidp.allreduce
            return call(x, op=op, name=name, process_set=ps)

        def verify(out):
            numpy.testing.assert_allclose(out, expect, rtol=1e-6, err_msg=f"op {i} allreduce {op}")
            if inplace:
                assert out is x

        self.launch(mode, start, verify)

    def _allreduce_(self, i, ps, members, mode, big):
        self._allreduce(i, ps, members, mode, big, inplace=True)

    def _grouped(self, i, ps, members, mode, big):
        shapes = [(self.plan.randint(0, 9),) for _ in range(self.plan.randint(1, 6))]
        dtypes = [self.plan.choice(["float32", "float64"]) for _ in shapes]
        xs = [contribution(i * 10 + k, self.rank, s, d) for k, (s, d) in enumerate(zip(shapes, dtypes))]
        expect = [sum(contribution(i * 10 + k, r, s, d) for r in members)
                  for k, (s, d) in enumerate(zip(shapes, dtypes))]

        def start(asynchronous):
            if asynchronous:
                return mpidp.grouped_allreduce_async(xs, op=mpidp.Sum, process_set=ps)
            return mpidp.grouped_allreduce(xs, op=mpidp.Sum, process_set=ps)

        def verify(outs):
            for out, e in zip(outs, expect):
                numpy.testing.assert_array_equal(out, e, err_msg=f"op {i} grouped")

        self.launch(mode, start, verify)

    def _allgather(self, i, ps, members, mode, big):
        rows = {r: (i + r) % 4 for r in members}
        x = contribution(i, self.rank, (rows[self.rank], 3), "float64")
        expect = numpy.concatenate([contribution(i, r, (rows[r], 3), "float64") for r in members])

        def start(asynchronous):
            return (mpidp.allgather_async if asynchronous else mpidp.allgather)(x, process_set=ps)

        self.launch(mode, start, lambda out: numpy.testing.assert_array_equal(out, expect))

    def _broadcast(self, i, ps, members, mode, big):
        root = self.plan.choice(members)
        x = contribution(i, self.rank, (7,), "float32")
        expect = contribution(i, root, (7,), "float32")

        def start(asynchronous):
            return (mpidp.broadcast_async if asynchronous else mpidp.broadcast)(x, root, process_set=ps)

        self.launch(mode, start, lambda out: numpy.testing.assert_array_equal(out, expect))

    def _alltoall(self, i, ps, members, mode, big):
        n = len(members)
        splits = {r: [(i + r + k) % 3 for k in range(n)] for r in members}
        me = members.index(self.rank)
        x = contribution(i, self.rank, (sum(splits[self.rank]), 2), "float64")
        pieces = []
        for r in members:  # what rank r sends to this rank: its rows for position ``me``
            s = splits[r]
            rows = contribution(i, r, (sum(s), 2), "float64")
            pieces.append(rows[sum(s[:me]):sum(s[:me + 1])])
        expect = numpy.concatenate(pieces)

        def start(asynchronous):
            return (mpidp.alltoall_async if asynchronous else mpidp.alltoall)(x, splits[self.rank],
                                                                              process_set=ps)

        def verify(result):
            out, received = result
            numpy.testing.assert_array_equal(out, expect)
            assert received.tolist() == [splits[r][me] for r in members]

        self.launch(mode, start, verify)

    def _reducescatter(self, i, ps, members, mode, big):
        n = len(members)
        rows = n * 40000 // 4 if big else self.plan.randint(n, 3 * n)
        parts = sum(contribution(i, r, (rows, 4), "float64") for r in members)
        base, extra = divmod(rows, n)
        me = members.index(self.rank)
        lo = me * base + min(me, extra)
        expect = parts[lo:lo + base + (me < extra)]
        x = contribution(i, self.rank, (rows, 4), "float64")

        def start(asynchronous):
            call = mpidp.reducescatter_async if asynchronous else mpidp.reducescatter
            return call(x, op=mpidp.Sum, process_set=ps)

        self.launch(mode, start, lambda out: numpy.testing.assert_array_equal(out, expect))

    def _barrier(self, i, ps, members, mode, big):
        mpidp.barrier(process_set=ps)

    def _object(self, i, ps, members, mode, big):
        got = mpidp.allgather_object({"op": i, "rank": self.rank}, process_set=ps)
        assert got == [{"op": i, "rank": r} for r in members]

    def _agree(self, i, ps, members, mode, big):
        # a plan check from the caller's thread while async work is queued on the communicator
        comm = runtime.get_comm() if ps is None else ps.comm
        check.agree(comm, "plan", f"plan{i}", (("op", i),))


def test_torture(rank, size):
    engine_mod.test_delay_s = 0.001
    try:
        program = Program(rank, size)
        start = time.monotonic()
        for i in range(OPS):
            program.one(i)
        program.finish()
        seconds = time.monotonic() - start
    finally:
        engine_mod.test_delay_s = 0.0
    # every rank ran the same program: the same counts of each kind on the whole job
    assert len(set(map(repr, mpidp.allgather_object(sorted(program.counts))))) == 1
    print(f"rank {rank}: {OPS} operations in {seconds:.1f} s: {program.counts}")


@pytest.fixture(autouse=True)
def _no_leftover_delay():
    yield
    engine_mod.test_delay_s = 0.0
