"""OSU-style sweep of mpidp's collectives against raw mpi4py calls on the same buffers, in one run.

    mpiexec -n 2 python scripts/bench_collectives.py [--min 4 --max 64M --factor 4 --iters auto
                                                      --out docs/figures --piece-sweep]

For each message size it times mpidp.allreduce (out of place, check on and off), allreduce_
(in place), an allreduce_async + synchronize round trip, allgather, broadcast_ and
reducescatter against comm.Allreduce(send, recv), comm.Allreduce(IN_PLACE, buf), comm.Allgatherv, comm.Bcast and comm.Reduce_scatter (float32,
op Sum; the size is the whole input, each rank gets 1/ranks of it). Every iteration
starts after a barrier and its time is the max over the ranks; the variants of one size run
interleaved in rounds, so slow drift on a noisy machine hits both sides of a ratio alike. Rank 0
prints the table, writes bench_collectives_np<N>.csv and .png under --out, and a summary: the
small-message overhead, the cost of the mismatch check, issue 21's small-message targets (met or
not at each size) and the >= 1 MiB allreduce target.
--piece-sweep also times allreduce_ of 4, 16 and 64 MiB with every piece size from 64 KiB to
16 MiB against the unpieced call, and names the fastest piece size.
"""
import argparse
import os
import resource
import sys
import time

import numpy
from mpi4py import MPI

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _benchutil as bu  # noqa: E402

import mpidp  # noqa: E402

MAIN_COLUMNS = [("size", "size", ""), ("op", "op", ""), ("mpidp_us", "mpidp us", ".1f"),
                ("mpidp_min_us", "(min)", ".1f"), ("mpi4py_us", "mpi4py us", ".1f"),
                ("mpi4py_min_us", "(min)", ".1f"), ("ratio", "ratio", ".2f"),
                ("mpidp_busbw", "mpidp GB/s", ".3g"), ("mpi4py_busbw", "mpi4py GB/s", ".3g"),
                ("mpidp_faults", "mpidp flt", ".0f"), ("mpi4py_faults", "mpi4py flt", ".0f")]
PIECE_COLUMNS = [("size", "size", ""), ("piece", "piece", ""), ("mpidp_us", "allreduce_ us", ".1f"),
                 ("mpidp_min_us", "(min)", ".1f"), ("ratio", "vs raw in-place", ".2f"),
                 ("mpidp_busbw", "GB/s", ".3g"), ("mpidp_faults", "flt", ".0f")]
CSV_COLUMNS = ["ranks", "oversubscribed", "bytes", "size", "op", "piece_bytes", "mpidp_us",
               "mpidp_min_us", "mpi4py_us", "mpi4py_min_us", "ratio", "mpidp_busbw", "mpi4py_busbw",
               "mpidp_faults", "mpi4py_faults", "mpidp_iters", "mpi4py_iters"]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--min", default="4", help="smallest message in bytes (K/M suffixes; default 4)")
    p.add_argument("--max", default="64M", help="largest message in bytes (default 64M)")
    p.add_argument("--factor", type=int, default=4, choices=(2, 4), help="size step (default 4)")
    p.add_argument("--iters", default="auto",
                   help="iterations per variant and size, or 'auto' to scale by size (default)")
    p.add_argument("--budget", type=float, default=0.2,
                   help="with --iters auto: seconds per variant and size (default 0.2)")
    p.add_argument("--rounds", type=int, default=3,
                   help="interleaved rounds the iterations are split into (default 3)")
    p.add_argument("--out", default="docs/figures", help="folder for the CSV and PNG (default docs/figures)")
    p.add_argument("--piece-sweep", action="store_true", help="also sweep the allreduce piece size")
    p.add_argument("--no-plot", action="store_true", help="skip the PNG")
    p.add_argument("--markdown", action="store_true", help="also print the table as markdown")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    mpidp.init()
    from mpidp.comm import _buffers, check, collectives, runtime
    comm = runtime.get_comm()
    n, me = comm.Get_size(), comm.Get_rank()
    local = comm.Split_type(MPI.COMM_TYPE_SHARED, key=me)
    over = local.Get_size() > (os.cpu_count() or 1)
    local.Free()
    say = print if me == 0 else (lambda *a, **k: None)
    bench = Bench(comm, args, check.set_enabled)  # this rank's switch (every rank alike): set_check is a collective
    start, busy0, own0 = time.perf_counter(), cpu_busy_s(), own_cpu_s()

    say(header(n, over, _buffers.piece_bytes()))
    rows = []
    for nbytes in bu.sizes(bu.parse_size(args.min), bu.parse_size(args.max), args.factor):
        rows += bench.sweep_size(nbytes, _buffers.piece_bytes())
        if me == 0:
            print(f"  {bu.format_size(nbytes)} done, {time.perf_counter() - start:.0f} s", file=sys.stderr)
    for r in rows:
        r.update(ranks=n, oversubscribed=over)

    check_us = bench.time_check(check)
    if me == 0:
        bu.print_table(rows, MAIN_COLUMNS)
        say()
        say("\n".join(summary(rows, check_us)))
        if args.markdown:
            say("\n" + bu.markdown_table(rows, MAIN_COLUMNS))

    piece_rows = []
    if args.piece_sweep:
        piece_rows = bench.piece_sweep(_buffers)
        for r in piece_rows:
            r.update(ranks=n, oversubscribed=over)
        if me == 0:
            say()
            bu.print_table(piece_rows, PIECE_COLUMNS, title="piece-size sweep: mpidp.allreduce_ "
                           "(in place, check on) by piece size; 'raw' = comm.Allreduce(IN_PLACE) unpieced")
            say("\n".join(recommend(piece_rows, _buffers.DEFAULT_PIECE_BYTES, over)))
            if args.markdown:
                say("\n" + bu.markdown_table(piece_rows, PIECE_COLUMNS))

    others = foreign_cpu_share(comm, start, busy0, own0)
    if me == 0:
        if others is not None:
            say(f"\nother processes used {others:.0%} of the {os.cpu_count()} cores during the run"
                + (" (timings are noisier than on an idle machine)" if others > 0.05 else ""))
        stem = os.path.join(args.out, f"bench_collectives_np{n}")
        bu.write_csv(stem + ".csv", rows + piece_rows, CSV_COLUMNS)
        say(f"\nwrote {stem}.csv")
        if not args.no_plot and make_plot(stem + ".png", rows, n, over):
            say(f"wrote {stem}.png")
        say(f"total {time.perf_counter() - start:.0f} s")
    mpidp.shutdown()


def cpu_busy_s():
    """Seconds all cores spent busy since boot (Linux /proc/stat), or None elsewhere."""
    try:
        with open("/proc/stat") as f:
            fields = [int(v) for v in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def own_cpu_s():
    u = resource.getrusage(resource.RUSAGE_SELF)
    return u.ru_utime + u.ru_stime


def foreign_cpu_share(comm, start, busy0, own0):
    """Share of the machine's cores that processes other than the ranks used since ``start``."""
    own = comm.allreduce(own_cpu_s() - own0)
    busy = cpu_busy_s()
    if busy is None or busy0 is None:
        return None
    wall = time.perf_counter() - start
    return max(0.0, (busy - busy0 - own) / (wall * (os.cpu_count() or 1)))


def header(n, over, piece):
    lib = MPI.Get_library_version().splitlines()[0].strip()
    cores = os.cpu_count()
    mark = f"  ** OVERSUBSCRIBED: {n} ranks on {cores} cores **" if over else ""
    load = os.getloadavg()[0]  # other processes on the cores make every timing noisier
    return (f"mpidp {mpidp.__version__} | {lib} | mpi4py {sys.modules['mpi4py'].__version__} | "
            f"numpy {numpy.__version__}\n{n} ranks, {cores} cores{mark} | 1-min load average "
            f"{load:.1f} at start\nfloat32, op Sum | piece {bu.format_size(piece)} | median (min) us per "
            f"call, max over ranks | flt: minor page faults per call\n")


class Bench:
    def __init__(self, comm, args, set_check):
        self.comm, self.args, self.set_check = comm, args, set_check
        self.n = comm.Get_size()

    def measure(self, variants):
        """{key: (per-iteration seconds, page faults per call)} for variants [(key, fn, setup)].

        The variants run interleaved in rounds. Faults are minor page faults of this process per
        call (max over ranks): fresh memory that MPI or NumPy touches costs one per 4 KiB page.
        """
        comm, args = self.comm, self.args
        iters = {}
        for key, fn, setup in variants:
            setup()
            iters[key] = (bu.auto_iters(fn, comm, args.budget) if args.iters == "auto"
                          else int(args.iters))
        rounds = max(1, args.rounds)
        times = {key: [] for key, _, _ in variants}
        faults = numpy.zeros(len(variants))
        calls = numpy.zeros(len(variants))
        for r in range(rounds):
            for i, (key, fn, setup) in enumerate(variants):
                setup()
                k, warm = max(1, -(-iters[key] // rounds)), (3 if r == 0 else 1)
                before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
                times[key].append(bu.timeit(fn, comm, k, warmup=warm))
                faults[i] += resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
                calls[i] += k + warm
        self.set_check(True)
        comm.Allreduce(MPI.IN_PLACE, faults, op=MPI.MAX)
        return {key: (numpy.concatenate(times[key]), faults[i] / calls[i])
                for i, (key, _, _) in enumerate(variants)}

    def sweep_size(self, nbytes, piece):
        comm, n = self.comm, self.n
        count = max(1, nbytes // 4)
        nbytes = count * 4
        x = numpy.ones(count, numpy.float32)
        y = numpy.empty_like(x)
        buf = numpy.zeros(count, numpy.float32)  # in place: zeros keep the sums finite
        gathered = numpy.empty(n * count, numpy.float32)
        counts, displs = [count] * n, [i * count for i in range(n)]
        bc = numpy.zeros(count, numpy.float32)
        base, extra = divmod(count, n)  # reducescatter: the first ranks get one element more
        rs_counts = [base + (r < extra) for r in range(n)]
        rs_out = numpy.empty(rs_counts[comm.Get_rank()], numpy.float32)
        on, off = (lambda: self.set_check(True)), (lambda: self.set_check(False))
        Sum = mpidp.Sum
        variants = [
            ("mp_ar", lambda: mpidp.allreduce(x, op=Sum), on),
            ("mp_ar_nc", lambda: mpidp.allreduce(x, op=Sum), off),
            ("raw_ar", lambda: comm.Allreduce(x, y), on),
            ("mp_ar_ip", lambda: mpidp.allreduce_(buf, op=Sum), on),
            ("raw_ar_ip", lambda: comm.Allreduce(MPI.IN_PLACE, buf), on),
            ("mp_async", lambda: mpidp.synchronize(mpidp.allreduce_async(x, op=Sum)), on),
            ("mp_ag", lambda: mpidp.allgather(x), on),
            ("raw_ag", lambda: comm.Allgatherv(x, [gathered, counts, displs, MPI.FLOAT]), on),
            ("mp_bc", lambda: mpidp.broadcast_(bc, 0), on),
            ("raw_bc", lambda: comm.Bcast(bc, root=0), on),
            ("mp_rs", lambda: mpidp.reducescatter(x, op=Sum), on),
            ("raw_rs", lambda: comm.Reduce_scatter(x, rs_out, recvcounts=rs_counts), on),
        ]
        t = self.measure(variants)
        ar_bytes = 2 * (n - 1) / n * nbytes
        ag_bytes = (n - 1) / n * n * nbytes
        rows = []
        for op, mine, raw, bus, pb in [
                ("allreduce", "mp_ar", "raw_ar", ar_bytes, piece),
                ("allreduce check off", "mp_ar_nc", "raw_ar", ar_bytes, piece),
                ("allreduce_ in place", "mp_ar_ip", "raw_ar_ip", ar_bytes, piece),
                ("allreduce_async + synchronize", "mp_async", "raw_ar", ar_bytes, piece),
                ("allgather", "mp_ag", "raw_ag", ag_bytes, None),
                ("broadcast_", "mp_bc", "raw_bc", nbytes, None),
                ("reducescatter", "mp_rs", "raw_rs", (n - 1) / n * nbytes, piece)]:
            rows.append(row(nbytes, op, t[mine], t[raw], bus, pb))
        return rows

    def time_check(self, check):
        """Median us of one mismatch check (fingerprint + 16-byte allreduce) on its own."""
        sig = (("op", "Sum"), ("dtype", "float32"), ("shape", (1024,)))
        t = self.measure([("check", lambda: check.agree(self.comm, "allreduce", "bench", sig),
                           lambda: None)])
        return float(numpy.median(t["check"][0])) * 1e6

    def piece_sweep(self, buffers):
        comm, n = self.comm, self.n
        old = buffers.piece_bytes()
        pieces = bu.sizes(64 << 10, 16 << 20, 2)
        rows = []
        try:
            for nbytes in (4 << 20, 16 << 20, 64 << 20):
                buf = numpy.zeros(nbytes // 4, numpy.float32)
                x = numpy.ones_like(buf)
                y = numpy.empty_like(buf)

                def run():
                    mpidp.allreduce_(buf, op=mpidp.Sum)

                variants = [(p, run, (lambda p=p: buffers.set_piece_bytes(p))) for p in pieces]
                variants.append(("unpieced", run, lambda: buffers.set_piece_bytes(1 << 40)))
                variants.append(("raw", lambda: comm.Allreduce(MPI.IN_PLACE, buf), lambda: None))
                variants.append(("raw out-of-place", lambda: comm.Allreduce(x, y), lambda: None))
                t = self.measure(variants)
                bus = 2 * (n - 1) / n * nbytes
                for key, _, _ in variants:
                    r = row(nbytes, "allreduce_ pieced", t[key], t["raw"], bus,
                            key if isinstance(key, int) else None)
                    r["piece"] = bu.format_size(key) if isinstance(key, int) else key
                    if isinstance(key, str):
                        r["op"] = {"unpieced": "allreduce_ unpieced", "raw": "raw Allreduce IN_PLACE",
                                   "raw out-of-place": "raw Allreduce"}[key]
                    rows.append(r)
        finally:
            buffers.set_piece_bytes(old)
        return rows


def row(nbytes, op, mine, raw, bus_bytes, piece):
    (mine, mine_faults), (raw, raw_faults) = mine, raw
    m, r = float(numpy.median(mine)), float(numpy.median(raw))
    return {"bytes": nbytes, "size": bu.format_size(nbytes), "op": op, "piece_bytes": piece,
            "mpidp_us": m * 1e6, "mpidp_min_us": float(mine.min()) * 1e6,
            "mpi4py_us": r * 1e6, "mpi4py_min_us": float(raw.min()) * 1e6, "ratio": m / r,
            "mpidp_busbw": bus_bytes / m / 1e9, "mpi4py_busbw": bus_bytes / r / 1e9,
            "mpidp_faults": mine_faults, "mpi4py_faults": raw_faults,
            "mpidp_iters": len(mine), "mpi4py_iters": len(raw)}


def summary(rows, check_us):
    """Lines: small-message overhead, cost of the check, and the >= 1 MiB allreduce target."""
    by = {}
    for r in rows:
        by.setdefault(r["op"], []).append(r)
    out = ["small-message overhead, 4 B - 1 KiB (median over sizes of mpidp - mpi4py, and ratio):"]
    for op, rs in by.items():
        small = [r for r in rs if r["bytes"] <= 1024]
        if small:
            d = numpy.median([r["mpidp_us"] - r["mpi4py_us"] for r in small])
            q = numpy.median([r["ratio"] for r in small])
            out.append(f"  {op:22s} +{d:6.1f} us  ({q:.1f}x)")
    on = {r["bytes"]: r["mpidp_us"] for r in by.get("allreduce", [])}
    off = {r["bytes"]: r["mpidp_us"] for r in by.get("allreduce check off", [])}
    diff = [on[b] - off[b] for b in on if b in off and b <= 64 << 10]
    if diff:
        out.append(f"mismatch check: {numpy.median(diff):.1f} us per call (allreduce check on - off, "
                   f"median 4 B - 64 KiB); check.agree alone {check_us:.1f} us")
    out += targets(by)
    big = [r for r in by.get("allreduce", []) if r["bytes"] >= 1 << 20]
    if big:
        slow = [f"{r['size']} ({r['ratio']:.2f}x)" for r in big if r["ratio"] > 1.0]
        out.append("target, allreduce (check on) >= 1 MiB at least as fast as comm.Allreduce: " +
                   ("met at every size" if not slow else "NOT met at " + ", ".join(slow)))
    for op in ("allreduce", "allreduce_ in place", "reducescatter"):
        rs = [r for r in by.get(op, []) if r["bytes"] >= 1 << 20]
        if rs:
            out.append(f"  {op} / mpi4py, >= 1 MiB: " + ", ".join(f"{r['size']} {r['ratio']:.2f}" for r in rs))
    return out


def targets(by):
    """Lines: issue 21's small-message targets, 4 B - 64 KiB, met or not at each size (ratios of medians)."""
    def small(op):
        return {r["bytes"]: r for r in by.get(op, []) if r["bytes"] <= 64 << 10}

    def line(label, ratios, limit):
        if not ratios:
            return []
        bad = [f"{bu.format_size(b)} {q:.2f}x" for b, q in ratios.items() if q > limit]
        worst = max(ratios.values())
        return [f"  {label} <= {limit:g}x: " + ("met at every size" if not bad else "NOT met at " + ", ".join(bad))
                + f" (worst {worst:.2f}x)"]

    out = ["issue 21 targets, 4 B - 64 KiB (median / median):"]
    out += line("allreduce, check on / comm.Allreduce", {b: r["ratio"] for b, r in small("allreduce").items()}, 2.0)
    out += line("allreduce, check off / comm.Allreduce",
                {b: r["ratio"] for b, r in small("allreduce check off").items()}, 1.2)
    outp, inp = small("allreduce"), small("allreduce_ in place")
    out += line("allreduce_ in place / mpidp out of place (as fast: within 5%)",
                {b: inp[b]["mpidp_us"] / outp[b]["mpidp_us"] for b in inp if b in outp}, 1.05)
    out += line("allreduce_async + synchronize of 4 B / comm.Allreduce",
                {b: r["ratio"] for b, r in small("allreduce_async + synchronize").items() if b == 4}, 3.0)
    return out


def recommend(rows, default, over):
    """Lines naming the piece size with the lowest geometric-mean time relative to each size's best."""
    pieced = [r for r in rows if r["op"] == "allreduce_ pieced"]
    best = {}
    for r in pieced:
        best[r["bytes"]] = min(best.get(r["bytes"], float("inf")), r["mpidp_us"])
    score = {}
    for r in pieced:
        score.setdefault(r["piece_bytes"], []).append(r["mpidp_us"] / best[r["bytes"]])
    geo = {p: float(numpy.exp(numpy.mean(numpy.log(v)))) for p, v in score.items()}
    win = min(geo, key=geo.get)
    out = ["piece size, time relative to the best piece at each size (geometric mean over 4/16/64 MiB):",
           "  " + ", ".join(f"{bu.format_size(p)} {g:.2f}" for p, g in sorted(geo.items()))]
    for b in sorted(best):
        at = {r["piece_bytes"]: r for r in pieced if r["bytes"] == b}
        raw = next(r for r in rows if r["bytes"] == b and r["op"] == "raw Allreduce IN_PLACE")
        unp = next(r for r in rows if r["bytes"] == b and r["op"] == "allreduce_ unpieced")
        fastest = min(at.values(), key=lambda r: r["mpidp_us"])
        out.append(f"  {bu.format_size(b)}: fastest piece {fastest['piece']} {fastest['mpidp_us']:.0f} us; "
                   f"{bu.format_size(win)} {at[win]['mpidp_us']:.0f} us; default "
                   f"{bu.format_size(default)} {at[default]['mpidp_us']:.0f} us; unpieced "
                   f"{unp['mpidp_us']:.0f} us; raw in place {raw['mpidp_us']:.0f} us")
    out.append(f"recommendation: DEFAULT_PIECE_BYTES = {win} ({bu.format_size(win)}) on this machine "
               f"(default now {bu.format_size(default)}, scoring {geo.get(default, float('nan')):.2f})" +
               ("; oversubscribed run: choose the default from an np <= cores run" if over else ""))
    return out


def make_plot(path, rows, n, over):
    pairs = [("allreduce", "C0"), ("allreduce check off", "C1"), ("allreduce_ in place", "C2"),
             ("allreduce_async + synchronize", "C6"),
             ("allgather", "C3"), ("broadcast_", "C4"), ("reducescatter", "C5")]
    raw_names = {"allreduce": "comm.Allreduce", "allreduce_ in place": "comm.Allreduce(IN_PLACE)",
                 "allgather": "comm.Allgatherv", "broadcast_": "comm.Bcast",
                 "reducescatter": "comm.Reduce_scatter"}
    lat, bw = [], []
    for op, color in pairs:
        rs = [r for r in rows if r["op"] == op]
        xs = [r["bytes"] for r in rs]
        for key, label, style in [("mpidp", f"mpidp.{op}", {"color": color, "marker": "o", "ms": 3}),
                                  ("mpi4py", raw_names.get(op), {"color": color, "ls": "--", "alpha": 0.7})]:
            if label is None:
                continue
            lat.append((label, xs, [r[f"{key}_us"] for r in rs], style))
            bw.append((label, xs, [r[f"{key}_busbw"] for r in rs], style))
    title = f"mpidp vs mpi4py, {n} ranks" + (" (oversubscribed)" if over else "") + \
        ", float32 Sum, median per call, max over ranks"
    return bu.plot(path, [("latency (us)", lat), ("bus bandwidth (GB/s)", bw)], title=title)


if __name__ == "__main__":
    main()
