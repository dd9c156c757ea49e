"""The hierarchical allreduce on fake nodes (one host's ranks split into 'nodes', even and uneven)
against NumPy, and bit-identical on every rank."""
import numpy
import pytest
from mpi4py import MPI

import mpidp
from mpidp.comm import _buffers, _hierarchical, collectives, engine as engine_mod, runtime
from mpidp.comm.ops import as_op, mpi_op

from conftest import FLOATS, data, tol


def layouts(size):
    """Node of each rank: one node, one node per rank, blocks of two (2+1 at 3 ranks), round robin
    over two nodes (interleaved placement), and all but the last rank on one node (3+1 at 4)."""
    out = {"one_node": [0] * size, "one_per_node": list(range(size)),
           "blocks_of_2": [r // 2 for r in range(size)], "round_robin": [r % 2 for r in range(size)],
           "all_but_last": [int(r == size - 1) for r in range(size)]}
    return {k: v for k, v in out.items() if list(out.values()).index(v) == list(out).index(k)}  # no repeats


LAYOUTS = ["one_node", "one_per_node", "blocks_of_2", "round_robin", "all_but_last"]


@pytest.fixture(params=LAYOUTS)
def topo(request):
    comm = runtime.get_comm()
    nodes = layouts(comm.Get_size()).get(request.param)
    if nodes is None:
        pytest.skip(f"layout {request.param} repeats another at {comm.Get_size()} ranks")
    local = comm.Split(nodes[comm.Get_rank()], comm.Get_rank())
    t = _hierarchical.Topology(comm, local)
    yield t
    t.free()
    local.Free()


@pytest.fixture(params=[4 << 10, 2 << 20], ids=["piece4KiB", "piece2MiB"])
def piece(request, monkeypatch):
    """Small pieces and shares: many pipelined chunks and ring steps; large: one chunk."""
    old = _buffers.piece_bytes()
    _buffers.set_piece_bytes(request.param)
    monkeypatch.setattr(_hierarchical, "SHARE_BYTES", request.param)
    yield request.param
    _buffers.set_piece_bytes(old)


def test_topology(topo):
    comm = topo.comm
    nodes = comm.allgather(topo.node)
    assert sum(topo.node_sizes) == comm.Get_size() and topo.nodes == len(set(nodes))
    assert topo.node_sizes[topo.node] == topo.local.Get_size()
    assert topo.channels == max(topo.node_sizes)
    owners = topo.local.allgather(topo.owned)  # every channel has exactly one owner per node
    assert sorted(c for o in owners for c in o) == list(range(topo.channels))
    assert len(topo.channel_comms) == (len(topo.owned) if topo.nodes > 1 else 0)
    for cc in topo.channel_comms:
        assert cc.Get_size() == topo.nodes


@pytest.mark.parametrize("n", [0, 5, 1031, 100_003])
@pytest.mark.parametrize("dtype", ["float16", "float32", "float64", "int64"])  # 16-bit: mpidp's own MPI op
@pytest.mark.parametrize("op", ["Sum", "Min", "Max", "Product"])
def test_allreduce_matches_numpy(topo, piece, n, dtype, op):
    if op == "Product" and dtype in FLOATS and numpy.dtype(dtype).itemsize == 2:
        pytest.skip("products of many small integers overflow 16-bit floats")
    comm = topo.comm
    size, rank = comm.Get_size(), comm.Get_rank()
    arrays = [data((n,), dtype, 77 * r + n) for r in range(size)]
    stack = numpy.stack([a.astype(numpy.float64) for a in arrays])
    want = {"Sum": stack.sum(0), "Min": stack.min(0), "Max": stack.max(0), "Product": stack.prod(0)}[op]
    o = as_op(getattr(mpidp, op))
    out = numpy.empty(n, dtype)
    assert _hierarchical.allreduce(topo, arrays[rank], out, mpi_op(o, out.dtype), o.ufunc)
    numpy.testing.assert_allclose(out.astype(numpy.float64), want, rtol=tol(dtype), atol=tol(dtype))
    inplace = arrays[rank].copy()
    _hierarchical.allreduce(topo, None, inplace, mpi_op(o, out.dtype), o.ufunc, factor=1.0)
    numpy.testing.assert_array_equal(inplace.view(numpy.uint8), out.view(numpy.uint8))


def _noisy(seed, n, dtype):
    g = numpy.random.default_rng(seed)
    return (g.standard_normal(n) * 10 ** g.uniform(-3, 3, n)).astype(dtype)


@pytest.mark.parametrize("dtype", ["float32", "float64", "float16"])
def test_bit_identical_on_every_rank(topo, piece, dtype):
    """Random floats of mixed magnitudes (sums depend on the order): every rank ends with the same bits.

    The 2 MiB case runs at 256 KiB pieces and shares: the same paths (a node reduce-scatters each
    chunk around the ring, in as many pieces per part, where 4 KiB goes through MPI
    Reduce_scatter), the same number of chunks, at 1/8 of the bytes.
    """
    comm = topo.comm
    size = comm.Get_size()
    scaled = min(piece, 256 << 10)
    _buffers.set_piece_bytes(scaled)  # the piece fixture restores both
    _hierarchical.SHARE_BYTES = scaled
    chunk = _hierarchical.chunk_elements(topo, numpy.dtype(dtype).itemsize)
    in_node = topo.local.Get_size()
    assert _buffers.uses_ring(numpy.empty(chunk, dtype), in_node, numpy.add) == (in_node > 1 and piece == 2 << 20)
    n = 3 * (scaled // 4) * topo.channels + 17  # several chunks, not a multiple of anything
    x = _noisy(comm.Get_rank(), n, dtype)
    o = as_op(mpidp.Sum)
    _hierarchical.allreduce(topo, None, x, mpi_op(o, x.dtype), o.ufunc, factor=1.0 / size)
    everyone = numpy.empty((size, x.nbytes), numpy.uint8)
    comm.Allgather(x.view(numpy.uint8), everyone)
    assert (everyone == everyone[0]).all(), "ranks differ in the bits of the result"
    inputs = numpy.stack([_noisy(r, n, dtype).astype(numpy.float64) for r in range(size)])
    bound = 2 * tol(dtype) * numpy.abs(inputs).max(0) + tol(dtype)
    assert (numpy.abs(x.astype(numpy.float64) - inputs.mean(0)) <= bound).all(), "the average is off"


def test_average_factor_is_applied(topo):
    comm = topo.comm
    x = numpy.full(1000, float(comm.Get_rank() + 1), numpy.float64)
    o = as_op(mpidp.Sum)
    _hierarchical.allreduce(topo, None, x, mpi_op(o, x.dtype), o.ufunc, factor=0.5)
    n = comm.Get_size()
    numpy.testing.assert_array_equal(x, numpy.full(1000, 0.5 * n * (n + 1) / 2))



# --- the hook: mpidp's own collectives on fake nodes --------------------------------------------

@pytest.fixture
def hooked(topo, monkeypatch):
    """mpidp's collectives see ``topo`` as the job's topology and take the hierarchical path at every size."""
    if topo.nodes == 1 or topo.channels == 1:
        pytest.skip(f"layout {topo.describe()} has no hierarchical path")
    # (cached allreduce plans must follow the swap: test_cached_plan_follows_a_new_crossover)
    monkeypatch.setattr(runtime._state, "topology", topo)
    old = topo.set_from(0)
    yield topo
    topo.set_from(old)


@pytest.mark.parametrize("n", [1, 7, 1031, 300_001])
@pytest.mark.parametrize("dtype", ["float32", "float16", "int32"])
def test_allreduce_takes_the_hierarchical_path(hooked, n, dtype):
    from mpidp.comm import collectives
    comm = hooked.comm
    size, rank = comm.Get_size(), comm.Get_rank()
    arrays = [data((n,), dtype, 5 * r + 1) for r in range(size)]
    x = arrays[rank]
    want_path = f"hierarchical ({hooked.describe()} nodes)" if n >= hooked.channels else "MPI"
    assert collectives._path(x, comm, as_op(mpidp.Sum)) == want_path
    want = numpy.sum([a.astype(numpy.float64) for a in arrays], axis=0)
    numpy.testing.assert_allclose(mpidp.allreduce(x, op=mpidp.Sum).astype(numpy.float64), want, rtol=tol(dtype))
    if dtype != "int32":
        y = x.copy()
        mpidp.allreduce_(y, op=mpidp.Average, postscale_factor=2.0)
        numpy.testing.assert_allclose(y.astype(numpy.float64), 2 * want / size, rtol=tol(dtype), atol=tol(dtype))
    got = mpidp.grouped_allreduce([x, x[: n // 2], x.astype(numpy.float64)], op=mpidp.Max)
    for g, w in zip(got, [numpy.max(arrays, 0), numpy.max(arrays, 0)[: n // 2], numpy.max(arrays, 0)]):
        numpy.testing.assert_array_equal(g.astype(numpy.float64), w.astype(numpy.float64))


@pytest.mark.parametrize("rows", [1, 7, 4099])
@pytest.mark.parametrize("dtype", ["float32", "float16", "int64"])
def test_reducescatter_takes_the_hierarchical_path_on_even_layouts(hooked, monkeypatch, rows, dtype):
    comm = hooked.comm
    size, rank = comm.Get_size(), comm.Get_rank()
    calls = []
    real = _hierarchical.reduce_scatter
    monkeypatch.setattr(_hierarchical, "reduce_scatter", lambda *a: calls.append(1) or real(*a))
    arrays = [data((rows, 3), dtype, 11 * r + rows) for r in range(size)]
    op = mpidp.Sum if dtype == "int64" else mpidp.Average
    got = mpidp.reducescatter(arrays[rank], op=op)
    total = numpy.sum([a.astype(numpy.float64) for a in arrays], axis=0)
    want = total / size if op is mpidp.Average else total
    base, extra = divmod(rows, size)
    lo = rank * base + min(rank, extra)
    numpy.testing.assert_allclose(got.astype(numpy.float64), want[lo:lo + base + (rank < extra)],
                                  rtol=tol(dtype), atol=tol(dtype))
    assert len(calls) == int(hooked.even and hooked.uses(arrays[rank])), "uneven layouts reduce-scatter flat"


def test_path_is_checked(hooked):
    """One rank that would go another way (a different crossover) raises MismatchError on every rank."""
    comm = hooked.comm
    hooked.set_from(0 if comm.Get_rank() == 0 else None)
    with pytest.raises(mpidp.MismatchError, match="path"):
        mpidp.allreduce(numpy.ones(4096, numpy.float32), name="grads")
    hooked.set_from(0)
    numpy.testing.assert_array_equal(mpidp.allreduce(numpy.ones(4096, numpy.float32), op=mpidp.Sum),
                                     numpy.full(4096, comm.Get_size(), numpy.float32))


@pytest.mark.parametrize("rows", ["equal", "uneven", "some empty"])
@pytest.mark.parametrize("dtype", ["float32", "float16", "int64", "complex128"])
def test_allgather_goes_through_the_nodes_on_even_layouts(hooked, rows, dtype):
    """Every rank's rows in rank order, whatever the placement (blocks or round robin), row counts
    that differ per rank, and ranks with none; uneven layouts gather flat."""
    comm = hooked.comm
    size, rank = comm.Get_size(), comm.Get_rank()
    assert hooked.gathers() == (0 if hooked.even else None)
    count = {"equal": [3] * size, "uneven": [2 * r + 1 for r in range(size)],
             "some empty": [0 if r % 2 else r + 4 for r in range(size)]}[rows]
    arrays = [data((count[r], 5), dtype, 13 * r + 3) for r in range(size)]
    for _ in range(2):  # the second time through the cached fingerprint
        got = mpidp.allgather(arrays[rank], name=f"hg.{rows}.{dtype}")
        numpy.testing.assert_array_equal(got, numpy.concatenate(arrays))


@pytest.mark.parametrize("empty", [False, True], ids=["", "rank1 empty"])
def test_allgather_through_the_nodes_matches_the_flat_one_bit_for_bit(topo, piece, empty):
    """The path itself on every layout (even ones through the nodes, the others MPI's own), in one
    piece or many (blocks of up to 4,200 float64, pieces of 4 KiB: 9 of them, uneven)."""
    comm = topo.comm
    size, rank = comm.Get_size(), comm.Get_rank()
    counts = numpy.array([(r * 7919) % 13 + 1 for r in range(size)], dtype=numpy.int64) * 300
    if empty and size > 1:
        counts[1] = 0
    displs = numpy.concatenate(([0], numpy.cumsum(counts)[:-1]))
    send = data((int(counts[rank]),), "float64", rank + 1)
    old = topo.from_bytes
    try:
        for start in (0, None):
            topo.from_bytes = start
            out = numpy.full(int(counts.sum()), numpy.nan)
            _hierarchical.allgatherv(comm, topo, topo.gathers(), send, out, counts, displs, MPI.DOUBLE)
            want = numpy.concatenate([data((int(counts[r]),), "float64", r + 1) for r in range(size)])
            numpy.testing.assert_array_equal(out, want)
    finally:
        topo.from_bytes = old


def test_allgather_crossover_is_checked(hooked):
    comm = hooked.comm
    hooked.set_from(0 if comm.Get_rank() == 0 else None)
    if hooked.even:
        with pytest.raises(mpidp.MismatchError, match="hierarchical from"):
            mpidp.allgather(numpy.ones((2, 64)), name="rows")
    else:  # uneven layouts gather flat whatever the crossover
        assert mpidp.allgather(numpy.ones((2, 64)), name="rows").shape == (2 * comm.Get_size(), 64)
    hooked.set_from(0)
    assert mpidp.allgather(numpy.ones((2, 64)), name="rows").shape == (2 * comm.Get_size(), 64)


@pytest.mark.parametrize("own", [False, True], ids=["", "its own crossover differs"])
def test_joined_rank_takes_part_in_a_hierarchical_allgather(hooked, own):
    """A joined rank takes part the way the others' checked signature says ("hierarchical from"), not
    by its own crossover: where that differs it would gather flat while they go through the nodes."""
    if own and not hooked.even:
        pytest.skip(f"layout {hooked.describe()} gathers flat whatever the crossover")
    comm = hooked.comm
    size, rank = comm.Get_size(), comm.Get_rank()
    if rank == size - 1:
        if own:
            hooked.set_from(None)
        mpidp.join()
        return
    x = numpy.full((rank + 1, 40), float(rank))
    got = mpidp.allgather(x, name="after join")
    numpy.testing.assert_array_equal(got, numpy.concatenate([numpy.full((r + 1, 40), float(r))
                                                             for r in range(size - 1)]))
    mpidp.join()


@pytest.mark.parametrize("kind", ["sgd", "adam"])
def test_distributed_optimizer_unchanged(hooked, kind):
    """The DistributedOptimizer's buckets go the hierarchical way: the same model as one big batch."""
    from test_distributed_optimizer import compare, distributed, reference
    comm = hooked.comm
    model, _ = distributed(kind, comm.Get_rank(), comm.Get_size(), overlap=True, fusion_threshold_bytes=256)
    compare(model, reference(kind, comm.Get_size()), 1e-10)
    mpidp.check_replicas(model)


def test_sharded_optimizer_unchanged(hooked):
    from test_sharded import build, make_opt, reference, train
    comm = hooked.comm
    model = build()
    opt = mpidp.ShardedOptimizer(make_opt("adam", model), model=model)
    train(model, opt, comm.Get_rank(), comm.Get_size())
    ref, _ = reference("adam", comm.Get_size())
    for p, q in zip(model.parameters(), ref.parameters()):
        numpy.testing.assert_allclose(p.data, q.data, rtol=0, atol=1e-10)


@pytest.mark.parametrize("setting, want", [("off", None), ("on", 0), ("12345", 12345), ("auto", "default")])
def test_environment_setting(monkeypatch, tmp_path, setting, want):
    monkeypatch.setenv("MPIDP_HIERARCHICAL", setting)
    monkeypatch.setenv("MPIDP_AUTOTUNE_CACHE", str(tmp_path / "none.json"))
    want = _hierarchical.DEFAULT_FROM if want == "default" else want
    assert _hierarchical._decide_from(runtime.get_comm(), "key") == want


def test_auto_reads_the_tune_cache(monkeypatch, tmp_path):
    import json
    comm = runtime.get_comm()
    path = tmp_path / f"tune-{comm.Get_rank()}.json"  # only rank 0's is read; the others' say otherwise
    path.write_text(json.dumps({"version": 2, "entries": {"k": {"from_bytes": 4096 if comm.Get_rank() == 0 else 1}}}))
    monkeypatch.setenv("MPIDP_AUTOTUNE_CACHE", str(path))
    monkeypatch.setenv("MPIDP_HIERARCHICAL", "auto")
    assert _hierarchical._decide_from(comm, "k") == 4096


def test_bad_setting_names_the_variable(monkeypatch):
    monkeypatch.setenv("MPIDP_HIERARCHICAL", "sometimes")
    with pytest.raises(ValueError, match="MPIDP_HIERARCHICAL"):
        _hierarchical._decide_from(runtime.get_comm(), "key")


def test_tune_learns_the_crossover(hooked, tmp_path):
    import json

    from mpidp import tune
    comm = hooked.comm
    path = tmp_path / "tune.json"
    chosen, table = tune.hierarchical(sizes=(4096, 65536, 1 << 20), reps=1, cache_path=str(path))
    assert comm.allgather((chosen, table)) == [(chosen, table)] * comm.Get_size()
    assert [r["bytes"] for r in table] == [4096, 65536, 1 << 20] and chosen in (None, 4096, 65536, 1 << 20)
    assert all(r["mpi_s"] > 0 and r["hierarchical_s"] > 0 for r in table)
    later = [r for r in table if chosen is not None and r["bytes"] >= chosen]
    assert all(r["hierarchical_s"] <= r["mpi_s"] for r in later)
    assert hooked.from_bytes == chosen
    if comm.Get_rank() == 0:
        assert json.loads(path.read_text())["entries"][hooked.key()]["from_bytes"] == chosen


def test_tune_with_collectives_in_flight(hooked, tmp_path, monkeypatch):
    """tune.hierarchical() behind async allreduces still in flight: its every MPI call goes through the
    engine, in order (its barrier was the communicator's Barrier from the caller's thread, racing the
    engine thread's queued work)."""
    from mpidp import tune
    monkeypatch.setattr(engine_mod, "test_delay_s", 0.002)
    comm = hooked.comm
    size = comm.Get_size()
    for _ in range(3):
        handles = [mpidp.allreduce_async(numpy.full(1 << 16, float(i)), op=mpidp.Sum, name=f"inflight{i}")
                   for i in range(4)]
        tune.hierarchical(sizes=(4096,), reps=1, cache=False)
        for i, h in enumerate(handles):
            assert mpidp.synchronize(h)[0] == i * size


def test_tune_on_one_node_has_nothing_to_learn():
    from mpidp import tune
    if runtime.topology(runtime.get_comm()).nodes > 1:
        pytest.skip("this job runs on several nodes")
    assert tune.hierarchical(sizes=(4096,), reps=1, cache=False) == (None, [])


def test_the_jobs_own_topology():
    """On a real (or simulated) multi-node job: the runtime's topology matches local/cross sizes, and a
    large allreduce (and, on even layouts, reducescatter) takes the hierarchical path and matches NumPy."""
    from mpidp.comm import collectives
    comm = runtime.get_comm()
    topo = runtime.topology(comm)
    assert topo.local.Get_size() == mpidp.local_size() and topo.node_sizes[topo.node] == mpidp.local_size()
    if topo.even:
        assert topo.nodes == mpidp.cross_size()
    if topo.channels == 1:
        pytest.skip(f"layout {topo.describe()}: one rank per node, no hierarchical path")
    if topo.nodes == 1:
        pytest.skip("one node: run this file on a simulated cluster to test the real path")
    size, rank = comm.Get_size(), comm.Get_rank()
    x = data((topo.from_bytes // 4 + 1001,), "float32", rank)
    assert collectives._path(x, comm, as_op(mpidp.Sum)).startswith("hierarchical")
    want = numpy.sum([data(x.shape, "float32", r).astype(numpy.float64) for r in range(size)], axis=0)
    numpy.testing.assert_array_equal(mpidp.allreduce(x, op=mpidp.Sum).astype(numpy.float64), want)
    if topo.even:
        rows = topo.from_bytes // 4 + 3 * size + 1  # the first rank gets one row more
        y = data((rows,), "float32", rank + 7)
        total = numpy.sum([data((rows,), "float32", r + 7).astype(numpy.float64) for r in range(size)], axis=0)
        base, extra = divmod(rows, size)
        lo = rank * base + min(rank, extra)
        numpy.testing.assert_array_equal(mpidp.reducescatter(y, op=mpidp.Sum).astype(numpy.float64),
                                         total[lo:lo + base + (rank < extra)])


def test_cached_plan_follows_a_new_crossover(hooked, monkeypatch):
    """A repeated allreduce keeps its plan (path included) per signature: once the crossover moves
    (tune.hierarchical(), set_from) the next call must take the new path, on every rank alike,
    also where only some ranks had kept the plan (plans are evicted per rank)."""
    comm = hooked.comm
    calls = []
    real = _hierarchical.allreduce
    monkeypatch.setattr(_hierarchical, "allreduce", lambda *a: calls.append(1) or real(*a))
    x = numpy.full(1031, comm.Get_rank() + 1, numpy.float32)
    want = numpy.full(1031, comm.Get_size() * (comm.Get_size() + 1) / 2, numpy.float32)
    hooked.set_from(None)  # flat: the plan is "MPI"
    for _ in range(2):
        numpy.testing.assert_array_equal(mpidp.allreduce(x, op=mpidp.Sum, name="moved"), want)
    assert not calls
    hooked.set_from(0)  # every size is hierarchical now
    if comm.Get_rank() == 0:  # rank 0 has lost its plans, the others keep theirs
        engine_mod.engine_for(runtime.get_comm()).plans.clear()
    numpy.testing.assert_array_equal(mpidp.allreduce(x, op=mpidp.Sum, name="moved"), want)
    assert calls == [1], "the cached plan kept the old path"


def test_a_process_set_knows_its_nodes_and_goes_through_them():
    """A process set spanning nodes has its own topology (the job's nodes, restricted to the set) and
    its allreduce, allgather and reducescatter go through the nodes as the job's do; on one host it
    has one node. Run on a simulated 3x2 (mpidprun --simulate-nodes 3x2) the set of the first two
    nodes is an even 2x2."""
    comm = runtime.get_comm()
    size = comm.Get_size()
    if size < 3:
        pytest.skip("needs three ranks")
    world = runtime.topology(comm)
    members = sorted(world.rank_of[0] + world.rank_of[1]) if world.nodes >= 3 else list(range(size - 1))
    ps = mpidp.add_process_set(members)
    try:
        if not ps.included():
            return
        topo = runtime.topology(ps.comm)
        assert topo is not None and topo.comm is ps.comm
        want = sorted(k for k in (sum(r in members for r in node) for node in world.rank_of) if k)
        assert sorted(topo.node_sizes) == want
        n, me = len(members), ps.rank()
        through = topo.nodes > 1 and topo.channels > 1
        old = topo.set_from(0) if through else None
        try:
            arrays = [data((1031,), "float64", 3 * r + 1) for r in range(n)]
            x = arrays[me]
            assert collectives._path(x, ps.comm, as_op(mpidp.Sum)).startswith("hierarchical") == through
            numpy.testing.assert_allclose(mpidp.allreduce(x, op=mpidp.Sum, process_set=ps), numpy.sum(arrays, 0))
            rows = [data((r + 1, 3), "float32", r) for r in range(n)]
            numpy.testing.assert_array_equal(mpidp.allgather(rows[me], process_set=ps), numpy.concatenate(rows))
            block = numpy.stack([a[:4 * n] for a in arrays]).sum(0).reshape(n, 4)
            numpy.testing.assert_allclose(mpidp.reducescatter(x[:4 * n].reshape(n, 4), op=mpidp.Sum, process_set=ps),
                                          block[me:me + 1])
        finally:
            if through:
                topo.set_from(old)
    finally:
        mpidp.remove_process_set(ps)
    assert runtime.topology(ps.comm) is None if ps.comm is not None else True
