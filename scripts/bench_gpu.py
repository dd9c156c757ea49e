"""GPU benchmarks for scripts/gpu_check.sh: one section per run, CSV + PNG + JSON under --out.

    python scripts/bench_gpu.py staging --out OUT                 # pinned vs pageable vs mpidp staging
    mpiexec -n 2 python scripts/bench_gpu.py collectives --out OUT  # CuPy vs NumPy collectives
    mpiexec -n 2 python scripts/bench_gpu.py train --out OUT        # CNN and transformer samples/s
    python scripts/bench_gpu.py offload --out OUT                 # OffloadManager copies vs pinned memcpy
    mpiexec -n 2 python scripts/bench_gpu.py timeline --out OUT     # one traced training step (JSON + PNG)
    mpiexec -n 2 python scripts/bench_gpu.py env --out OUT          # versions, device binding, cuda_aware()

Every section takes ``--device gpu`` (the default; exits 2 with the reason when
CuPy sees no CUDA device) or ``--device cpu`` (the same code on NumPy, for
checking the plumbing on a machine without a GPU: its figures are no GPU
result), and ``--quick`` (tiny sizes). Each writes ``OUT/<section>.json``:
{"section", "device", "ranks", "rows", "targets": [{"name", "measured",
"target", "met"}], "notes"}, which scripts/gpu_summary.py turns into the
summary table. Sizes are chosen so that all sections together take about two
minutes on one H100 (each one has a time budget, ``--budget`` seconds).
"""
import argparse
import json
import os
import sys
import time

import numpy

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _benchutil as bu  # noqa: E402

SECTIONS = ("env", "staging", "collectives", "train", "offload", "timeline")
BUDGETS = {"env": 0, "staging": 20, "collectives": 30, "train": 8, "offload": 25, "timeline": 0}
STAGING_TARGET = OFFLOAD_BW_TARGET = 0.8
HIDDEN_TARGET = 0.7
MB = 1 << 20


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("section", choices=SECTIONS)
    p.add_argument("--out", required=True, help="folder for this section's JSON, CSV and PNG")
    p.add_argument("--device", choices=["gpu", "cpu"], default="gpu",
                   help="gpu (CuPy; the default) or cpu (NumPy stand-in: checks the plumbing, measures no GPU)")
    p.add_argument("--quick", action="store_true", help="tiny sizes: seconds, for checking the plumbing")
    p.add_argument("--budget", type=float, default=None,
                   help="seconds this section may spend measuring (default per section)")
    p.add_argument("--models", default="cnn,transformer", help="train: comma-separated models")
    args = p.parse_args(argv)
    if args.budget is None:
        args.budget = BUDGETS[args.section] * (0.1 if args.quick else 1.0)
    if args.budget < 0:
        p.error(f"--budget must be >= 0 seconds, got {args.budget}")
    return args


# -- shared helpers ---------------------------------------------------------------------------------

def array_module(device):
    """numpy, or cupy when a CUDA device is usable (exit 2 with the reason otherwise)."""
    if device == "cpu":
        return numpy
    from mpidp.backend import cupy_module
    cp = cupy_module()
    if cp is None:
        reason = "cupy is not installed"
        try:
            import cupy
            reason = f"cupy {cupy.__version__} imports but sees no CUDA device (cupy.is_available() is False)"
        except ImportError:
            pass
        sys.exit(f"bench_gpu: --device gpu needs cupy and a CUDA device: {reason}; use --device cpu to check "
                 f"the plumbing without a GPU")
    return cp


def sync(xp):
    """Wait for everything queued on the device (no-op on NumPy)."""
    if xp is not numpy:
        xp.cuda.Device().synchronize()


def median_seconds(fn, xp, budget_s, lo=3, hi=200):
    """Median seconds of ``fn()`` (synchronised), repeated for about ``budget_s`` after one warm-up call."""
    fn()
    sync(xp)
    times, spent = [], 0.0
    while len(times) < lo or (spent < budget_s and len(times) < hi):
        t0 = time.perf_counter()
        fn()
        sync(xp)
        times.append(time.perf_counter() - t0)
        spent += times[-1]
    return float(numpy.median(times))


def target(name, measured, goal):
    """One target line: measured >= goal."""
    measured = None if measured is None or not numpy.isfinite(measured) else float(measured)
    return {"name": name, "measured": measured, "target": goal, "met": measured is not None and measured >= goal}


def geomean(values):
    values = [v for v in values if v and numpy.isfinite(v) and v > 0]
    return float(numpy.exp(numpy.mean(numpy.log(values)))) if values else None


def write_result(args, section, rows, targets=(), notes=(), ranks=1, stem=None, **extra):
    """OUT/<stem>.json (what the summary reads) and OUT/<stem>.csv."""
    stem = stem or section
    doc = {"section": section, "device": args.device, "quick": args.quick, "ranks": ranks, "rows": rows,
           "targets": list(targets), "notes": list(notes), **extra}
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, f"{stem}.json"), "w") as f:
        json.dump(doc, f, indent=1, default=float)
    if rows:
        bu.write_csv(os.path.join(args.out, f"{stem}.csv"), rows)
    return doc


def print_targets(targets):
    for t in targets:
        got = "-" if t["measured"] is None else f"{t['measured']:.3f}"
        print(f"  target {t['name']}: {got} (>= {t['target']}) {'met' if t['met'] else 'NOT met'}")


def pyplot():
    """matplotlib.pyplot with the Agg backend, or None (with a note) when it is not installed."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        return plt
    except ImportError:
        print("note: matplotlib is not installed; no PNG (pip install matplotlib)")
        return None


# -- env: versions, binding, CUDA-awareness ---------------------------------------------------------

def section_env(args, xp):
    import mpidp
    from mpi4py import MPI
    from mpidp.comm import runtime
    mpidp.init()
    aware, how = mpidp.cuda_aware(verbose=True)
    mine = {"rank": mpidp.rank(), "local_rank": mpidp.local_rank(), "bound_device": runtime.device(),
            "cuda_aware": aware, "cuda_aware_how": how, "pid": os.getpid()}
    if xp is not numpy:
        props = xp.cuda.runtime.getDeviceProperties(xp.cuda.Device().id)
        free, total = xp.cuda.runtime.memGetInfo()
        name = props["name"]
        mine.update(current_device=xp.cuda.Device().id, device_count=xp.cuda.runtime.getDeviceCount(),
                    device_name=name.decode() if isinstance(name, bytes) else str(name),
                    device_memory_gib=round(total / 2 ** 30, 1),
                    free_memory_gib=round(free / 2 ** 30, 1))
    ranks = mpidp.allgather_object(mine)
    if mpidp.rank() == 0:
        info = {"python": sys.version.split()[0], "numpy": numpy.__version__, "mpidp": mpidp.__version__,
                "mpi4py": __import__("mpi4py").__version__,
                "mpi_library": MPI.Get_library_version().splitlines()[0].strip("\0 "),
                "mpi_vendor": list(MPI.get_vendor())}
        if xp is not numpy:
            info.update(cupy=xp.__version__, cuda_runtime=xp.cuda.runtime.runtimeGetVersion(),
                        cuda_driver=xp.cuda.runtime.driverGetVersion())
        notes = [f"rank {r['rank']}: local rank {r['local_rank']}, bound to device {r['bound_device']}, "
                 f"cuda_aware={r['cuda_aware']} ({r['cuda_aware_how']})" for r in ranks]
        for line in [f"{k}: {v}" for k, v in info.items()] + notes:
            print(line)
        write_result(args, "env", ranks, notes=notes, ranks=len(ranks), info=info)
    mpidp.shutdown()


# -- staging: pinned vs pageable vs mpidp's pooled staging buffers ----------------------------------

def section_staging(args, xp):
    os.environ["MPIDP_CUDA_AWARE"] = "0"  # measure the staging path even under a CUDA-aware MPI
    import mpidp
    from mpidp.backend import pinned
    from mpidp.comm._buffers import Staged
    mpidp.init()
    sizes = bu.sizes(4 << 10, 1 * MB, 4) if args.quick else bu.sizes(64 << 10, 256 * MB, 4)
    per = args.budget / len(sizes) / 7
    rows = []
    for n in sizes:
        dev = xp.ones(n, dtype=numpy.uint8)
        pin = pinned.empty_pinned(n)
        page = numpy.ones(n, dtype=numpy.uint8)  # touched: the copies do not measure page faults

        if xp is numpy:
            h2d = lambda h: numpy.copyto(dev, h)  # noqa: E731
            d2h = lambda h: numpy.copyto(h, dev)  # noqa: E731
        else:
            h2d = lambda h: dev.set(h)  # noqa: E731
            d2h = lambda h: dev.get(out=h)  # noqa: E731

        def staged():
            Staged(dev).finish()  # what a collective on a device array does: to pooled pinned and back

        t = {"pinned_h2d": median_seconds(lambda: h2d(pin), xp, per),
             "pinned_d2h": median_seconds(lambda: d2h(pin), xp, per),
             "pageable_h2d": median_seconds(lambda: h2d(page), xp, per),
             "pageable_d2h": median_seconds(lambda: d2h(page), xp, per),
             "staged": median_seconds(staged, xp, 2 * per)}
        pinned_rt = t["pinned_h2d"] + t["pinned_d2h"]
        pageable_rt = t["pageable_h2d"] + t["pageable_d2h"]
        row = {"bytes": n, "size": bu.format_size(n)}
        for k in ("pinned_h2d", "pinned_d2h", "pageable_h2d", "pageable_d2h"):
            row[f"{k}_gbps"] = n / t[k] / 1e9
        row["pinned_roundtrip_gbps"] = 2 * n / pinned_rt / 1e9
        row["pageable_roundtrip_gbps"] = 2 * n / pageable_rt / 1e9
        row["staged_roundtrip_gbps"] = 2 * n / t["staged"] / 1e9
        row["staged_vs_pinned"] = pinned_rt / t["staged"]
        row["pageable_vs_pinned"] = pinned_rt / pageable_rt
        rows.append(row)
        del dev
    big = [r["staged_vs_pinned"] for r in rows if r["bytes"] >= 16 * MB] or [rows[-1]["staged_vs_pinned"]]
    goal = target("staging through the pinned pool / pinned memcpy (round trip, geometric mean from 16 MiB)",
                  geomean(big), STAGING_TARGET)
    notes = []
    if xp is numpy:
        notes.append("CPU stand-in: host arrays are never staged, so 'staged' is no copy at all; not a GPU figure")
    columns = [("size", "size", ""), ("pinned_h2d_gbps", "pinned H2D GB/s", ".2f"),
               ("pinned_d2h_gbps", "pinned D2H GB/s", ".2f"), ("pageable_h2d_gbps", "pageable H2D", ".2f"),
               ("pageable_d2h_gbps", "pageable D2H", ".2f"), ("staged_roundtrip_gbps", "mpidp staged GB/s", ".2f"),
               ("staged_vs_pinned", "staged/pinned", ".3f"), ("pageable_vs_pinned", "pageable/pinned", ".3f")]
    bu.print_table(rows, columns, title="staging: GB/s per direction; round trips move 2x the bytes")
    print_targets([goal])
    write_result(args, "staging", rows, [goal], notes)
    bu.plot(os.path.join(args.out, "staging.png"), [
        ("GB/s", [("pinned H2D", [r["bytes"] for r in rows], [r["pinned_h2d_gbps"] for r in rows], {"marker": "o"}),
                  ("pinned D2H", [r["bytes"] for r in rows], [r["pinned_d2h_gbps"] for r in rows], {"marker": "o"}),
                  ("pageable H2D", [r["bytes"] for r in rows], [r["pageable_h2d_gbps"] for r in rows],
                   {"marker": "x", "ls": "--"}),
                  ("pageable D2H", [r["bytes"] for r in rows], [r["pageable_d2h_gbps"] for r in rows],
                   {"marker": "x", "ls": "--"}),
                  ("mpidp staging (round trip)", [r["bytes"] for r in rows],
                   [r["staged_roundtrip_gbps"] for r in rows], {"marker": "s", "lw": 2})])],
        title=f"host<->device staging ({args.device})")
    mpidp.shutdown()


# -- collectives: CuPy vs NumPy through mpidp, raw mpi4py for reference -----------------------------

def section_collectives(args, xp):
    import mpidp
    from mpi4py import MPI
    mpidp.init()
    world, me, n = MPI.COMM_WORLD, mpidp.rank(), mpidp.size()
    sizes = bu.sizes(4 << 10, 256 << 10, 4) if args.quick else bu.sizes(4 << 10, 64 * MB, 4)
    ops = ("allreduce", "allgather", "broadcast_")
    per = args.budget / (len(sizes) * len(ops) * 3)
    rows = []
    for nbytes in sizes:
        count = nbytes // 4
        host = numpy.arange(count, dtype=numpy.float32) % 17 + me
        dev = xp.asarray(host)
        gathered = numpy.empty(count * n, dtype=numpy.float32)
        reduced = numpy.empty_like(host)
        variants = {
            "allreduce": (lambda: world.Allreduce(host, reduced, op=MPI.SUM),
                          lambda x: mpidp.allreduce(x, op=mpidp.Sum, name="bench")),
            "allgather": (lambda: world.Allgather(host, gathered),
                          lambda x: mpidp.allgather(x, name="bench")),
            "broadcast_": (lambda: world.Bcast(host, root=0),
                           lambda x: mpidp.broadcast_(x, root_rank=0, name="bench")),
        }
        for op in ops:
            raw, ours = variants[op]
            if op != "broadcast_":  # same values from the device and the host path, once per size
                want, got = ours(host), ours(dev)
                numpy.testing.assert_allclose(numpy.asarray(want), _host(got), rtol=1e-6,
                                              err_msg=f"{op} of {nbytes} bytes: CuPy result differs from NumPy")

            def on_device(ours=ours):
                ours(dev)
                sync(xp)

            row = {"op": op, "bytes": nbytes, "size": bu.format_size(nbytes), "ranks": n}
            for key, fn in (("raw_numpy_us", raw), ("mpidp_numpy_us", lambda ours=ours: ours(host)),
                            ("device_us", on_device)):
                iters = bu.auto_iters(fn, world, per, lo=3, hi=500)
                row[key] = 1e6 * float(numpy.median(bu.timeit(fn, world, iters, warmup=1)))
            row["device_vs_host"] = row["device_us"] / row["mpidp_numpy_us"]
            row["device_gbps"] = nbytes / row["device_us"] / 1e3
            rows.append(row)
        if me == 0:
            print(f"  {bu.format_size(nbytes)} done", file=sys.stderr, flush=True)
    if me == 0:
        columns = [("op", "op", ""), ("size", "size", ""), ("raw_numpy_us", "raw NumPy µs", ".1f"),
                   ("mpidp_numpy_us", "mpidp NumPy µs", ".1f"), ("device_us", f"mpidp {args.device} µs", ".1f"),
                   ("device_vs_host", "device/host", ".2f"), ("device_gbps", "device GB/s", ".2f")]
        bu.print_table(rows, columns, title=f"collectives at np={n}, float32, median µs per call (max over ranks)")
        notes = [f"np={n}: the ranks share the machine's GPU(s); a CuPy array is staged through pinned host "
                 f"memory unless the MPI is CUDA-aware ({mpidp.cuda_aware(verbose=True)[1]})"]
        if xp is numpy:
            notes.append("CPU stand-in: the 'device' column is NumPy again; not a GPU figure")
        write_result(args, "collectives", rows, notes=notes, ranks=n)
        panels = []
        for op in ops:
            sel = [r for r in rows if r["op"] == op]
            xs = [r["bytes"] for r in sel]
            panels.append((f"{op} µs per call", [
                ("raw mpi4py, NumPy", xs, [r["raw_numpy_us"] for r in sel], {"ls": "--", "color": "gray"}),
                ("mpidp, NumPy", xs, [r["mpidp_numpy_us"] for r in sel], {"marker": "o"}),
                (f"mpidp, {'CuPy' if xp is not numpy else 'NumPy (stand-in)'}", xs, [r["device_us"] for r in sel],
                 {"marker": "s"})]))
        bu.plot(os.path.join(args.out, "collectives.png"), panels, title=f"collectives, np={n}, float32")
    mpidp.shutdown()


def _host(x):
    from mpidp.backend import asnumpy
    return asnumpy(x)


# -- training throughput ----------------------------------------------------------------------------

def model_configs(quick):
    """name -> (builder(device), per-rank batch, make_batch(rng, batch) -> (x, y) NumPy)."""
    from mpidp import models
    if quick:
        cnn = dict(in_channels=3, image_size=8, num_classes=10, channels=(4, 8))
        tfm = dict(vocab_size=32, seq_len=8, embed_dim=16, num_heads=2, num_layers=1)
        batches = {"cnn": 8, "transformer": 4}
    else:  # sized for a GPU: big enough that kernels, not Python, set the pace
        cnn = dict(in_channels=3, image_size=32, num_classes=10, channels=(64, 128))
        tfm = dict(vocab_size=256, seq_len=128, embed_dim=256, num_heads=4, num_layers=4)
        batches = {"cnn": 128, "transformer": 16}

    def images(rng, b):
        x = rng.standard_normal((b, cnn["in_channels"], cnn["image_size"], cnn["image_size"])).astype(numpy.float32)
        return x, rng.integers(0, cnn["num_classes"], b)

    def tokens(rng, b):
        ids = rng.integers(0, tfm["vocab_size"], (b, tfm["seq_len"] + 1))
        return ids[:, :-1], ids[:, 1:]

    return {"cnn": (lambda device: models.cnn(seed=0, device=device, **cnn), batches["cnn"], images),
            "transformer": (lambda device: models.transformer(seed=0, device=device, **tfm),
                            batches["transformer"], tokens)}


def training_step(name, args, xp, trace=False):
    """(model, step function) of one DistributedOptimizer training step of model ``name`` on synthetic data."""
    import mpidp
    from mpidp import nn, optim, timeline
    build, batch, make = model_configs(args.quick)[name]
    model = build(args.device)
    mpidp.broadcast_parameters(model, root_rank=0)
    opt = mpidp.DistributedOptimizer(optim.SGD(model.parameters(), lr=0.01, momentum=0.9), model=model)
    rng = numpy.random.default_rng(mpidp.rank())
    x, y = (xp.asarray(a) for a in make(rng, batch))
    crit = nn.CrossEntropyLoss()

    def step():
        with timeline.span("step", "compute", model=name):
            opt.zero_grad()
            with timeline.span("forward", "compute"):
                crit(model(x), y)
            with timeline.span("backward", "compute"):
                model.backward(crit.backward())
            opt.step()
            with timeline.span("device sync", "wait"):  # spans are host time: kernels still queued end here
                sync(xp)

    return model, opt, batch, step


def section_train(args, xp):
    import mpidp
    from mpi4py import MPI
    mpidp.init()
    world, n = MPI.COMM_WORLD, mpidp.size()
    names = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = sorted(set(names) - {"cnn", "transformer"})
    if unknown:
        sys.exit(f"bench_gpu: unknown model(s) {unknown} in --models; use cnn and/or transformer")
    rows = []
    for name in names:
        model, opt, batch, step = training_step(name, args, xp)
        step()  # warm-up: kernels compiled, buffers allocated
        iters = bu.auto_iters(step, world, args.budget / len(names), lo=3, hi=200)
        times = bu.timeit(step, world, iters, warmup=1)
        ms = 1e3 * float(numpy.median(times))
        rows.append({"model": name, "device": args.device, "ranks": n, "batch_per_rank": batch,
                     "parameters": model.num_parameters(), "steps": iters, "step_ms": ms,
                     "samples_per_s": n * batch / (ms / 1e3), "hidden_communication": opt.hidden_fraction()})
        if mpidp.rank() == 0:
            print(f"  {name} on {args.device} at np={n}: {ms:.2f} ms per step, "
                  f"{rows[-1]['samples_per_s']:,.0f} samples/s", flush=True)
    if mpidp.rank() == 0:
        notes = ["synthetic data already on the device (no loader); SGD with momentum, DistributedOptimizer; "
                 "samples/s over all ranks from the median step time (max over ranks)"]
        write_result(args, "train", rows, notes=notes, ranks=n, stem=f"train_{args.device}_np{n}")
        combine_train(args.out)
    mpidp.shutdown()


def combine_train(out):
    """train.csv and train.png from every train_<device>_np<N>.json in ``out``."""
    rows = []
    for fname in sorted(os.listdir(out)):
        if fname.startswith("train_") and fname.endswith(".json"):
            with open(os.path.join(out, fname)) as f:
                rows += json.load(f)["rows"]
    if not rows:
        return
    bu.write_csv(os.path.join(out, "train.csv"), rows)
    bu.print_table(rows, [("model", "model", ""), ("device", "device", ""), ("ranks", "np", "d"),
                          ("batch_per_rank", "batch/rank", "d"), ("step_ms", "ms/step", ".2f"),
                          ("samples_per_s", "samples/s", ",.0f"), ("hidden_communication", "comm hidden", ".0%")],
                   title="training throughput")
    plt = pyplot()
    if plt is None:
        return
    models = sorted({r["model"] for r in rows})
    runs = sorted({(r["device"], r["ranks"]) for r in rows})
    fig, axes = plt.subplots(1, len(models), figsize=(5 * len(models), 4), squeeze=False)
    for ax, m in zip(axes[0], models):
        labels, values = [], []
        for device, ranks in runs:
            hit = [r for r in rows if r["model"] == m and r["device"] == device and r["ranks"] == ranks]
            if hit:
                labels.append(f"{device} np={ranks}")
                values.append(hit[0]["samples_per_s"])
        ax.bar(labels, values, color=["tab:blue" if "gpu" in lab else "tab:gray" for lab in labels])
        ax.set_title(m)
        ax.set_ylabel("samples/s")
        ax.set_yscale("log")
    fig.tight_layout()
    fig.savefig(os.path.join(out, "train.png"), dpi=110)
    plt.close(fig)


# -- offload: prefetch bandwidth and hidden copy time -----------------------------------------------

def section_offload(args, xp):
    from mpidp import nn
    from mpidp.backend import pinned
    from mpidp.offload import OffloadManager
    width, layers = (256, 4) if args.quick else (4096, 8)
    batches = (16, 64) if args.quick else (512, 2048, 8192)
    rows = []
    for batch in batches:
        rng = numpy.random.default_rng(0)
        mods = []
        for _ in range(layers):
            mods += [nn.Linear(width, width, rng=rng), nn.ReLU()]
        model = nn.Sequential(*mods).to(args.device)
        threshold = width * width * 4  # every weight matrix is offloaded, biases stay on the device
        budget = 3 * OffloadManager.required_budget(model, threshold)  # room for the layer in use + prefetch
        mgr = OffloadManager(model, device_budget_bytes=budget, threshold_bytes=threshold, prefetch=1,
                             copies=None if xp is not numpy else "thread")
        x = xp.asarray(rng.standard_normal((batch, width)).astype(numpy.float32))
        dy = xp.ones((batch, width), dtype=numpy.float32)

        def step():
            model.zero_grad()
            model(x)
            model.backward(dy)
            sync(xp)

        step()
        step()  # the second pass follows the recorded order: prefetch is on from here
        mgr.reset_statistics()
        t0, steps = time.perf_counter(), 0
        while steps < 3 or (time.perf_counter() - t0 < args.budget / len(batches) / 2 and steps < 50):
            step()
            steps += 1
        step_s = (time.perf_counter() - t0) / steps
        s = mgr.statistics()
        hosts = [mgr.host_array(p) for p in model.parameters() if mgr.is_offloaded(p)]
        plain = plain_h2d_gbps(xp, hosts, pinned)
        rows.append({"batch": batch, "width": width, "layers": layers, "offloaded_mb": s["host_bytes"] / MB,
                     "budget_mb": budget / MB, "steps": steps, "step_ms": 1e3 * step_s,
                     "h2d_mb_per_step": s["h2d_bytes"] / steps / MB, "h2d_copy_ms_per_step": 1e3 * s["h2d_s"] / steps,
                     "exposed_ms_per_step": 1e3 * s["exposed_s"] / steps, "prefetch_h2d_gbps": s["h2d_gbps"],
                     "plain_pinned_h2d_gbps": plain, "prefetch_vs_plain": s["h2d_gbps"] / plain if plain else None,
                     "hidden_fraction": s["hidden_fraction"], "prefetch_hits": s["prefetch_hits"],
                     "demand_fetches": s["demand_fetches"], "copies": s["copies"]})
        mgr.close()
        del model, mgr, x, dy
        if xp is not numpy:
            xp.get_default_memory_pool().free_all_blocks()
    best = rows[-1]  # the most compute per copied byte: whether copies can hide at all
    targets = [target(f"offload prefetch H2D / plain pinned memcpy (batch {best['batch']})",
                      best["prefetch_vs_plain"], OFFLOAD_BW_TARGET),
               target(f"offload copy time hidden behind compute (batch {best['batch']})",
                      best["hidden_fraction"], HIDDEN_TARGET)]
    notes = [f"{layers} x Linear({width}, {width}) float32, every weight offloaded to pinned host memory, budget "
             f"3x the smallest that works, prefetch=1; forward + backward per step; the targets are judged at the "
             f"largest batch (most compute per copied byte)"]
    if xp is numpy:
        notes.append("CPU stand-in: 'device' copies are numpy.copyto on a copy thread; not a GPU figure")
    bu.print_table(rows, [("batch", "batch", "d"), ("step_ms", "ms/step", ".2f"),
                          ("h2d_copy_ms_per_step", "H2D ms/step", ".2f"),
                          ("exposed_ms_per_step", "exposed ms", ".2f"), ("prefetch_h2d_gbps", "prefetch GB/s", ".2f"),
                          ("plain_pinned_h2d_gbps", "pinned memcpy GB/s", ".2f"),
                          ("prefetch_vs_plain", "ratio", ".3f"), ("hidden_fraction", "hidden", ".0%")],
                   title="offload: host->device prefetch against a plain pinned copy")
    print_targets(targets)
    write_result(args, "offload", rows, targets, notes)
    plt = pyplot()
    if plt is not None:
        fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
        xs = [str(r["batch"]) for r in rows]
        a.bar([i - 0.2 for i in range(len(xs))], [r["prefetch_h2d_gbps"] for r in rows], 0.4, label="prefetch")
        a.bar([i + 0.2 for i in range(len(xs))], [r["plain_pinned_h2d_gbps"] for r in rows], 0.4,
              label="plain pinned memcpy")
        a.set_xticks(range(len(xs)), xs)
        a.set_xlabel("batch")
        a.set_ylabel("H2D GB/s")
        a.legend()
        b.bar(xs, [100 * r["hidden_fraction"] for r in rows])
        b.axhline(100 * HIDDEN_TARGET, color="red", ls="--", label="target")
        b.set_xlabel("batch")
        b.set_ylabel("% of H2D copy time hidden")
        b.set_ylim(0, 100)
        b.legend()
        fig.suptitle(f"OffloadManager, {layers} x {width}x{width} float32 ({args.device})")
        fig.tight_layout()
        fig.savefig(os.path.join(args.out, "offload.png"), dpi=110)
        plt.close(fig)


def plain_h2d_gbps(xp, hosts, pinned, reps=3):
    """GB/s of plain host->device copies of ``hosts`` (pinned) into one device buffer, in a row."""
    largest = max(h.nbytes for h in hosts)
    flat = [h.reshape(-1).view(numpy.uint8) for h in hosts]
    dev = xp.empty(largest, dtype=numpy.uint8)
    if xp is numpy:
        t0 = time.perf_counter()
        for _ in range(reps):
            for h in flat:
                numpy.copyto(dev[:h.nbytes], h)
        seconds = time.perf_counter() - t0
    else:
        stream = xp.cuda.Stream(non_blocking=True)
        dev[:flat[0].nbytes].set(flat[0], stream=stream)  # warm-up
        start, end = xp.cuda.Event(), xp.cuda.Event()
        start.record(stream)
        for _ in range(reps):
            for h in flat:
                dev[:h.nbytes].set(h, stream=stream)
        end.record(stream)
        end.synchronize()
        seconds = xp.cuda.get_elapsed_time(start, end) / 1e3
    return sum(h.nbytes for h in flat) * reps / seconds / 1e9


# -- timeline of one step ---------------------------------------------------------------------------

def section_timeline(args, xp):
    import mpidp
    from mpidp import timeline
    mpidp.init()
    path = os.path.join(args.out, "timeline_trace.json")
    timeline.start(path)
    _, _, _, step = training_step("transformer", args, xp)
    for _ in range(4):  # the first steps compile kernels and allocate; the last one is drawn
        step()
    timeline.save(path)
    timeline.stop()
    if mpidp.rank() == 0:
        with open(path) as f:
            doc = json.load(f)
        drawn = draw_step(doc, os.path.join(args.out, "timeline.png"), f"one transformer step ({args.device}, "
                          f"np={mpidp.size()})")
        write_result(args, "timeline", drawn, notes=[f"{path}: open in ui.perfetto.dev"], ranks=mpidp.size())
    mpidp.shutdown()


def draw_step(doc, png, title):
    """Draw the last 'step' span of rank 0 and every event overlapping it; returns per-category ms rows."""
    events = [e for e in doc["traceEvents"] if e.get("ph") == "X"]
    steps = [e for e in events if e["name"] == "step" and e["pid"] == 0]
    if not steps:
        raise SystemExit("bench_gpu: the timeline has no 'step' span on rank 0")
    last = steps[-1]
    lo, hi = last["ts"], last["ts"] + last["dur"]
    inside = [e for e in events if e["ts"] < hi and e["ts"] + e["dur"] > lo and e is not last
              and e["name"] != "step"]
    threads = {(e["pid"], e["tid"]): e["args"]["name"] for e in doc["traceEvents"]
               if e.get("ph") == "M" and e["name"] == "thread_name"}
    totals = {}
    for e in inside:
        key = (e["pid"], e.get("cat", ""))
        totals[key] = totals.get(key, 0.0) + (min(hi, e["ts"] + e["dur"]) - max(lo, e["ts"])) / 1e3
    rows = [{"rank": pid, "category": cat, "ms_in_step": ms, "step_ms": last["dur"] / 1e3}
            for (pid, cat), ms in sorted(totals.items())]
    plt = pyplot()
    if plt is None:
        return rows
    lanes = sorted({(e["pid"], e["tid"]) for e in inside} | {(last["pid"], last["tid"])})
    colors = {"compute": "tab:blue", "comm": "tab:orange", "copy": "tab:green", "wait": "tab:red",
              "optim": "tab:purple", "io": "tab:brown"}
    fig, ax = plt.subplots(figsize=(12, 1 + 0.6 * len(lanes)))
    for i, lane in enumerate(lanes):
        mine = sorted((e for e in inside if (e["pid"], e["tid"]) == lane), key=lambda e: -e["dur"])
        for e in mine:  # longest first, so nested spans draw on top of their parents
            ax.broken_barh([((e["ts"] - lo) / 1e3, e["dur"] / 1e3)], (i - 0.35, 0.7),
                           color=colors.get(e.get("cat"), "gray"), alpha=0.75)
    ax.set_yticks(range(len(lanes)), [f"rank {p} {threads.get((p, t), t)}" for p, t in lanes])
    ax.set_xlim(0, (hi - lo) / 1e3)
    ax.set_xlabel("ms since the step started (rank 0)")
    ax.legend(handles=[plt.Rectangle((0, 0), 1, 1, color=c, label=k) for k, c in colors.items()],
              loc="lower center", bbox_to_anchor=(0.5, 1.0), fontsize=7, ncol=6, frameon=False)
    ax.set_title(title, pad=22)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)
    return rows


RUN = {"env": section_env, "staging": section_staging, "collectives": section_collectives,
       "train": section_train, "offload": section_offload, "timeline": section_timeline}


def main(argv=None):
    args = parse_args(argv)
    xp = array_module(args.device)
    os.makedirs(args.out, exist_ok=True)
    RUN[args.section](args, xp)


if __name__ == "__main__":
    main()
