"""Peak memory and step time of the transformer under each memory saver, at np=2.

    mpiexec -n 2 python scripts/bench_memory.py            # table on stdout, CSV + PNG in docs/figures/

Configurations: baseline (float32, DistributedOptimizer, Adam), float16 with
dynamic loss scaling (amp; bfloat16 on a CPU, see --amp-dtype), ZeRO-1 and
ZeRO-2 (ShardedOptimizer), offload at two budgets (half of the offloaded bytes,
and the smallest budget that works; on a CPU also with the copy thread),
recomputation (nn.Checkpoint around every block), and all combined.

Memory is counted per rank from the arrays training owns, split into what
would sit in device memory (parameters, gradients, optimizer state incl.
float32 masters, activations at their peak, the offload manager's device
buffers) and what sits in the host tier (offloaded parameters, their
gradients and state). The process's peak RSS (VmHWM, reset before each
configuration) is reported too; it includes the interpreter and libraries.

The offload table shows bytes copied each way per step, the GB/s the
prefetcher achieved against a plain copy of the same size measured in the same
run (numpy.copyto on a CPU-only machine; a pinned cudaMemcpy on a GPU), and
the share of host->device copy time hidden behind compute.
"""
import argparse
import gc
import os
import sys
import time

for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")  # one BLAS thread per rank: ranks share the cores (override to change)

import numpy  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _benchutil as bu  # noqa: E402

import mpidp  # noqa: E402
from mpidp import amp, models, nn, optim  # noqa: E402
from mpidp.backend import asnumpy, cupy_module, gpu_available  # noqa: E402
from mpidp.offload import OffloadManager  # noqa: E402

CONFIGS = [
    ("baseline", {}),
    ("half+scaling", {"amp": True}),
    ("zero1", {"zero": 1}),
    ("zero2", {"zero": 2, "bucket_bytes": 1 << 20}),  # smaller buckets: fewer gradient bytes bound at once
    ("offload 50%", {"offload": 0.5}),
    ("offload min", {"offload": "min"}),
    ("offload 50% thread", {"offload": 0.5, "copies": "thread"}),  # CPU: copies on a thread (GPU: a stream)
    ("recompute", {"checkpoint": True}),
    ("all combined", {"amp": True, "zero": 1, "offload": 0.5, "checkpoint": True}),
]
CATEGORIES = ["params", "grads", "optimizer", "activations", "offload_buffers"]
MB = 1 << 20


def parse():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--vocab", type=int, default=128)
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--embed", type=int, default=256)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--batch", type=int, default=8, help="sequences per rank per step")
    p.add_argument("--steps", type=int, default=5, help="timed steps per configuration and round")
    p.add_argument("--rounds", type=int, default=3,
                   help="passes over all configurations; each row is the round with the best median step time")
    p.add_argument("--amp-dtype", default=None,
                   help="half dtype of the amp rows (default float16 on a GPU, bfloat16 on a CPU: NumPy has no "
                        "float16 matrix-multiply kernel, ~100x slower than float32; same bytes either way)")
    p.add_argument("--threshold", default="64K", help="offload parameters of at least this many bytes")
    p.add_argument("--only", default="", help="comma-separated configuration names to run")
    p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "..", "docs", "figures"))
    return p.parse_args()


# -- memory accounting ------------------------------------------------------------------------------

class Ledger:
    """Bytes per category, split between device and host by the share of offloaded elements."""

    def __init__(self):
        self.device = dict.fromkeys(CATEGORIES, 0.0)
        self.host = dict.fromkeys(CATEGORIES, 0.0)

    def add(self, category, nbytes, host_share=0.0):
        self.device[category] += nbytes * (1.0 - host_share)
        self.host[category] += nbytes * host_share


def host_shares(model, opt, mp, mgr):
    """id(parameter-like) -> share of its elements that belong to offloaded parameters."""
    share = {id(p): float(mgr is not None and mgr.is_offloaded(p)) for p in model.parameters()}
    for b in getattr(opt, "buckets", []):
        if hasattr(b, "shard"):  # ShardedOptimizer: a shard mixes the bucket's parameters
            off = sum(p.size for p in b.params if share[id(p)])
            share[id(b.shard)] = off / b.length
    if mp is not None:
        for p, m in mp.masters():
            share[id(m)] = share.get(id(p), 0.0)
    return share


def account(model, opt, mp, mgr, activation_peak):
    ledger = Ledger()
    share = host_shares(model, opt, mp, mgr)
    for p in model.parameters():
        ledger.add("params", p.nbytes, share[id(p)])
    sharded = isinstance(opt, mpidp.ShardedOptimizer)
    for b in opt.buckets:
        if sharded:
            s = share[id(b.shard)]
            full = b.padded * b.shard.data.itemsize
            ledger.add("grads", full if b.grad is not None else 0, s)
            if opt.stage == 2:  # stage 1's shard gradient is a view into the bucket
                ledger.add("grads", b.shard.grad.nbytes, s)
        else:
            for p in b.params:
                ledger.add("grads", p.nbytes, share[id(p)])
            if b.wire is not b.flat:
                ledger.add("grads", b.wire.nbytes)
    if sharded and opt.stage == 2:  # buffers live only during backward: their high-water mark
        ledger.add("grads", opt.stats["peak_grad_bytes"])
    inner = mp.optimizer if mp is not None else opt.optimizer
    for key, st in inner.state.items():
        for v in st.values():
            if hasattr(v, "nbytes"):
                ledger.add("optimizer", v.nbytes, share.get(id(key), 0.0))
    if mp is not None:
        for p, m in mp.masters():
            if m is not p:
                ledger.add("optimizer", m.nbytes, share.get(id(m), 0.0))
        ledger.add("optimizer", mp.master_bytes() - sum(m.nbytes for p, m in mp.masters() if m is not p))
    ledger.add("activations", activation_peak)
    if mgr is not None:
        ledger.add("offload_buffers", mgr.statistics()["peak_device_bytes"])
    return ledger


def activation_peak(model, step):
    """Run ``step`` once, sampling the activations the model keeps at the end of forward and before every
    module's backward (a recomputed block holds its activations only during its own backward)."""
    peak = [0]

    def sample(*_):
        peak[0] = max(peak[0], model.activation_bytes())
    hooks = [m.register_backward_pre_hook(sample) for m in model.modules()]
    hooks.append(model.register_forward_hook(sample))
    try:
        step()
    finally:
        for h in hooks:
            h.remove()
    return peak[0]


def reset_peak_rss():
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss():
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


# -- plain copies, the reference for the prefetcher's bandwidth -------------------------------------

def plain_copy_gbps(hosts, reps=3):
    """(host->device, device->host) GB/s of plain copies of the arrays ``hosts`` (the offloaded parameters)
    into one device buffer and back: pinned cudaMemcpy on a GPU, numpy.copyto on the CPU stand-in."""
    largest = max(h.nbytes for h in hosts)
    total = sum(h.nbytes for h in hosts) * reps
    cp = cupy_module()
    if cp is None:
        dev = numpy.empty(largest, numpy.uint8)
        flat = [h.reshape(-1).view(numpy.uint8) for h in hosts]
        out = []
        for direction in ("h2d", "d2h"):
            t0 = time.perf_counter()
            for _ in range(reps):
                for h in flat:
                    if direction == "h2d":
                        numpy.copyto(dev[:h.nbytes], h)
                    else:
                        numpy.copyto(h, dev[:h.nbytes])
            out.append(total / (time.perf_counter() - t0) / 1e9)
        return tuple(out)
    dev = cp.empty(largest, dtype=numpy.uint8)
    flat = [h.reshape(-1).view(numpy.uint8) for h in hosts]
    out = []
    for direction in ("h2d", "d2h"):
        start, end = cp.cuda.Event(), cp.cuda.Event()
        start.record()
        for _ in range(reps):
            for h in flat:
                if direction == "h2d":
                    dev[:h.nbytes].set(h)
                else:
                    dev[:h.nbytes].get(out=h)
        end.record()
        end.synchronize()
        out.append(total / (cp.cuda.get_elapsed_time(start, end) / 1e3) / 1e9)
    return tuple(out)


# -- one configuration ------------------------------------------------------------------------------

def build(args, cfg, device, threshold):
    size = mpidp.size()
    model = models.transformer(args.vocab, args.seq, embed_dim=args.embed, num_heads=args.heads,
                               num_layers=args.layers, checkpoint=cfg.get("checkpoint", False), seed=0,
                               device=device)
    opt = optim.Adam(model.parameters(), lr=1e-3)
    mp = mgr = None
    if cfg.get("amp"):
        mp = opt = amp.MixedPrecision(model, opt, dtype=args.amp_dtype, loss_scale="dynamic")
    if cfg.get("offload"):
        offloaded = sum(p.nbytes for p in model.parameters() if p.nbytes >= threshold)
        need = OffloadManager.required_budget(model, threshold)
        budget = need if cfg["offload"] == "min" else max(need, int(cfg["offload"] * offloaded))
        mgr = OffloadManager(model, device_budget_bytes=budget, threshold_bytes=threshold, prefetch=1,
                             copies=None if device == "gpu" else cfg.get("copies", "sync"))
    if cfg.get("zero"):
        opt = mpidp.ShardedOptimizer(opt, model=model, stage=cfg["zero"], bucket_bytes=cfg.get("bucket_bytes"))
    else:  # float16 sums of loss-scaled gradients: divide before the sum, as Horovod advises
        opt = mpidp.DistributedOptimizer(opt, model=model, gradient_predivide_factor=size if mp else 1.0)
    mpidp.broadcast_parameters(model, root_rank=0)
    return model, opt, mp, mgr


def run_config(args, name, cfg, device, threshold, comm):
    gc.collect()
    reset_peak_rss()
    model, opt, mp, mgr = build(args, cfg, device, threshold)
    xp = cupy_module() if device == "gpu" else numpy
    rng = numpy.random.default_rng(mpidp.rank())
    x = xp.asarray(rng.integers(0, args.vocab, (args.batch, args.seq)))
    y = xp.asarray(rng.integers(0, args.vocab, (args.batch, args.seq)))
    crit = nn.CrossEntropyLoss()

    def step():
        opt.zero_grad()
        crit(model(x), y)
        model.backward(crit.backward(mp.loss_scale if mp is not None else 1.0))
        opt.step()
        if xp is not numpy:
            xp.cuda.get_current_stream().synchronize()

    step()  # warm-up: buffers, optimizer state, the offload trace
    acts = activation_peak(model, step)
    if mgr is not None:
        mgr.reset_statistics()
    times = bu.timeit(step, comm, args.steps, warmup=0)
    ledger = account(model, opt, mp, mgr, acts)
    row = {"config": name, "step_ms": 1e3 * float(numpy.median(times))}
    for c in CATEGORIES:
        row[f"device_{c}_mb"] = ledger.device[c] / MB
    row["device_mb"] = sum(ledger.device.values()) / MB
    row["host_mb"] = sum(ledger.host.values()) / MB
    row["rss_mb"] = peak_rss() / MB
    row["skipped"] = mp.skipped_steps if mp is not None else 0
    copies = None
    if mgr is not None:
        s = mgr.statistics()
        steps = args.steps
        copies = {"config": name, "budget_mb": s["budget_bytes"] / MB, "peak_device_mb": s["peak_device_bytes"] / MB,
                  "h2d_mb_per_step": s["h2d_bytes"] / steps / MB, "d2h_mb_per_step": s["d2h_bytes"] / steps / MB,
                  "h2d_gbps": s["h2d_gbps"], "d2h_gbps": s["d2h_gbps"], "copy_ms_per_step": 1e3 * s["copy_s"] / steps,
                  "exposed_ms_per_step": 1e3 * s["exposed_s"] / steps, "hidden_pct": 100 * s["hidden_fraction"],
                  "prefetch_hits": s["prefetch_hits"], "copies": s["copies"]}
        hosts = [mgr.host_array(p) for p in model.parameters() if mgr.is_offloaded(p)]
        saved = [h.copy() for h in hosts]  # the d2h timing writes into them
        copies["plain_h2d_gbps"], copies["plain_d2h_gbps"] = plain_copy_gbps(hosts)
        for h, v in zip(hosts, saved):
            h[...] = v
        mgr.close()
    # the numbers of the rank that needed the most
    keys = [k for k in row if k not in ("config",)]
    worst = mpidp.allreduce(numpy.array([float(row[k]) for k in keys]), op=mpidp.Max, name=f"bench.{name}")
    row.update({k: float(v) for k, v in zip(keys, asnumpy(worst))})
    row["skipped"] = int(row["skipped"])
    return row, copies


def chart(path, rows, title):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"note: matplotlib is not installed; skipped {path} (pip install matplotlib)")
        return False
    names = [r["config"] for r in rows]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 4.6), gridspec_kw={"width_ratios": [3, 2]})
    left = numpy.zeros(len(rows))
    colors = ["#4c72b0", "#dd8452", "#55a868", "#c44e52", "#8172b3"]
    for c, color in zip(CATEGORIES, colors):
        vals = numpy.array([r[f"device_{c}_mb"] for r in rows])
        ax1.barh(names, vals, left=left, color=color, label=c.replace("_", " "))
        left += vals
    ax1.barh(names, [r["host_mb"] for r in rows], left=left, color="#cccccc", hatch="//", label="host tier")
    ax1.invert_yaxis()
    ax1.set_xlabel("MB per rank (device, then host tier)")
    ax1.legend(fontsize=7, loc="lower right")
    ax1.grid(axis="x", alpha=0.3)
    ax2.barh(names, [r["step_ms"] for r in rows], color="#64b5cd")
    ax2.invert_yaxis()
    ax2.set_yticklabels([])
    ax2.set_xlabel("step time (ms, median, slowest rank)")
    ax2.grid(axis="x", alpha=0.3)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def main():
    args = parse()
    mpidp.init()
    from mpi4py import MPI
    comm = MPI.COMM_WORLD
    rank, size = mpidp.rank(), mpidp.size()
    device = "gpu" if gpu_available() else "cpu"
    threshold = bu.parse_size(args.threshold)
    args.amp_dtype = args.amp_dtype or ("float16" if device == "gpu" else "bfloat16")
    half = {"float16": "fp16", "bfloat16": "bf16"}.get(args.amp_dtype, args.amp_dtype)
    only = set(filter(None, args.only.split(",")))
    configs = [(name.replace("half", half), cfg) for name, cfg in CONFIGS if not only or name in only]
    rows, copy_rows = {}, {}
    for _ in range(args.rounds):  # interleaved rounds: load from other processes hits every row alike
        for name, cfg in configs:
            row, copies = run_config(args, name, cfg, device, threshold, comm)
            if name not in rows or row["step_ms"] < rows[name]["step_ms"]:  # keep the quietest round
                rows[name], copy_rows[name] = row, copies
    rows = list(rows.values())
    copy_rows = [c for c in copy_rows.values() if c]
    if rank != 0:
        return
    base = next((r for r in rows if r["config"] == "baseline"), rows[0])
    for r in rows:
        r["device_vs_base"] = r["device_mb"] / base["device_mb"]
        r["time_vs_base"] = r["step_ms"] / base["step_ms"]
    n_params = models.transformer(args.vocab, args.seq, embed_dim=args.embed, num_heads=args.heads,
                                  num_layers=args.layers).num_parameters()
    title = (f"transformer E={args.embed} L={args.layers} T={args.seq} V={args.vocab} ({n_params / 1e6:.2f}M params), "
             f"batch {args.batch}/rank, np={size}, {device}, Adam, half={args.amp_dtype}")
    cols = [("config", "config", ""), ("device_mb", "device MB", ".1f"), ("device_vs_base", "x base", ".2f"),
            ("device_params_mb", "params", ".1f"), ("device_grads_mb", "grads", ".1f"),
            ("device_optimizer_mb", "optim", ".1f"), ("device_activations_mb", "activ", ".1f"),
            ("device_offload_buffers_mb", "offl buf", ".1f"), ("host_mb", "host MB", ".1f"),
            ("rss_mb", "peak RSS MB", ".0f"), ("step_ms", "step ms", ".1f"), ("time_vs_base", "x base", ".2f"),
            ("skipped", "skipped", "d")]
    bu.print_table(rows, cols, title=title)
    ccols = [("config", "config", ""), ("budget_mb", "budget MB", ".2f"), ("peak_device_mb", "peak MB", ".2f"),
             ("h2d_mb_per_step", "H2D MB/step", ".1f"), ("d2h_mb_per_step", "D2H MB/step", ".1f"),
             ("h2d_gbps", "H2D GB/s", ".1f"), ("plain_h2d_gbps", "plain H2D", ".1f"),
             ("d2h_gbps", "D2H GB/s", ".1f"), ("plain_d2h_gbps", "plain D2H", ".1f"),
             ("copy_ms_per_step", "copy ms/step", ".2f"), ("exposed_ms_per_step", "exposed ms", ".2f"),
             ("hidden_pct", "hidden %", ".0f"), ("copies", "copies", "")]
    if copy_rows:
        print()
        bu.print_table(copy_rows, ccols, title="offload copies per rank (rank 0); plain = plain copies of the same "
                                               "offloaded parameters, measured in the same run")
    out = os.path.abspath(args.out)
    os.makedirs(out, exist_ok=True)
    bu.write_csv(os.path.join(out, "bench_memory.csv"), rows)
    if copy_rows:
        bu.write_csv(os.path.join(out, "bench_memory_copies.csv"), copy_rows)
    chart(os.path.join(out, "bench_memory.png"), rows, title)
    with open(os.path.join(out, "bench_memory.md"), "w") as f:
        f.write(title + "\n\n" + bu.markdown_table(rows, cols) + "\n")
        if copy_rows:
            f.write("\n" + bu.markdown_table(copy_rows, ccols) + "\n")
    print(f"\nwrote {out}/bench_memory.csv, bench_memory.png, bench_memory.md")


if __name__ == "__main__":
    main()
