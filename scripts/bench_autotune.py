"""Step time with the default communication settings against the autotuned ones, in one run at np=2.

    python scripts/bench_autotune.py                 # launches itself: mpiexec -n 2
    python scripts/bench_autotune.py --repeats 5

Workloads: a real training step of the transformer from mpidp.models (forward,
loss, backward with overlapped bucket allreduces, SGD step) on random tokens,
and the ResNet-50 gradient exchange of scripts/bench_gradsync.py (backward
fires the hooks in reverse order, then step). Each repeat builds three
identical replicas: "default" (DistributedOptimizer at the default fusion
threshold and piece size), "tuned" (the same after ``mpidp.tune.communication``
measured its real gradients, cache off) and "control" (a second default: the
default/control ratio shows what noise alone does). Their steps run
interleaved rep by rep; a step's time is the slowest rank's; tables show
medians. Tuned is fine when tuned/default stays within the spread of
control/default. CSV and PNG go to docs/figures/.
"""
import argparse
import os
import sys
import time

import numpy

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _benchutil as bu  # noqa: E402
import bench_gradsync as bg  # noqa: E402

FIGURES = bg.FIGURES
TABLE = [("workload", "workload", ""), ("repeat", "repeat", ""), ("tuned_threshold", "tuned threshold", ""),
         ("tuned_piece", "tuned piece", ""), ("default_ms", "default ms", ".2f"), ("tuned_ms", "tuned ms", ".2f"),
         ("control_ms", "control ms", ".2f"), ("tuned_ratio", "tuned/default", ".3f"),
         ("control_ratio", "control/default", ".3f"), ("tune_s", "tuning s", ".1f")]


class Transformer:
    """A real training step of models.transformer on random tokens."""

    name = "transformer"

    def __init__(self, args, rank):
        from mpidp import models, nn
        self.rng = numpy.random.default_rng(10 + rank)
        self.args = args
        self.crit = nn.CrossEntropyLoss()
        self.build = lambda: models.transformer(args.vocab, args.seq, embed_dim=args.embed, num_heads=4,
                                                num_layers=args.layers, seed=0)
        shape = (args.batch, args.seq)
        self.batches = [(self.rng.integers(0, args.vocab, shape), self.rng.integers(0, args.vocab, shape))
                        for _ in range(4)]
        self.k = 0

    def optimizer(self, model, threshold):
        import mpidp
        from mpidp import optim
        return mpidp.DistributedOptimizer(optim.SGD(model.parameters(), lr=1e-3, momentum=0.9), model=model,
                                          fusion_threshold_bytes=threshold)

    def backward(self, model, opt):
        x, y = self.batches[self.k % len(self.batches)]
        self.k += 1
        opt.zero_grad()
        self.crit(model(x), y)
        model.backward(self.crit.backward())

    def step(self, model, opt):
        self.backward(model, opt)
        opt.step()


class ResNetShapes:
    """The ResNet-50 gradient exchange: hooks fire in reverse order, then step (no compute)."""

    name = "resnet50 grads"

    def __init__(self, args, rank):
        self.build = lambda: bg.gradient_model(bg.RESNET50_SHAPES, seed=rank)
        self.x = numpy.zeros(1, numpy.float32)

    def optimizer(self, model, threshold):
        import mpidp
        return mpidp.DistributedOptimizer(bg.NoStep(model.parameters()), model=model,
                                          fusion_threshold_bytes=threshold)

    def backward(self, model, opt):
        model(self.x)
        model.backward(self.x)

    def step(self, model, opt):
        self.backward(model, opt)
        opt.step()


def compare(comm, work, default, reps, log):
    """One repeat: tune a fresh replica, then time default, tuned and control interleaved."""
    from mpidp import tune
    from mpidp.comm import _buffers

    # glibc raises its mmap threshold after the first large frees, so replicas built before and after
    # that land in different memory (and huge pages); a throwaway replica first puts all three alike
    throwaway = work.build()
    work.optimizer(throwaway, default[0]).close()
    del throwaway
    replicas = {}
    for name in ("default", "tuned", "control"):
        model = work.build()
        replicas[name] = [model, work.optimizer(model, default[0]), default[1]]
    model, opt, _ = replicas["tuned"]
    _buffers.set_piece_bytes(default[1])
    work.backward(model, opt)
    opt.synchronize()
    comm.Barrier()
    t0 = time.perf_counter()
    result = tune.communication(opt, cache=False, log_path=str(FIGURES / "bench_autotune_log.csv"))
    tune_s = time.perf_counter() - t0
    opt.step()
    replicas["tuned"][2] = result.piece_bytes
    log(f"  {work.name}: tuned to threshold {bu.format_size(result.threshold)}, piece "
        f"{bu.format_size(result.piece_bytes)} in {tune_s:.1f} s ({len(result.table)} candidates)")
    names = list(replicas)
    times = numpy.zeros((reps, len(names)))
    for r in range(-2, reps):
        for k in range(len(names)):
            j = (k + r) % len(names)  # the order rotates: no replica always runs after the same one
            model, opt, piece = replicas[names[j]]
            _buffers.set_piece_bytes(piece)
            comm.Barrier()
            t = time.perf_counter()
            work.step(model, opt)
            if r >= 0:
                times[r, j] = time.perf_counter() - t
    from mpi4py import MPI
    comm.Allreduce(MPI.IN_PLACE, times, op=MPI.MAX)
    _buffers.set_piece_bytes(default[1])
    med = dict(zip(names, numpy.median(times, axis=0) * 1e3))
    for _, opt, _ in replicas.values():
        opt.close()
    return {"tuned_threshold": bu.format_size(result.threshold), "tuned_piece": bu.format_size(result.piece_bytes),
            "threshold": result.threshold, "piece": result.piece_bytes,
            "default_ms": med["default"], "tuned_ms": med["tuned"], "control_ms": med["control"],
            "tuned_ratio": med["tuned"] / med["default"], "control_ratio": med["control"] / med["default"],
            "tune_s": tune_s}


def plot(path, rows, np):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    works = list(dict.fromkeys(r["workload"] for r in rows))
    fig, axes = plt.subplots(1, len(works), figsize=(5.5 * len(works), 4), squeeze=False)
    for ax, w in zip(axes[0], works):
        mine = [r for r in rows if r["workload"] == w]
        x = numpy.arange(len(mine))
        for k, (key, label) in enumerate((("default_ms", "default"), ("tuned_ms", "tuned"),
                                          ("control_ms", "control (default again)"))):
            ax.bar(x + (k - 1) * 0.27, [r[key] for r in mine], 0.27, label=label)
        ax.set_xticks(x, [f"repeat {r['repeat']}\n{r['tuned_threshold']}/{r['tuned_piece']}" for r in mine])
        ax.set_ylabel("ms per step (median, slowest rank)")
        ax.set_title(f"{w}, np={np}")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run(args):
    import mpidp
    from mpi4py import MPI
    from mpidp.comm import _buffers
    from mpidp.distributed.optimizer import fusion_threshold

    mpidp.init()
    comm = MPI.COMM_WORLD
    rank, np = comm.Get_rank(), comm.Get_size()

    def log(msg):
        if rank == 0:
            print(msg, flush=True)

    default = (fusion_threshold(), _buffers.piece_bytes())
    log(f"np={np}; default threshold {bu.format_size(default[0])}, piece {bu.format_size(default[1])}; "
        f"{args.reps} reps per repeat")
    works = {"transformer": Transformer, "resnet50": ResNetShapes}
    if rank == 0 and (FIGURES / "bench_autotune_log.csv").exists():
        (FIGURES / "bench_autotune_log.csv").unlink()  # the log of this run only
    rows = []
    for rep in range(args.repeats):
        log(f"repeat {rep + 1}/{args.repeats}")
        for key in args.workloads:
            work = works[key](args, rank)
            rows.append({"workload": work.name, "repeat": rep + 1, "np": np, **compare(comm, work, default,
                                                                                       args.reps, log)})
    if rank == 0:
        bu.print_table(rows, TABLE, title="step time, default vs tuned (medians, slowest rank)")
        for w in dict.fromkeys(r["workload"] for r in rows):
            mine = [r for r in rows if r["workload"] == w]
            t = [r["tuned_ratio"] for r in mine]
            c = [r["control_ratio"] for r in mine]
            print(f"{w}: tuned/default {min(t):.3f}..{max(t):.3f} (median {numpy.median(t):.3f}); "
                  f"noise, control/default {min(c):.3f}..{max(c):.3f}")
        if args.markdown:
            print(bu.markdown_table(rows, TABLE))
        bu.write_csv(FIGURES / "bench_autotune.csv", rows)
        plot(FIGURES / "bench_autotune.png", rows, np)
        print(f"wrote {FIGURES / 'bench_autotune.csv'} and .png")
    mpidp.shutdown()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--np", type=int, default=2, help="ranks when launching itself (default 2)")
    ap.add_argument("--repeats", type=int, default=3, help="tune-and-compare repeats (default 3)")
    ap.add_argument("--reps", type=int, default=15, help="timed steps per replica per repeat (default 15)")
    ap.add_argument("--workloads", nargs="+", default=["transformer", "resnet50"],
                    choices=["transformer", "resnet50"])
    ap.add_argument("--vocab", type=int, default=96)
    ap.add_argument("--seq", type=int, default=32)
    ap.add_argument("--embed", type=int, default=128)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--batch", type=int, default=4, help="transformer sequences per rank (default 4)")
    ap.add_argument("--markdown", action="store_true", help="also print the table as markdown")
    ap.add_argument("--timeout", type=float, default=1800, help="seconds before the job is killed")
    args = ap.parse_args(argv)
    if not bg.under_mpi() and args.np > 1:
        return bg.launch_self(args.np, sys.argv[1:] if argv is None else argv, args.timeout)
    run(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
