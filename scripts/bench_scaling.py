"""Weak scaling of a fixed training job: samples/s at np = 1, 2 and 4, mpidp against a hand-written loop.

    python scripts/bench_scaling.py                    # launches mpiexec -n 1, 2, 4 itself
    python scripts/bench_scaling.py --model cnn --np 1 2 --batch 32
    python scripts/bench_scaling.py --simulate-nodes 2x2 --link-rate 2gbit --depth 6 --batch 320

Each rank trains the same model on its own synthetic batches (a fixed per-rank
batch, so the global batch grows with np) for a fixed number of steps. Inside
one job four modes alternate round by round, so drift hits them alike; each
trains its own copy of the model with its own optimizer, built once: the
DistributedOptimizer with overlap on (bucket allreduces start from the
gradient-ready hooks during backward) and off (everything exchanged in
step()), the hand-written loop (every gradient into one buffer, one raw
Allreduce, divide) and no exchange at all (the inner optimizer alone: at np=1,
what the DistributedOptimizer costs with nothing to communicate). Reported per np
and mode: samples/s over all ranks (median of rounds), scaling efficiency
(samples/s at N / (N x samples/s at 1, same mode)), the share of
communication hidden behind backward (``opt.hidden_fraction()``), and
communication and waiting per step, and for overlap on the share of the
exchange that the overlap saved from the step: (step off - step on) /
communication per step off, a figure that does not trust the timers of an
exchange slowed down by the compute it runs beside. Every job runs one BLAS
thread per rank; np above the core count is marked oversubscribed. CSV and PNG
go to docs/figures/. ``--simulate-nodes``/``--link-rate`` run one job per repeat
through ``mpidprun`` on a simulated cluster (docs/cluster.md) instead of the
``--np`` list.
"""
import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy
from mpi4py import MPI

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _benchutil as bu  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
FIGURES = ROOT / "docs" / "figures"
_LAUNCHER_VARS = ("PMI_", "PMIX_", "HYDRA_", "OMPI_", "MPI_LOCAL", "PRTE_")
_ONE_THREAD = {v: "1" for v in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")}
MODES = ("on", "off", "hand", "none")
LABELS = {"on": "DistributedOptimizer, overlap on", "off": "DistributedOptimizer, overlap off",
          "hand": "hand-written flat Allreduce loop", "none": "no exchange (inner optimizer alone)"}
TABLE = [("np", "np", ""), ("note", "", ""), ("overlap", "mode", ""), ("samples_s", "samples/s", ".1f"),
         ("efficiency", "efficiency", ".0%"), ("hidden", "hidden", ".0%"), ("step_ms", "step ms", ".2f"),
         ("comm_ms", "comm ms/step", ".2f"), ("wait_ms", "wait ms/step", ".2f"), ("saved", "saved / exchange", ".0%")]


def build(args):
    """(model, x shape per sample) for --model."""
    from mpidp import models
    if args.model == "mlp":
        return models.mlp(in_features=64, hidden=(args.width,) * args.depth, num_classes=10, seed=0), (64,)
    if args.model == "cnn":
        return models.cnn(in_channels=1, image_size=16, channels=(16, 32), num_classes=10, seed=0), (1, 16, 16)
    raise SystemExit(f"unknown --model {args.model!r}; use mlp or cnn")


def worker(args):
    """One job: rounds of every mode's training; rank 0 prints a RESULT line of JSON."""
    import mpidp
    from mpidp import data, nn, optim

    mpidp.init()
    rank, size = mpidp.rank(), mpidp.size()
    shape = build(args)[1]
    train = data.synthetic(args.batch * 8, shape=shape, seed=1 + rank)
    batches = [(train.x[i:i + args.batch], train.y[i:i + args.batch])
               for i in range(0, len(train.y), args.batch)]
    crit = nn.CrossEntropyLoss()

    class Plain:
        """The inner optimizer alone; with ``flat``, the hand-written loop of issue 21 before it: every
        gradient into one buffer, one raw Allreduce, divide, back into the gradients."""
        stats = {}

        def __init__(self, inner, params, flat):
            self.inner, self.params, self.flat = inner, params, flat

        def zero_grad(self):
            self.inner.zero_grad()

        def step(self):
            if self.flat:
                buf = numpy.concatenate([p.grad.reshape(-1) for p in self.params])
                MPI.COMM_WORLD.Allreduce(MPI.IN_PLACE, buf, op=MPI.SUM)
                buf /= size
                offset = 0
                for p in self.params:
                    p.grad[...] = buf[offset:offset + p.grad.size].reshape(p.grad.shape)
                    offset += p.grad.size
            self.inner.step()

        def hidden_fraction(self):
            return float("nan")

        def close(self):
            pass

    def make(mode):
        """Each mode trains its own copy of the model with its own optimizer, built once, as a training
        loop does (one shared model with the DistributedOptimizer rebuilt every round measured the
        rebuilding: 7% of a step at np=1 where bench_np1.py measures about 1%)."""
        model = build(args)[0]
        mpidp.broadcast_parameters(model, root_rank=0)
        inner = optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        if mode in ("on", "off"):
            return model, mpidp.DistributedOptimizer(inner, model=model, overlap=mode == "on")
        return model, Plain(inner, [p for p in model.parameters() if p.requires_grad], flat=mode == "hand")

    setups = {mode: make(mode) for mode in MODES}
    results = {mode: [] for mode in MODES}

    def run_steps(model, opt, n, k0):
        for k in range(n):
            x, y = batches[(k0 + k) % len(batches)]
            opt.zero_grad()
            crit(model(x), y)
            model.backward(crit.backward())
            opt.step()

    for r in range(args.rounds):
        for mode in MODES:
            model, opt = setups[mode]
            run_steps(model, opt, args.warmup, 0)
            for k in opt.stats:
                opt.stats[k] = 0 if k in ("steps", "bytes") else 0.0
            mpidp.barrier()
            t0 = time.perf_counter()
            run_steps(model, opt, args.steps, args.warmup)
            elapsed = mpidp.allreduce(numpy.array([time.perf_counter() - t0]), op=mpidp.Max)[0]
            comm = mpidp.allreduce(numpy.array([opt.stats.get("comm_s", 0.0), opt.stats.get("wait_s", 0.0)]),
                                   op=mpidp.Max)
            results[mode].append({"samples_s": size * args.batch * args.steps / elapsed,
                                  "step_ms": elapsed / args.steps * 1e3, "hidden": opt.hidden_fraction(),
                                  "comm_ms": comm[0] / args.steps * 1e3, "wait_ms": comm[1] / args.steps * 1e3})
    model = setups["on"][0]
    for _, opt in setups.values():
        opt.close()
    if rank == 0:
        out = {"np": size, "params": model.num_parameters(), "rounds": results}
        print("RESULT " + json.dumps(out), flush=True)
    mpidp.shutdown()


def launch(np, args, timeout):
    """Run the worker under ``mpiexec -n np``; its RESULT dict, or None (with the output) on failure."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(_LAUNCHER_VARS)}
    env.update(_ONE_THREAD)
    env.setdefault("PYTHONUNBUFFERED", "1")
    cmd = ["mpiexec", "-n", str(np)]
    if args.simulate_nodes:
        cmd = [sys.executable, "-m", "mpidp.run", "--simulate-nodes", args.simulate_nodes] + \
            (["--link-rate", args.link_rate] if args.link_rate else []) + \
            [a for k in sorted(env) if k.startswith(("MPIR_CVAR_", "FI_")) for a in ("-x", k)]  # MPI settings
    cmd += [sys.executable, os.path.abspath(__file__), "--worker", "--depth", str(args.depth),
           "--model", args.model, "--width", str(args.width), "--batch", str(args.batch),
           "--steps", str(args.steps), "--warmup", str(args.warmup), "--rounds", str(args.rounds)]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, 9)
        out, _ = proc.communicate()
        print(f"np={np}: killed after {timeout} s\n{out[-3000:]}", file=sys.stderr)
        return None
    for line in out.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    print(f"np={np}: exit {proc.returncode} without a result\n{out[-3000:]}", file=sys.stderr)
    return None


def summarise(results, cores):
    """Rows per (np, mode): medians over rounds and repeats, efficiency against np=1 of the same mode."""
    rows = []
    for np in sorted(results):
        for mode in MODES:
            runs = [r for res in results[np] for r in res["rounds"][mode]]
            med = {k: float(numpy.median([r[k] for r in runs])) for k in runs[0]}
            rows.append({"np": np, "oversubscribed": np > cores, "note": "oversubscribed" if np > cores else "",
                         "overlap": mode, "runs": len(runs), **med})
    for row in rows:
        one = [r for r in rows if r["np"] == 1 and r["overlap"] == row["overlap"]]
        row["efficiency"] = row["samples_s"] / (row["np"] * one[0]["samples_s"]) if one else float("nan")
        off = [r for r in rows if r["np"] == row["np"] and r["overlap"] == "off"][0]
        row["saved"] = (off["step_ms"] - row["step_ms"]) / off["comm_ms"] \
            if row["overlap"] == "on" and row["np"] > 1 and off["comm_ms"] > 0 else float("nan")
    return rows


def targets(rows):
    """Issue 21's two training-step targets, from the medians: lines to print."""
    lines = []
    for np in sorted({r["np"] for r in rows}):
        mode = {r["overlap"]: r for r in rows if r["np"] == np}
        if np == 1:
            cost = mode["on"]["step_ms"] / mode["none"]["step_ms"] - 1
            lines.append(f"np=1: the DistributedOptimizer costs {cost:+.1%} of a step against the inner optimizer "
                         f"alone (target at most +2%): {'met' if cost <= 0.02 else 'not met'}")
        else:
            ratio = mode["on"]["samples_s"] / mode["hand"]["samples_s"]
            lines.append(f"np={np}: DistributedOptimizer (overlap on) gives {ratio:.2f}x the samples/s of the "
                         f"hand-written flat loop (target at least 1.00x): {'met' if ratio >= 1 else 'not met'}")
    return lines


def plot(path, rows, title):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    for mode, style in (("on", "o-"), ("off", "s--"), ("hand", "^-."), ("none", "x:")):
        mine = [r for r in rows if r["overlap"] == mode]
        nps = [r["np"] for r in mine]
        a.plot(nps, [r["samples_s"] for r in mine], style, label=LABELS[mode])
        b.plot(nps, [r["efficiency"] for r in mine], style, label=LABELS[mode])
    one = [r["samples_s"] for r in rows if r["np"] == 1]
    if one:
        nps = sorted({r["np"] for r in rows})
        a.plot(nps, [n * max(one) for n in nps], ":", color="gray", label="ideal")
    over = [r["np"] for r in rows if r["oversubscribed"]]
    for ax in (a, b):
        if over:
            ax.axvspan(min(over) - 0.5, max(over) + 0.5, color="tab:red", alpha=0.08, label="oversubscribed")
        ax.set_xlabel("ranks (np)")
        ax.set_xticks(sorted({r["np"] for r in rows}))
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    a.set_ylabel("samples/s (all ranks)")
    b.set_ylabel("scaling efficiency")
    b.set_ylim(0, 1.15)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--np", type=int, nargs="+", default=[1, 2, 4], help="rank counts (default 1 2 4)")
    ap.add_argument("--model", default="mlp", help="mlp (64 -> width -> width -> 10) or cnn (16x16 images)")
    ap.add_argument("--width", type=int, default=1024, help="mlp hidden width (default 1024: 1.1 M parameters)")
    ap.add_argument("--depth", type=int, default=2, help="mlp hidden layers (default 2)")
    ap.add_argument("--simulate-nodes", metavar="LAYOUT", help="run on a simulated cluster (mpidprun), e.g. 2x2")
    ap.add_argument("--link-rate", metavar="RATE", help="its inter-node link rate, e.g. 2gbit")
    ap.add_argument("--out", default="", help="name the CSV/PNG bench_scaling_MODEL_OUT")
    ap.add_argument("--batch", type=int, default=64, help="per-rank batch (default 64)")
    ap.add_argument("--steps", type=int, default=20, help="timed steps per round and mode (default 20)")
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps per round and mode (default 3)")
    ap.add_argument("--rounds", type=int, default=3, help="alternating on/off rounds per job (default 3)")
    ap.add_argument("--repeats", type=int, default=2, help="jobs per np, np values interleaved (default 2)")
    ap.add_argument("--timeout", type=float, default=600, help="seconds per job before it is killed")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        worker(args)
        return 0
    cores = os.cpu_count() or 1
    results = {}
    nps = args.np
    if args.simulate_nodes:
        from mpidp.launch import simcluster
        nps = [simcluster.parse_layout(args.simulate_nodes).np]
    for rep in range(args.repeats):
        for np in nps:
            print(f"repeat {rep + 1}/{args.repeats}: np={np}{' (oversubscribed)' if np > cores else ''} ...",
                  flush=True)
            res = launch(np, args, args.timeout)
            if res is None:
                return 1
            results.setdefault(np, []).append(res)
    rows = summarise(results, cores)
    params = results[nps[0]][0]["params"]
    title = (f"{args.model} ({params:,} parameters), batch {args.batch} per rank, {args.steps} steps x "
             f"{args.rounds} rounds x {args.repeats} jobs, {cores} cores, one BLAS thread per rank")
    if args.simulate_nodes:
        title += f", simulated {args.simulate_nodes} nodes, link {args.link_rate or 'unshaped'}"
    bu.print_table(rows, TABLE, title=title)
    for line in targets(rows):
        print(line)
    stem = FIGURES / (f"bench_scaling_{args.model}" + (f"_{args.out}" if args.out else ""))
    bu.write_csv(f"{stem}.csv", [{"model": args.model, "params": params, "batch": args.batch, **r} for r in rows])
    plot(f"{stem}.png", rows, title)
    print(f"wrote {stem}.csv and .png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
