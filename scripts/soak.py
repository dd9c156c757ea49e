"""Soak run: thousands of mixed collectives checked against NumPy, then training with check_replicas.

    mpiexec -n 4 python scripts/soak.py --seconds 600 --seed 1        # the long run (docs/reliability.md)
    mpiexec -n 2 python scripts/soak.py --seconds 12 --json out.json  # CI (tests/process/test_soak.py)

Phase 1 (collectives): every rank derives the same schedule from ``--seed``:
op i draws its kind (allreduce, grouped allreduce, allgather with ragged rows,
broadcast from a random root, alltoall with random splits, reducescatter),
dtype, reduction op, size (0 to 1 MiB, log-uniform), process set, blocking
or async, in place or not. Rank r's input of op i comes from the seed, i and
r, so every rank computes the NumPy reference of every result locally.
Values are small integers, so sums, products, minima and maxima are exact in
every dtype (float16 and bfloat16 included) and compared bit for bit; Average
is compared within two ulps. Up to ``--in-flight`` async handles are pending
and are waited in random order, interleaved with blocking calls.

Phase 2 (training): an MLP with the DistributedOptimizer in small buckets,
fed by the prefetching loader; ``check_replicas`` every ``--check-every`` steps.

Both phases run until time is up (ranks agree on stopping with one small
allreduce every few dozen operations). After a warm-up (a fifth of the phase,
at least 2 s) each rank samples its RSS; the growth reported is the RSS floor
of the last quarter of the samples minus that of the first quarter (floors
ignore the transient peaks of large in-flight arrays; a leak raises the
floor). Open file descriptors, threads, live collective handles and the
pinned-pool bytes (``mpidp.backend.pinned.pool.allocated_bytes``) are compared
between the end of the warm-up and the end. Exit status 1 when a result
differs from its reference, RSS grows past ``--max-rss-growth-mib`` on any
rank in either phase, handles, threads or descriptors grow, or the buffer
pool (grow-only: big results borrow from it) grows past the same bound; 0 otherwise.
"""
import argparse
import gc
import json
import os
import sys
import threading
import time

for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    # one BLAS thread per rank: ranks already fill the cores (a 2-core machine ran 30x slower without)
    os.environ.setdefault(_var, "1")
# UCX (the MPICH wheel's default netmod) records every mmap/munmap of the process; with large arrays
# freed back to the OS that record grows by ~50 B per allreduce, with raw mpi4py as with mpidp, which
# would hide a leak of mpidp's own. UCX_MEM_EVENTS=yes measures the stack as shipped.
os.environ.setdefault("UCX_MEM_EVENTS", "no")

import numpy  # noqa: E402

import mpidp  # noqa: E402
from mpidp import data, models, nn, optim  # noqa: E402
from mpidp.backend import asnumpy, bfloat16, pinned, resolve_module  # noqa: E402

KINDS = ("allreduce", "allreduce", "allreduce", "grouped", "allgather", "allgather", "broadcast",
         "broadcast", "alltoall", "reducescatter")
OP_NAMES = ("Sum", "Average", "Min", "Max", "Product")
DTYPES = [numpy.dtype(t) for t in ("float16", "float32", "float64", "int32", "int64")] + \
    ([bfloat16] if bfloat16 is not None else [])
FLOATS = [d for d in DTYPES if d.kind in "fV"]
ULP = {"float16": 2.0 ** -10, "bfloat16": 2.0 ** -7, "float32": 2.0 ** -23, "float64": 2.0 ** -52}
MAX_BYTES = 1 << 20
STOP_EVERY = 32  # operations between two agreements on whether time is up


# --- measurements -----------------------------------------------------------------------------

def pin_malloc_thresholds():
    """glibc: serve arrays >= 64 KiB by mmap and trim the heap, so RSS follows live memory.

    By default glibc raises its mmap threshold as large blocks are freed, after
    which they come from a heap that rarely shrinks: RSS then swings by tens of
    MiB with the sizes in flight, hiding (or faking) a leak.
    """
    try:
        import ctypes
        libc = ctypes.CDLL("libc.so.6")
        m_trim_threshold, m_mmap_threshold = -1, -3
        return bool(libc.mallopt(m_mmap_threshold, 64 << 10) and libc.mallopt(m_trim_threshold, 128 << 10))
    except (OSError, AttributeError):
        return False


def rss_bytes():
    """Resident set size now (Linux /proc; elsewhere the peak from getrusage)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        import resource
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def open_fds():
    try:
        return len(os.listdir("/proc/self/fd"))
    except OSError:
        return -1


def live_handles():
    from mpidp.comm.engine import Handle
    gc.collect()
    return sum(1 for o in gc.get_objects() if isinstance(o, Handle))


def snapshot():
    return {"rss": rss_bytes(), "fds": open_fds(), "threads": threading.active_count(),
            "handles": live_handles(), "pinned_bytes": pinned.pool.allocated_bytes}


class Phase:
    """Operation counters and the memory picture of one phase on this rank."""

    def __init__(self, name, seconds):
        self.name, self.seconds = name, seconds
        self.start = time.monotonic()
        self.warmup = max(2.0, 0.2 * seconds)
        self.ops = self.bytes = self.mismatches = 0
        self.before = self.after = None
        self.peak_rss = 0
        self.samples = []  # RSS after the warm-up
        self.first_errors = []

    def tick(self):
        """Sample RSS; take the baseline once the warm-up is over."""
        rss = rss_bytes()
        self.peak_rss = max(self.peak_rss, rss)
        if self.before is None and time.monotonic() - self.start >= self.warmup:
            self.before = snapshot()
        if self.before is not None:
            self.samples.append(rss)

    def growth(self):
        """RSS floor of the last quarter of the samples minus that of the first quarter.

        Floors ignore the transient peaks of large in-flight arrays; a leak raises the floor.
        """
        s = self.samples
        if len(s) < 8:
            return self.after["rss"] - self.before["rss"]
        q = len(s) // 4
        return min(s[-q:]) - min(s[:q])

    def time_up(self):
        return time.monotonic() - self.start >= self.seconds

    def finish(self):
        if self.before is None:  # the phase was shorter than its warm-up: baseline = end
            self.before = snapshot()
        self.after = snapshot()
        self.samples.append(self.after["rss"])
        self.peak_rss = max(self.peak_rss, self.after["rss"])

    def report(self):
        b, a = self.before, self.after
        return {"ops": self.ops, "bytes": self.bytes, "mismatches": self.mismatches,
                "seconds": round(time.monotonic() - self.start, 1),
                "rss_before_kib": b["rss"] // 1024, "rss_after_kib": a["rss"] // 1024,
                "rss_growth_kib": self.growth() // 1024,
                "rss_peak_kib": self.peak_rss // 1024,
                "rss_trace_kib": [v // 1024 for v in self.samples[::max(1, len(self.samples) // 40)]],
                "fds": [b["fds"], a["fds"]], "threads": [b["threads"], a["threads"]],
                "handles": [b["handles"], a["handles"]], "pinned_bytes": [b["pinned_bytes"], a["pinned_bytes"]],
                "first_errors": self.first_errors[:5]}


def agreed_stop(phase):
    """True on every rank once any rank's clock says the phase is over."""
    flag = numpy.array([int(phase.time_up())], numpy.int32)
    return bool(mpidp.allreduce(flag, op=mpidp.Max, name=f"soak.{phase.name}.stop")[0])


# --- the schedule and its reference -----------------------------------------------------------

def values(rng, shape, dtype, op_name):
    """Small integers (exact in every dtype); {-2,-1,1,2} for products."""
    if op_name == "Product":
        a = rng.choice(numpy.array([-2, -1, 1, 2]), size=shape)
    else:
        a = rng.integers(-8, 9, size=shape)
    return a.astype(numpy.float32).astype(dtype) if dtype == bfloat16 else a.astype(dtype)


def reference(inputs, op_name, dtype, pre=1.0, post=1.0):
    """The reduction of ``inputs`` computed in float64/int64 and cast back (exact for our values)."""
    wide = numpy.float64 if dtype.kind in "fV" else numpy.int64
    stack = [numpy.asarray(a).astype(wide) for a in inputs]
    if op_name in ("Sum", "Average"):
        out = numpy.sum(stack, axis=0) * pre * post if wide is numpy.float64 else numpy.sum(stack, axis=0)
        if op_name == "Average":
            out = out / len(inputs)
    elif op_name == "Min":
        out = numpy.min(stack, axis=0)
    elif op_name == "Max":
        out = numpy.max(stack, axis=0)
    else:
        out = numpy.prod(stack, axis=0)
    return out.astype(numpy.float32).astype(dtype) if dtype == bfloat16 else out.astype(dtype)


def same(got, want, op_name):
    """Bit-identical, or within two ulps for Average (whose 1/n is rounded)."""
    got = asnumpy(got)
    if got.dtype != want.dtype or got.shape != want.shape:
        return False
    if op_name == "Average" and want.dtype.kind in "fV":
        g, w = got.astype(numpy.float64), want.astype(numpy.float64)
        return bool(numpy.all(numpy.abs(g - w) <= 2 * ULP[want.dtype.name] * numpy.abs(w) + 1e-30))
    return got.tobytes() == want.tobytes()


class Op:
    """Operation ``i`` of the schedule: every field is the same on every rank."""

    def __init__(self, seed, i, size, sets):
        rng = numpy.random.default_rng([seed, i, 0x50AC])
        self.seed, self.i = seed, i
        self.kind = KINDS[rng.integers(len(KINDS))]
        self.pset = sets[rng.integers(len(sets))] if sets and rng.random() < 0.15 else None
        self.members = self.pset.ranks if self.pset is not None else list(range(size))
        self.asynchronous = rng.random() < 0.5
        self.inplace = rng.random() < 0.4
        self.op_name = OP_NAMES[rng.integers(len(OP_NAMES))]
        if self.kind in ("allgather", "broadcast", "alltoall"):
            self.op_name = "Sum"  # no reduction: values only
        pool = FLOATS if self.op_name == "Average" else DTYPES
        self.dtype = pool[rng.integers(len(pool))]
        self.cols = int(rng.choice([1, 3, 16]))
        nbytes = 0 if rng.random() < 0.03 else int(2 ** rng.uniform(2, 20))
        self.elements = min(nbytes, MAX_BYTES) // self.dtype.itemsize
        self.scaled = self.dtype.kind in "fV" and self.op_name in ("Sum", "Average") and rng.random() < 0.2
        self.wait_u, self.pick_u = rng.random(), rng.random()
        self.root = int(rng.choice(self.members))
        m = len(self.members)
        self.rows = rng.integers(0, max(1, self.elements // self.cols) + 1, size=m)  # ragged, per member
        self.splits = [rng.multinomial(int(r), [1.0 / m] * m) for r in self.rows]
        self.group = [(pool[rng.integers(len(pool))], int(2 ** rng.uniform(0, 14))) for _ in range(rng.integers(1, 5))]
        self.name = f"soak.{i}.{self.kind}"

    def input(self, rank, shape, dtype=None, tag=0):
        rng = numpy.random.default_rng([self.seed, self.i, rank, tag])
        return values(rng, shape, self.dtype if dtype is None else dtype, self.op_name)

    def nbytes(self, arrays):
        return int(sum(a.nbytes for a in arrays))


def start(op, rank, xp):
    """Issue ``op`` on this rank; returns (handle or result, check(result) -> bool, bytes sent)."""
    members, me = op.members, op.members.index(rank)
    kw = {"name": op.name, "process_set": op.pset}
    mod = mpidp
    if op.kind in ("allreduce", "reducescatter"):
        rows = (op.elements // op.cols) if op.kind == "allreduce" else int(op.rows[0])
        shape = (rows, op.cols) if op.cols > 1 else (rows,)
        inputs = [op.input(r, shape) for r in members]
        x = xp.asarray(inputs[me])
        scale = {"prescale_factor": 2.0, "postscale_factor": 0.5} if op.scaled else {}
        want = reference(inputs, op.op_name, op.dtype, **({"pre": 2.0, "post": 0.5} if op.scaled else {}))
        reduce_op = getattr(mpidp, op.op_name)
        if op.kind == "reducescatter":
            base, extra = divmod(rows, len(members))
            lo = me * base + min(me, extra)
            want = want[lo:lo + base + (me < extra)]
            fn = mod.reducescatter_async if op.asynchronous else mod.reducescatter
            out = fn(x, op=reduce_op, **kw, **scale)
            return out, lambda got: same(got, want, op.op_name), x.nbytes
        if op.inplace:
            fn = mod.allreduce_async_ if op.asynchronous else mod.allreduce_
            out = fn(x, op=reduce_op, **kw, **scale)
            return out, lambda got: got is x and same(x, want, op.op_name), x.nbytes
        fn = mod.allreduce_async if op.asynchronous else mod.allreduce
        out = fn(x, op=reduce_op, **kw, **scale)
        return out, lambda got: same(got, want, op.op_name) and same(x, inputs[me], "Sum"), x.nbytes
    if op.kind == "grouped":
        wants, xs = [], []
        for t, (dtype, n) in enumerate(op.group):
            if op.op_name == "Average" and dtype.kind not in "fV":
                dtype = numpy.dtype(numpy.float32)
            inputs = [op.input(r, (n,), dtype, tag=t + 1) for r in members]
            xs.append(xp.asarray(inputs[me]))
            wants.append(reference(inputs, op.op_name, dtype))
        reduce_op = getattr(mpidp, op.op_name)
        if op.asynchronous:
            out = mod.grouped_allreduce_async(xs, op=reduce_op, **kw)
        else:
            out = (mod.grouped_allreduce_ if op.inplace else mod.grouped_allreduce)(xs, op=reduce_op, **kw)

        def check(got):
            return len(got) == len(wants) and all(same(g, w, op.op_name) for g, w in zip(got, wants))
        return out, check, op.nbytes(xs)
    tail = (op.cols,) if op.cols > 1 else ()
    if op.kind == "allgather":
        inputs = [op.input(r, (int(op.rows[j]),) + tail) for j, r in enumerate(members)]
        x = xp.asarray(inputs[me])
        want = numpy.concatenate(inputs) if inputs else None
        out = (mod.allgather_async if op.asynchronous else mod.allgather)(x, **kw)
        return out, lambda got: same(got, want, "Sum"), x.nbytes
    if op.kind == "broadcast":
        shape = (op.elements // op.cols,) + tail
        x = xp.asarray(op.input(rank, shape))
        want = op.input(op.root, shape)
        if op.inplace:
            out = (mod.broadcast_async_ if op.asynchronous else mod.broadcast_)(x, op.root, **kw)
            return out, lambda got: got is x and same(x, want, "Sum"), x.nbytes
        out = (mod.broadcast_async if op.asynchronous else mod.broadcast)(x, op.root, **kw)
        return out, lambda got: same(got, want, "Sum"), x.nbytes
    # alltoall: member j sends splits[j][k] rows to member k
    inputs = [op.input(r, (int(op.rows[j]),) + tail) for j, r in enumerate(members)]
    x = xp.asarray(inputs[me])
    parts, counts = [], []
    for j in range(len(members)):
        offsets = numpy.concatenate(([0], numpy.cumsum(op.splits[j])))
        parts.append(inputs[j][offsets[me]:offsets[me + 1]])
        counts.append(int(op.splits[j][me]))
    want = numpy.concatenate(parts)
    out = (mod.alltoall_async if op.asynchronous else mod.alltoall)(x, splits=op.splits[me], **kw)

    def check(got):
        rows, received = got
        return same(rows, want, "Sum") and list(asnumpy(received)) == counts
    return out, check, x.nbytes


def collectives_phase(args, xp, rank, size):
    sets = []
    for ranks in ([0, size - 1], list(range(1, size)), list(range(0, size, 2))):
        if ranks and sorted(set(ranks)) not in [s.ranks for s in sets]:
            sets.append(mpidp.ProcessSet(sorted(set(ranks))))
    phase = Phase("collectives", args.seconds * (1 - args.train_fraction))
    inflight = []  # (handle, check, op)

    def settle(entry):
        handle, check, op = entry
        ok = check(mpidp.synchronize(handle))
        record(phase, op, ok, rank)

    i = 0
    while True:
        op = Op(args.seed, i, size, sets)
        i += 1
        if inflight and (len(inflight) >= args.in_flight or op.wait_u < 0.35):
            settle(inflight.pop(int(op.pick_u * len(inflight))))  # out of order
        if rank in op.members:
            out, check, sent = start(op, rank, xp)
            phase.ops += 1
            phase.bytes += sent
            if op.asynchronous:
                inflight.append((out, check, op))
            else:
                record(phase, op, check(out), rank)
        if i % STOP_EVERY == 0:
            order = numpy.random.default_rng([args.seed, i]).permutation(len(inflight))
            for k in order:
                settle(inflight[k])
            inflight.clear()
            out = None  # the last async handle, waited for: only the engine thread's last may stay alive
            phase.tick()
            if agreed_stop(phase):
                break
    phase.finish()
    return phase


def record(phase, op, ok, rank):
    if ok:
        return
    phase.mismatches += 1
    if len(phase.first_errors) < 10:
        what = (f"op {op.i} {op.kind} {op.op_name} {op.dtype} elements={op.elements} cols={op.cols} "
                f"async={op.asynchronous} inplace={op.inplace} set={op.members}")
        phase.first_errors.append(what)
        sys.stderr.write(f"[rank {rank}] soak mismatch: {what}\n")
        sys.stderr.flush()


def training_phase(args, device):
    phase = Phase("training", args.seconds * args.train_fraction)
    model = models.mlp(in_features=64, hidden=(256, 256), num_classes=10, seed=args.seed, device=device)
    mpidp.broadcast_parameters(model, root_rank=0)
    inner = optim.SGD(model.parameters(), lr=0.02, momentum=0.9)
    opt = mpidp.DistributedOptimizer(inner, model=model, fusion_threshold_bytes=64 << 10)
    mpidp.broadcast_optimizer_state(opt, root_rank=0)
    dataset = data.synthetic(4096, (64,), seed=args.seed)
    sampler = data.DistributedSampler(len(dataset.y), shuffle=True, seed=args.seed)
    crit = nn.CrossEntropyLoss()
    checks, step, epoch, done, loss = 0, 0, 0, False, float("nan")
    while not done:
        sampler.set_epoch(epoch)
        for x, y in data.loader(dataset, sampler, 64, drop_last=True, device=device):
            opt.zero_grad()
            loss = crit(model(x), y)
            model.backward(crit.backward())
            opt.step()
            step += 1
            phase.ops += 1
            phase.bytes += sum(b.nbytes for b in opt.buckets)
            if step % args.check_every == 0:
                mpidp.check_replicas(model)  # raises MismatchError on every rank if replicas differ
                checks += 1
            if step % 10 == 0:
                phase.tick()
                if agreed_stop(phase):
                    done = True
                    break
        epoch += 1
    mpidp.check_replicas(model)
    checks += 1
    phase.finish()
    opt.close()
    return phase, {"steps": step, "check_replicas": checks, "final_loss": round(float(loss), 4)}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seconds", type=float, default=60.0, help="total duration of both phases")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--train-fraction", type=float, default=0.35, help="share of --seconds spent training")
    p.add_argument("--in-flight", type=int, default=6, help="async handles pending at most")
    p.add_argument("--check-every", type=int, default=25, help="check_replicas every N training steps")
    p.add_argument("--max-rss-growth-mib", type=float, default=16.0,
                   help="fail when a rank's RSS grows more than this after a phase's warm-up")
    p.add_argument("--device", choices=["cpu", "gpu"], default="cpu")
    p.add_argument("--json", metavar="PATH", help="rank 0 writes the report here")
    args = p.parse_args(argv)
    if args.device == "gpu" and bfloat16 is not None:  # CuPy has no bfloat16 arrays
        DTYPES.remove(bfloat16)
        FLOATS.remove(bfloat16)
    pinned_malloc = pin_malloc_thresholds()
    mpidp.init()
    rank, size = mpidp.rank(), mpidp.size()
    xp = resolve_module(args.device)
    t0 = time.monotonic()
    coll = collectives_phase(args, xp, rank, size)
    train, train_info = training_phase(args, args.device)
    mine = {"rank": rank, "collectives": coll.report(), "training": train.report()}
    reports = mpidp.allgather_object(mine, name="soak.report")
    code = 0
    if rank == 0:
        code = summarize(args, reports, train_info, size, time.monotonic() - t0, pinned_malloc)
    code = int(mpidp.broadcast_object(code, root_rank=0, name="soak.exit"))
    mpidp.shutdown()
    return code


def summarize(args, reports, train_info, size, elapsed, pinned_malloc):
    """Print the report, write --json; return the exit status."""
    bound_kib = int(args.max_rss_growth_mib * 1024)
    problems = []
    for r in reports:
        for phase in ("collectives", "training"):
            ph = r[phase]
            if ph["mismatches"]:
                problems.append(f"rank {r['rank']} {phase}: {ph['mismatches']} results differ from NumPy")
            if ph["rss_growth_kib"] > bound_kib:
                problems.append(f"rank {r['rank']} {phase}: RSS grew {ph['rss_growth_kib']} KiB after warm-up "
                                f"(bound {bound_kib} KiB)")
            if ph["handles"][1] > max(1, ph["handles"][0]):  # the engine thread holds its last handle
                problems.append(f"rank {r['rank']} {phase}: {ph['handles'][1]} collective handles still alive "
                                f"after every wait (was {ph['handles'][0]} after warm-up)")
            if ph["threads"][1] > ph["threads"][0] or ph["fds"][1] > ph["fds"][0]:
                problems.append(f"rank {r['rank']} {phase}: threads {ph['threads']} / open files {ph['fds']} grew")
            # the pool is grow-only: it may still reach the high-water mark of results alive at once
            # (big results borrow its buffers); a leak grows it without bound
            if ph["pinned_bytes"][1] - ph["pinned_bytes"][0] > bound_kib * 1024:
                problems.append(f"rank {r['rank']} {phase}: pinned pool grew {ph['pinned_bytes']} bytes "
                                f"(bound {bound_kib} KiB)")
    total = {phase: {k: sum(r[phase][k] for r in reports) for k in ("ops", "bytes", "mismatches")}
             for phase in ("collectives", "training")}
    mpi = " ".join(mpidp.comm.runtime.MPI.Get_library_version().splitlines()[0].split())
    print(f"soak: {size} ranks, seed {args.seed}, {elapsed:.0f} s, device {args.device}, {mpi}, "
          f"glibc mmap threshold {'pinned at 64 KiB' if pinned_malloc else 'default'}, "
          f"UCX_MEM_EVENTS={os.environ.get('UCX_MEM_EVENTS')}")
    c = total["collectives"]
    print(f"collectives: {c['ops']} operations on all ranks ({c['ops'] // size} per rank), "
          f"{c['bytes'] / 2**20:.1f} MiB sent, {c['mismatches']} mismatches")
    print(f"training: {train_info['steps']} steps, check_replicas {train_info['check_replicas']} times "
          f"(all identical), {total['training']['bytes'] / 2**20:.1f} MiB of gradients, final loss "
          f"{train_info['final_loss']}")
    print("rank  phase        RSS KiB after warm-up -> end (floor growth)  peak KiB  fds    threads  handles  pinned B")
    for r in reports:
        for phase in ("collectives", "training"):
            ph = r[phase]
            print(f"{r['rank']:>4}  {phase:11s}  {ph['rss_before_kib']:>13} -> {ph['rss_after_kib']:>9} "
                  f"({ph['rss_growth_kib']:>+7})      {ph['rss_peak_kib']:>9}  {ph['fds'][0]}->{ph['fds'][1]:<3} "
                  f"{ph['threads'][0]}->{ph['threads'][1]:<4} {ph['handles'][0]}->{ph['handles'][1]:<4}  "
                  f"{ph['pinned_bytes'][0]}->{ph['pinned_bytes'][1]}")
    print(f"bound: RSS growth <= {bound_kib} KiB per rank and phase; live handles, threads, open files "
          f"and pinned pool not growing")
    print("result: " + ("PASS" if not problems else "FAIL: " + "; ".join(problems)), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"ranks": size, "seed": args.seed, "seconds": round(elapsed, 1), "device": args.device,
                       "mpi": mpi, "malloc_pinned": pinned_malloc,
                       "ucx_mem_events": os.environ.get("UCX_MEM_EVENTS"),
                       "totals": total, "training": train_info, "per_rank": reports,
                       "rss_bound_kib": bound_kib, "problems": problems}, f, indent=1)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
