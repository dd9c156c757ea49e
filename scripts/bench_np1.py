"""What the DistributedOptimizer costs at one rank: the same training step with and without it.

    OMP_NUM_THREADS=1 python scripts/bench_np1.py [--rounds 15 --steps 10 --width 1024]

Three copies of one MLP (64 -> width -> width -> 10, batch 64) train side by side in one process,
interleaved round by round: the inner SGD alone, and wrapped in the DistributedOptimizer with
overlap off and on. Each phase of a step (zero_grad, forward, backward, step) is timed; the
medians over every timed step are printed with each mode's cost against the inner optimizer.
bench_scaling.py measures the same at np=1 on whole steps, with fewer steps per mode.
"""
import argparse
import time

import numpy

import mpidp
from mpidp import data, models, nn, optim

PHASES = ("zero_grad", "forward", "backward", "step")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=15, help="interleaved rounds (default 15)")
    ap.add_argument("--steps", type=int, default=10, help="timed steps per mode and round (default 10)")
    ap.add_argument("--width", type=int, default=1024, help="hidden width (default 1024)")
    args = ap.parse_args(argv)
    mpidp.init()
    train = data.synthetic(64 * 8, shape=(64,), seed=1)
    crit = nn.CrossEntropyLoss()

    def make(mode):
        model = models.mlp(in_features=64, hidden=(args.width, args.width), num_classes=10, seed=0)
        inner = optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        opt = inner if mode == "inner alone" else mpidp.DistributedOptimizer(inner, model=model,
                                                                             overlap=mode.endswith("on"))
        return model, opt

    modes = {m: make(m) for m in ("inner alone", "DistributedOptimizer, overlap off",
                                  "DistributedOptimizer, overlap on")}
    times = {m: [] for m in modes}

    def run(mode, n, record):
        model, opt = modes[mode]
        for k in range(n):
            x, y = train.x[(k % 8) * 64:(k % 8 + 1) * 64], train.y[(k % 8) * 64:(k % 8 + 1) * 64]
            t = [time.perf_counter()]
            opt.zero_grad()
            t.append(time.perf_counter())
            crit(model(x), y)
            t.append(time.perf_counter())
            model.backward(crit.backward())
            t.append(time.perf_counter())
            opt.step()
            t.append(time.perf_counter())
            if record:
                times[mode].append(numpy.diff(t))

    for _ in range(args.rounds):
        for mode in modes:
            run(mode, 2, False)
            run(mode, args.steps, True)
    base = None
    print(f"np={mpidp.size()}, mlp 64-{args.width}-{args.width}-10, batch 64, median ms over "
          f"{args.rounds} x {args.steps} steps per mode")
    print(f"{'mode':34s}" + "".join(f"{p:>10s}" for p in PHASES) + f"{'total':>10s}{'cost':>8s}")
    for mode, rows in times.items():
        med = numpy.median(numpy.array(rows), axis=0) * 1e3
        total = med.sum()
        base = base or total
        print(f"{mode:34s}" + "".join(f"{v:10.3f}" for v in med) + f"{total:10.3f}{total / base - 1:+8.1%}")
    mpidp.shutdown()


if __name__ == "__main__":
    main()
