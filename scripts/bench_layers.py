"""Linear / Conv2d forward+backward in mpidp.nn against the bare array code they need.

For each shape three timings (best of --repeats interleaved rounds, after warm-up):
  layer  - ``y = layer(x); layer.backward(dy)`` (caching, hooks, in-place grad accumulation)
  bare   - the same math written inline: matmuls, bias, and for Conv2d im2col + col2im
  gemm   - only the three matrix products (forward, dx, dW), the floor any implementation pays
and the ratios layer/bare (framework overhead) and layer/gemm. Writes a table to stdout, a CSV
and a PNG into --out.

    python scripts/bench_layers.py                  # CPU, float32
    python scripts/bench_layers.py --device gpu     # CuPy
"""
import argparse
import csv
import os
import time

import numpy

from mpidp import nn
from mpidp.backend import resolve_module

LINEAR = [(256, 512, 512), (1024, 1024, 1024), (64, 4096, 1024)]          # batch, in, out
CONV = [(32, 16, 32, 32, 32, 3), (16, 64, 16, 16, 64, 3), (64, 3, 32, 32, 16, 5)]  # N, C, H, W, O, k
QUICK = [(64, 128, 128)], [(8, 8, 16, 16, 16, 3)]  # a smoke run


def _sync(xp):
    if xp is not numpy:
        xp.cuda.get_current_stream().synchronize()


def _time(fns, xp, repeats):
    """Best-of-``repeats`` ms for each of ``fns``, run interleaved so machine load hits them alike."""
    for fn in fns:
        fn()
        fn()
    _sync(xp)
    best = [float("inf")] * len(fns)
    for r in range(repeats):
        for i in (range(len(fns)) if r % 2 == 0 else reversed(range(len(fns)))):
            t0 = time.perf_counter()
            fns[i]()
            _sync(xp)
            best[i] = min(best[i], time.perf_counter() - t0)
    return [t * 1e3 for t in best]


def bench_linear(xp, dtype, shape, repeats):
    n, fin, fout = shape
    rng = numpy.random.default_rng(0)
    layer = nn.Linear(fin, fout, dtype=dtype, rng=0).to(xp)
    x = xp.asarray(rng.standard_normal((n, fin)).astype(dtype))
    dy = xp.asarray(rng.standard_normal((n, fout)).astype(dtype))
    w, b = layer.weight.data, layer.bias.data
    gw, gb = xp.zeros_like(w), xp.zeros_like(b)

    def framework():
        layer(x)
        layer.backward(dy)

    def bare():
        x @ w.T + b
        dy @ w
        gw[...] += dy.T @ x
        gb[...] += dy.sum(0)

    def gemm():
        x @ w.T
        dy @ w
        dy.T @ x

    flops = 3 * 2 * n * fin * fout
    return f"Linear {n}x{fin}->{fout}", flops, _time((framework, bare, gemm), xp, repeats)


def _im2col(xp, x, k, pad):
    """Columns ordered (kh, kw, c) from an NHWC copy of x: the copy runs over contiguous channels."""
    xn = xp.pad(x.transpose(0, 2, 3, 1), ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    n, hp, wp, c = xn.shape
    oh, ow = hp - k + 1, wp - k + 1
    sn, sh, sw, sc = xn.strides
    win = xp.lib.stride_tricks.as_strided(xn, (n, oh, ow, k, k, c), (sn, sh, sw, sh, sw, sc))
    return win.reshape(n * oh * ow, k * k * c)


def bench_conv(xp, dtype, shape, repeats):
    n, c, h, w_, o, k = shape
    pad = k // 2
    rng = numpy.random.default_rng(0)
    layer = nn.Conv2d(c, o, k, padding=pad, dtype=dtype, rng=0).to(xp)
    x = xp.asarray(rng.standard_normal((n, c, h, w_)).astype(dtype))
    dy = xp.asarray(rng.standard_normal((n, o, h, w_)).astype(dtype))
    w, b = layer.weight.data, layer.bias.data
    w2 = w.transpose(0, 2, 3, 1).reshape(o, -1)
    gw, gb = xp.zeros_like(w2), xp.zeros_like(b)
    cols0 = _im2col(xp, x, k, pad)
    dy0 = dy.transpose(0, 2, 3, 1).reshape(-1, o).copy()

    def framework():
        layer(x)
        layer.backward(dy)

    def bare():
        cols = _im2col(xp, x, k, pad)
        w2 = w.transpose(0, 2, 3, 1).reshape(o, -1)
        (cols @ w2.T + b).reshape(n, h, w_, o).transpose(0, 3, 1, 2)
        d2 = dy.transpose(0, 2, 3, 1).reshape(-1, o)
        gw[...] += d2.T @ cols
        gb[...] += d2.sum(0)
        if c < w_:  # the same two col2im layouts the layer picks between
            d6 = (w2.T @ d2.T).reshape(k, k, c, n, h, w_)
            dxp = xp.zeros((c, n, h + 2 * pad, w_ + 2 * pad), dtype=dtype)
            for i in range(k):
                for j in range(k):
                    dxp[:, :, i:i + h, j:j + w_] += d6[i, j]
            dxp[:, :, pad:pad + h, pad:pad + w_].transpose(1, 0, 2, 3)
        else:
            d6 = (d2 @ w2).reshape(n, h, w_, k, k, c)
            dxp = xp.zeros((n, h + 2 * pad, w_ + 2 * pad, c), dtype=dtype)
            for i in range(k):
                for j in range(k):
                    dxp[:, i:i + h, j:j + w_] += d6[:, :, :, i, j]
            dxp[:, pad:pad + h, pad:pad + w_].transpose(0, 3, 1, 2)

    def gemm():
        cols0 @ w2.T
        dy0.T @ cols0
        dy0 @ w2

    flops = 3 * 2 * n * h * w_ * o * c * k * k
    return f"Conv2d {n}x{c}x{h}x{w_}->{o} k{k}", flops, _time((framework, bare, gemm), xp, repeats)


def plot(rows, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    labels = [r["case"] for r in rows]
    pos = numpy.arange(len(rows))
    fig, ax = plt.subplots(figsize=(10, 4.5))
    for i, key in enumerate(("layer_ms", "bare_ms", "gemm_ms")):
        ax.bar(pos + (i - 1) * 0.27, [r[key] for r in rows], 0.27, label=key[:-3])
    for p, r in zip(pos, rows):
        ax.text(p - 0.27, r["layer_ms"], f"x{r['layer_vs_bare']:.2f}", ha="center", va="bottom", fontsize=8)
    ax.set_xticks(pos, labels, rotation=20, ha="right", fontsize=8)
    ax.set_ylabel("forward + backward, ms (best of N)")
    ax.set_yscale("log")
    ax.set_title("mpidp.nn layer vs bare array code (label: layer / bare)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="out/bench_layers", help="directory for bench_layers.csv and .png")
    ap.add_argument("--device", default="cpu", help="cpu or gpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--quick", action="store_true", help="one small shape per layer, 3 repeats (smoke test)")
    args = ap.parse_args(argv)
    xp, dtype = resolve_module(args.device), numpy.dtype(args.dtype)
    repeats = 3 if args.quick else args.repeats
    linear, conv = QUICK if args.quick else (LINEAR, CONV)
    cases = [(bench_linear, s) for s in linear] + [(bench_conv, s) for s in conv]
    rows = []
    header = (f"{'case':34s} {'layer ms':>9s} {'bare ms':>9s} {'gemm ms':>9s} {'layer/bare':>10s} "
              f"{'layer/gemm':>10s} {'GFLOP/s':>8s}")
    print(f"# device={args.device} dtype={dtype} repeats={repeats}")
    print(header)
    for fn, shape in cases:
        name, flops, (t_layer, t_bare, t_gemm) = fn(xp, dtype, shape, repeats)
        row = dict(case=name, layer_ms=t_layer, bare_ms=t_bare, gemm_ms=t_gemm, layer_vs_bare=t_layer / t_bare,
                   layer_vs_gemm=t_layer / t_gemm, gflops=flops / t_layer / 1e6)
        rows.append(row)
        print(f"{name:34s} {t_layer:9.3f} {t_bare:9.3f} {t_gemm:9.3f} {row['layer_vs_bare']:10.2f} "
              f"{row['layer_vs_gemm']:10.2f} {row['gflops']:8.1f}")
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "bench_layers.csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    plot(rows, os.path.join(args.out, "bench_layers.png"))
    print(f"wrote {args.out}/bench_layers.csv and .png")
    return rows


if __name__ == "__main__":
    main()
