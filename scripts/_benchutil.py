"""Small helpers the benchmark scripts share: sizes, MPI-synchronised timing, tables, CSV, plots.

Nothing here knows about mpidp: it takes a communicator and plain callables.
"""
import csv
import os
import re
import time

import numpy

_UNITS = {"": 1, "B": 1, "K": 1 << 10, "KB": 1 << 10, "KIB": 1 << 10, "M": 1 << 20, "MB": 1 << 20,
          "MIB": 1 << 20, "G": 1 << 30, "GB": 1 << 30, "GIB": 1 << 30}


def parse_size(text):
    """'4', '64K', '16M', '1GiB' -> bytes (binary units)."""
    m = re.fullmatch(r"\s*(\d+)\s*([A-Za-z]*)\s*", str(text))
    if not m or m.group(2).upper() not in _UNITS:
        raise ValueError(f"size {text!r} is not a number with an optional unit K, M or G")
    return int(m.group(1)) * _UNITS[m.group(2).upper()]


def format_size(nbytes):
    """Bytes as the shortest exact binary unit: 4B, 1K, 64M."""
    for unit, scale in (("G", 1 << 30), ("M", 1 << 20), ("K", 1 << 10)):
        if nbytes >= scale and nbytes % scale == 0:
            return f"{nbytes // scale}{unit}"
    return f"{nbytes}B"


def sizes(lo, hi, factor):
    """lo, lo*factor, ... up to and including hi."""
    out, s = [], lo
    while s <= hi:
        out.append(s)
        s *= factor
    return out


def timeit(fn, comm, iters, warmup=2):
    """Per-iteration seconds of ``fn()``, each the max over the ranks of ``comm``.

    Every iteration starts after a barrier; one allreduce at the end combines the ranks.
    """
    for _ in range(warmup):
        fn()
    times = numpy.empty(iters)
    clock = time.perf_counter
    for i in range(iters):
        comm.Barrier()
        t0 = clock()
        fn()
        times[i] = clock() - t0
    from mpi4py import MPI
    comm.Allreduce(MPI.IN_PLACE, times, op=MPI.MAX)
    return times


def auto_iters(fn, comm, budget_s, lo=5, hi=2000):
    """Iterations of ``fn`` that fill about ``budget_s`` (agreed across ranks, from one timed call)."""
    one = timeit(fn, comm, 1, warmup=1)[0]
    return int(min(hi, max(lo, budget_s / max(one, 1e-7))))


def print_table(rows, columns, title=None, out=None):
    """Print dict rows as an aligned text table; ``columns`` is [(key, header, format), ...]."""
    cells = [[h for _, h, _ in columns]]
    for row in rows:
        cells.append([_cell(row.get(k), fmt) for k, _, fmt in columns])
    widths = [max(len(r[i]) for r in cells) for i in range(len(columns))]
    lines = [title] if title else []
    for j, r in enumerate(cells):
        lines.append("  ".join(c.rjust(w) for c, w in zip(r, widths)))
        if j == 0:
            lines.append("  ".join("-" * w for w in widths))
    text = "\n".join(lines)
    print(text, file=out, flush=True)
    return text


def markdown_table(rows, columns):
    """The same table as GitHub markdown (formatted columns right-aligned, text left)."""
    lines = ["| " + " | ".join(h for _, h, _ in columns) + " |",
             "|" + "|".join("---:" if fmt else ":---" for _, _, fmt in columns) + "|"]
    for row in rows:
        lines.append("| " + " | ".join(_cell(row.get(k), fmt) for k, _, fmt in columns) + " |")
    return "\n".join(lines)


def _cell(value, fmt):
    if value is None or (isinstance(value, float) and numpy.isnan(value)):
        return "-"
    return format(value, fmt) if fmt else str(value)


def write_csv(path, rows, columns=None):
    """Write dict rows to ``path`` (columns: every key in first-seen order unless given)."""
    if columns is None:
        columns = []
        for row in rows:
            columns += [k for k in row if k not in columns]
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    return path


def plot(path, panels, title=None, xlabel="message size", xfmt=format_size):
    """Log-log line plots side by side; ``panels`` is [(ylabel, [(label, xs, ys, style), ...]), ...].

    Returns False (after printing a note) when matplotlib is not installed.
    """
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.ticker import FuncFormatter
    except ImportError:
        print(f"note: matplotlib is not installed; skipped {path} (pip install matplotlib)")
        return False
    fig, axes = plt.subplots(1, len(panels), figsize=(6.5 * len(panels), 4.8), squeeze=False)
    for ax, (ylabel, lines) in zip(axes[0], panels):
        for label, xs, ys, style in lines:
            ax.plot(xs, ys, label=label, **(style or {}))
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        if xfmt is not None:
            ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: xfmt(int(round(v)))))
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True
