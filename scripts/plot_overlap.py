"""Gantt chart of backward vs gradient buckets per rank, from a Chrome-trace timeline.

    mpidprun --simulate-nodes 2x2 --link-rate 2gbit python scripts/train.py --model mlp \\
        --hidden 1024,1024,1024,1024,1024,1024 --batch-size 128 --max-steps 12 --timeline /tmp/t.json
    python scripts/plot_overlap.py /tmp/t.json --steps 3 --out docs/figures/overlap_2x2.png

Reads the trace that ``mpidp.start_timeline`` / ``--timeline`` writes (one process row per
rank) and draws, for each rank and the last ``--steps`` optimizer steps, the backward spans,
each gradient bucket's allreduce (the engine thread, or the main thread when it ran the
bucket itself while waiting) and the wait in ``step()``. It also prints, per rank, the share
of the bucket time that lay inside backward, measured from the trace alone: a cross-check of
``DistributedOptimizer.hidden_fraction()`` (1 - waited / communicated).
"""
import argparse
import gzip
import json
import sys


def spans(trace):
    """{rank: [(name, cat, start_ms, dur_ms, thread name), ...]} sorted by start."""
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    threads = {(e["pid"], e["tid"]): e["args"]["name"] for e in events
               if e.get("ph") == "M" and e.get("name") == "thread_name"}
    out = {}
    for e in events:
        if e.get("ph") == "X":
            out.setdefault(e["pid"], []).append((e["name"], e.get("cat", ""), e["ts"] / 1e3, e.get("dur", 0) / 1e3,
                                                threads.get((e["pid"], e["tid"]), str(e["tid"]))))
    return {r: sorted(v, key=lambda s: s[2]) for r, v in out.items()}


def steps_of(rows):
    """[(first backward start, step end)] per optimizer step: backward spans up to the step's optimizer update."""
    out, begin = [], None
    for name, _, t, d, _ in rows:
        if name == "backward" and begin is None:
            begin = t
        elif name == "optimizer step" and begin is not None:
            out.append((begin, t + d))
            begin = None
    return out


def overlap_share(rows, window):
    """(bucket ms inside backward, bucket ms, waited ms) within ``window`` = (start, end)."""
    lo, hi = window
    backward = [(t, t + d) for n, _, t, d, _ in rows if n == "backward" and lo <= t < hi]
    buckets = [(t, t + d) for n, _, t, d, _ in rows if n.startswith("gradients.bucket") and lo <= t < hi]
    inside = sum(max(0.0, min(b1, w1) - max(b0, w0)) for b0, b1 in buckets for w0, w1 in backward)
    waited = sum(d for n, _, t, d, _ in rows if n == "wait gradients" and lo <= t < hi)
    return inside, sum(b1 - b0 for b0, b1 in buckets), waited


def plot(per_rank, windows, path, title):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    colors = {"backward": "tab:green", "forward": "tab:olive", "bucket": "tab:blue", "wait": "tab:red",
              "optimizer step": "tab:gray"}
    ranks = sorted(per_rank)
    t0 = min(windows[r][0] for r in ranks)
    fig, ax = plt.subplots(figsize=(12, 1.0 + 0.9 * len(ranks)))
    labels = []
    for i, r in enumerate(ranks):
        lo, hi = windows[r]
        y = len(ranks) - 1 - i
        labels.append((y, f"rank {r}"))
        for name, _, t, d, thread in per_rank[r]:
            if not lo <= t < hi:
                continue
            if name in ("backward", "forward", "optimizer step"):
                ax.broken_barh([(t - t0, d)], (y + 0.5, 0.35), color=colors[name])
            elif name == "wait gradients":
                ax.broken_barh([(t - t0, d)], (y + 0.5, 0.35), facecolor="none", edgecolor=colors["wait"],
                               hatch="///", linewidth=0.8)
            elif name.startswith("gradients.bucket"):
                k = int(name[len("gradients.bucket"):].split("[")[0])
                ax.broken_barh([(t - t0, d)], (y + 0.1, 0.35), color=colors["bucket"], alpha=0.55 + 0.45 * (k % 2),
                               edgecolor="k", linewidth=0.4)
                ax.text(t - t0 + d / 2, y + 0.275, str(k), ha="center", va="center", fontsize=6, color="w")
    ax.set_yticks([y + 0.5 for y, _ in labels], [s for _, s in labels])
    ax.set_xlabel("ms")
    ax.set_title(title, fontsize=9)
    ax.legend(handles=[Patch(color=colors["forward"], label="forward"),
                       Patch(color=colors["backward"], label="backward"),
                       Patch(color=colors["optimizer step"], label="optimizer update"),
                       Patch(facecolor="none", edgecolor=colors["wait"], hatch="///", label="step() waits"),
                       Patch(color=colors["bucket"], label="bucket allreduce (number)")],
              loc="upper center", bbox_to_anchor=(0.5, -0.18), ncol=5, fontsize=8, frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("trace", help="Chrome-trace JSON (or .json.gz) written by --timeline / mpidp.start_timeline")
    ap.add_argument("--steps", type=int, default=3, help="draw the last N optimizer steps (default 3)")
    ap.add_argument("--skip-last", type=int, default=0, help="leave out the last K steps")
    ap.add_argument("--out", help="PNG to write (default: only print the shares)")
    ap.add_argument("--title", default="", help="plot title (e.g. the command and the link)")
    args = ap.parse_args(argv)
    with (gzip.open if args.trace.endswith(".gz") else open)(args.trace, "rt") as f:
        per_rank = spans(json.load(f))
    windows = {}
    for r in sorted(per_rank):
        steps = steps_of(per_rank[r])
        if len(steps) < args.steps + args.skip_last:
            sys.exit(f"rank {r} has {len(steps)} steps in the trace, fewer than --steps + --skip-last")
        chosen = steps[len(steps) - args.skip_last - args.steps:len(steps) - args.skip_last]
        windows[r] = (chosen[0][0], chosen[-1][1])
        all_steps = (steps[1][0], steps[-1][1]) if len(steps) > 1 else windows[r]
        inside, total, waited = overlap_share(per_rank[r], all_steps)
        print(f"rank {r}: {len(steps) - 1} steps after the first: bucket allreduces {total:.0f} ms, "
              f"{inside:.0f} ms of it inside backward ({inside / total:.0%}); waited {waited:.0f} ms in step() "
              f"(1 - waited / communicated = {max(0.0, 1 - waited / total):.0%})" if total else f"rank {r}: no buckets")
    if args.out:
        plot(per_rank, windows, args.out, args.title or args.trace)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
