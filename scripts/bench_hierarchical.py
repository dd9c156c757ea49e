"""Allreduce (or allgather) on a simulated multi-node cluster: mpidp's hierarchical and flat paths vs MPICH's
own algorithms.

    python scripts/bench_hierarchical.py                        # 2x2, 3x1, 2+1 at 2 Gbit/s (root, MPICH)
    python scripts/bench_hierarchical.py --layouts 2x2 --rate 2gbit --reps 5 --out docs/figures/NAME
    python scripts/bench_hierarchical.py --collective allgather # sizes: bytes gathered in all
    python scripts/bench_hierarchical.py --link-model per-node  # each node its own full-duplex link

Each layout runs as its own set of jobs in a fresh network namespace (``unshare -n``; only
127.0.0.0/8 there): Hydra starts node k's ranks as host 127.0.0.(k+2) through a stand-in for
ssh, MPICH's OFI netmod carries inter-node traffic over TCP, and ``tc tbf`` limits the
namespace's loopback to the link rate. Traffic inside a node stays in shared memory, so the
shaping limits only the inter-node link (both directions share it: one loopback device).
One job times raw ``comm.Allreduce`` (MPICH's default choice) and mpidp's allreduce three
ways: as before this path existed (flat: the ring, or MPI below the ring's size), always
hierarchical, and auto (MPIDP_HIERARCHICAL=auto: the default crossover, the tune cache
left empty); one more job per MPICH algorithm setting times raw ``comm.Allreduce`` under
it. Times are the median over reps of the slowest rank (mpidp's modes and raw interleaved
rep by rep); ratios compare within one run.

With ``--link-model per-node`` each node instead runs in a network namespace of its own with its own
veth link to a hub, shaped at both ends (``mpidprun --link-model per-node``, built by
``mpidp.launch.simcluster.node_links``): each node has a full-duplex link of the rate, as on a
switch, and Hydra's proxies start through mpidprun's node helper.
"""
import argparse
import csv
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time

KiB, MiB = 1 << 10, 1 << 20
SIZES = [64 * KiB, 256 * KiB, 1 * MiB, 4 * MiB, 16 * MiB, 64 * MiB]
# MPICH 5 settings: the node-aware compositions (1: leaders reduce + bcast over shared memory,
# 4: multiple leaders) and the flat algorithms over the whole communicator (composition 2: netmod only)
MPICH_SETTINGS = {
    "composition=1 (node-aware)": {"MPIR_CVAR_ALLREDUCE_COMPOSITION": "1"},
    "composition=4 (multi-leader)": {"MPIR_CVAR_ALLREDUCE_COMPOSITION": "4"},
    "smp": {"MPIR_CVAR_ALLREDUCE_COMPOSITION": "2", "MPIR_CVAR_ALLREDUCE_INTRA_ALGORITHM": "smp"},
    "ring": {"MPIR_CVAR_ALLREDUCE_COMPOSITION": "2", "MPIR_CVAR_ALLREDUCE_INTRA_ALGORITHM": "ring"},
    "recexch": {"MPIR_CVAR_ALLREDUCE_COMPOSITION": "2", "MPIR_CVAR_ALLREDUCE_INTRA_ALGORITHM": "recexch"},
    "reduce_scatter_allgather": {"MPIR_CVAR_ALLREDUCE_COMPOSITION": "2",
                                 "MPIR_CVAR_ALLREDUCE_INTRA_ALGORITHM": "reduce_scatter_allgather"},
    "recursive_doubling": {"MPIR_CVAR_ALLREDUCE_COMPOSITION": "2",
                           "MPIR_CVAR_ALLREDUCE_INTRA_ALGORITHM": "recursive_doubling"},
}
# allgather: MPICH 5 has no node-aware composition for it; its flat algorithms
MPICH_ALLGATHER_SETTINGS = {name: {"MPIR_CVAR_ALLGATHER_INTRA_ALGORITHM": name}
                            for name in ("brucks", "recursive_doubling", "ring", "recexch_doubling", "recexch_halving")}
FAKE_SSH = '#!/bin/sh\n# ssh stand-in for Hydra: drop the options and the host, run the command here\n' \
           'while [ $# -gt 0 ]; do case "$1" in -*) shift;; *) shift; break;; esac; done\nexec sh -c "$*"\n'


def parse_layout(text):
    """'2x2' -> [2, 2]; '2+1' -> [2, 1]."""
    if "x" in text:
        nodes, per = text.split("x")
        return [int(per)] * int(nodes)
    return [int(k) for k in text.split("+")]


# --- inside the job --------------------------------------------------------------------------------

def worker(args):
    import numpy
    from mpi4py import MPI

    import mpidp
    from mpidp.comm import runtime

    mpidp.init()
    comm, me = MPI.COMM_WORLD, MPI.COMM_WORLD.Get_rank()
    topo = runtime.topology(runtime.get_comm())
    paths = {}  # mode -> the crossover it runs with (None: never hierarchical; 0: always)
    if args.mpidp:
        has_path = topo.nodes > 1 and topo.channels > 1
        chosen = topo.from_bytes  # MPIDP_HIERARCHICAL=auto with no tune cache: the default crossover
        paths = {"mpidp before (flat)": None, **({"mpidp hierarchical": 0, "mpidp auto": chosen} if has_path else {})}
        if me == 0:
            print(f"TUNED {json.dumps(chosen)}", flush=True)
    rows = []
    gather = args.collective == "allgather"
    for size in args.sizes:  # (allgather: bytes gathered in all, each rank giving its share)
        x = numpy.random.default_rng(me).standard_normal(size // 4 // (comm.Get_size() if gather else 1))
        x = x.astype(numpy.float32)
        out = numpy.empty(x.size * comm.Get_size() if gather else x.size, numpy.float32)
        times = {mode: [] for mode in ["raw"] + list(paths)}
        for rep in range(args.reps + 1):  # modes interleaved: a burst of load hits them alike
            for mode in times:
                if mode != "raw" and topo.nodes > 1 and topo.channels > 1:
                    topo.set_from(paths[mode])
                comm.Barrier()
                t0 = time.perf_counter()
                if mode == "raw":
                    comm.Allgather(x, out) if gather else comm.Allreduce(x, out)
                else:
                    mpidp.allgather(x) if gather else mpidp.allreduce(x, op=mpidp.Sum)
                times[mode].append(comm.allreduce(time.perf_counter() - t0, op=MPI.MAX))
        rows += [{"bytes": size, "mode": mode, "seconds": statistics.median(t[1:])} for mode, t in times.items()]
    if me == 0:
        print("ROWS " + json.dumps(rows), flush=True)
    mpidp.shutdown()


# --- the driver: one namespace per layout, one job per setting --------------------------------------

def in_namespace(args, layout):
    """Run every job of ``layout`` in a new network namespace with a shaped loopback; returns rows."""
    with tempfile.TemporaryDirectory() as tmp:
        ssh = os.path.join(tmp, "fake-ssh")
        with open(ssh, "w") as f:
            f.write(FAKE_SSH)
        os.chmod(ssh, 0o755)
        inner = [sys.executable, os.path.abspath(__file__), "--jobs", "--layouts", layout, "--reps", str(args.reps),
                 "--collective", args.collective, "--link-model", args.link_model,
                 "--sizes", ",".join(map(str, args.sizes)), "--fake-ssh", ssh, "--rate", args.rate]
        shaping = (f"ip link set lo up && tc qdisc add dev lo root tbf rate {args.rate} burst 512kb latency 50ms"
                   if args.rate != "none" else "ip link set lo up")
        if args.link_model == "per-node":  # the links are built inside (jobs); their namespaces go with this one's mounts
            unshare, script = ["unshare", "--net", "--uts", "--mount"], f"exec {shlex.join(inner)}"
        else:
            unshare, script = ["unshare", "-n"], f"{shaping} && exec {shlex.join(inner)}"
        done = subprocess.run(unshare + ["sh", "-c", script], capture_output=True, text=True,
                              timeout=args.timeout)
        if done.returncode != 0:
            sys.exit(f"layout {layout}: the jobs failed (exit {done.returncode}):\n{done.stdout[-3000:]}"
                     f"{done.stderr[-3000:]}")
        return json.loads(done.stdout.strip().splitlines()[-1])


def jobs(args):
    """Inside the namespace: the mpidp job, then one raw job per MPICH setting; prints all rows."""
    per_node = parse_layout(args.layouts)
    hosts = ",".join(f"127.0.0.{k + 2}:{n}" for k, n in enumerate(per_node))
    env = dict(os.environ, MPIR_CVAR_CH4_NETMOD="ofi", FI_PROVIDER="tcp", MPIR_CVAR_ENABLE_HEAVY_YIELD="1",
               MPIDP_HIERARCHICAL="auto", MPIDP_AUTOTUNE_CACHE=os.path.join(os.path.dirname(args.fake_ssh), "none"))
    ssh, localhost, link_vars = args.fake_ssh, [], []
    if args.link_model == "per-node":
        from mpidp.launch import simcluster

        folder = os.path.join(os.path.dirname(args.fake_ssh), "netns")
        why = simcluster.node_links(len(per_node), None if args.rate == "none" else args.rate, folder)
        if why:
            sys.exit(f"layout {args.layouts}: no per-node links: {why}")
        ssh = os.path.join(os.path.dirname(args.fake_ssh), "simnode")  # mpidprun's node helper enters node k
        with open(ssh, "w") as f:
            f.write(f"#!/bin/sh\nexec {shlex.quote(sys.executable)} -m mpidp.launch._simhelper node \"$@\"\n")
        os.chmod(ssh, 0o755)
        env.update(MPIDP_SIM_NETNS="1", MPIDP_SIM_LINKS=folder, FI_TCP_IFACE=simcluster.NODE_LINK)
        localhost, link_vars = ["-localhost", simcluster.HUB_ADDRESS], ["FI_TCP_IFACE"]
    rows = []
    settings = MPICH_ALLGATHER_SETTINGS if args.collective == "allgather" else MPICH_SETTINGS
    for setting, cvars in [("default", {})] + list(settings.items()):
        names = ["MPIR_CVAR_CH4_NETMOD", "FI_PROVIDER", "MPIR_CVAR_ENABLE_HEAVY_YIELD", "PYTHONPATH",
                 "MPIDP_HIERARCHICAL", "MPIDP_AUTOTUNE_CACHE"] + link_vars + list(cvars)
        cmd = [os.path.join(os.path.dirname(sys.executable), "mpiexec"), "-launcher", "ssh", "-launcher-exec",
               ssh] + localhost + ["-hosts", hosts, "-n", str(sum(per_node)), "-genvlist", ",".join(names),
               sys.executable, os.path.abspath(__file__), "--worker", "--reps", str(args.reps), "--collective",
               args.collective,
               "--sizes", ",".join(map(str, args.sizes))] + (["--mpidp"] if setting == "default" else [])
        done = subprocess.run(cmd, env={**env, **cvars, "PYTHONPATH": os.getcwd()}, capture_output=True, text=True,
                              timeout=args.timeout)
        found = [line for line in done.stdout.splitlines() if line.startswith("ROWS ")]
        if done.returncode != 0 or not found:
            print(f"setting {setting}: job failed (exit {done.returncode}): {done.stderr[-1500:]}", file=sys.stderr)
            continue
        tuned = [json.loads(line[6:]) for line in done.stdout.splitlines() if line.startswith("TUNED ")]
        for r in json.loads(found[-1][5:]):
            r["mode"] = f"MPICH {setting}" if r["mode"] == "raw" else r["mode"]
            rows.append(dict(r, layout=args.layouts, rate=args.rate, collective=args.collective, link_model=args.link_model,
                             **({"tuned_from": tuned[0]} if tuned else {})))
    print(json.dumps(rows))


def table(rows):
    """Lines of text: per layout and size, each mode's ms, and mpidp's ratios to raw and to MPICH's best."""
    out = []
    for layout in dict.fromkeys(r["layout"] for r in rows):
        mine = [r for r in rows if r["layout"] == layout]
        modes = list(dict.fromkeys(r["mode"] for r in mine))
        link = (f"a full-duplex link per node: tc tbf rate {mine[0]['rate']} on both ends of each node's veth"
                if mine[0].get("link_model") == "per-node" else
                f"tc tbf rate {mine[0]['rate']} on the namespace's loopback (both directions share it)")
        out.append(f"\n{mine[0].get('collective', 'allreduce')}, layout {layout}, inter-node link: {link}; "
                   f"milliseconds, median over reps of the slowest rank")
        tuned = [r["tuned_from"] for r in mine if "tuned_from" in r]
        if tuned:
            out.append(f"mpidp auto: hierarchical from {tuned[0]} bytes on (MPIDP_HIERARCHICAL=auto with an empty "
                       f"tune cache: the default crossover; None = never)")
        out.append("| size | " + " | ".join(modes) + " | best MPICH setting | mpidp auto / MPICH default | "
                   "mpidp auto / best MPICH |")
        out.append("|---" * (len(modes) + 4) + "|")
        for size in dict.fromkeys(r["bytes"] for r in mine):
            t = {r["mode"]: r["seconds"] for r in mine if r["bytes"] == size}
            mpich = {m: s for m, s in t.items() if m.startswith("MPICH")}
            best = min(mpich, key=mpich.get)
            ours = t.get("mpidp auto", t.get("mpidp before (flat)"))  # no hierarchical path on N x 1
            cells = " | ".join(f"{t[m] * 1e3:.1f}" if m in t else "-" for m in modes)
            label = f"{size // MiB} MiB" if size >= MiB else f"{size // KiB} KiB"
            out.append(f"| {label} | {cells} | {best[6:]} | {ours / t['MPICH default']:.2f} | "
                       f"{ours / mpich[best]:.2f} |")
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--layouts", default="2x2,3x1,2+1", help="comma-separated: NxR (N nodes of R ranks) or A+B+...")
    ap.add_argument("--rate", default="2gbit", help="tc rate of the inter-node link, or 'none'")
    ap.add_argument("--collective", choices=["allreduce", "allgather"], default="allreduce")
    ap.add_argument("--link-model", choices=["shared", "per-node"], default="shared",
                    help="shared: one shaped loopback for all nodes and both directions; per-node: each node "
                         "its own full-duplex link (as mpidprun --link-model)")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--sizes", default=",".join(map(str, SIZES)), help="message sizes in bytes")
    ap.add_argument("--out", default="", help="write STEM.csv, STEM.md (the tables) and STEM.png "
                                               "(e.g. docs/figures/bench_hierarchical)")
    ap.add_argument("--timeout", type=float, default=1800)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--mpidp", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--jobs", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--fake-ssh", default="", help=argparse.SUPPRESS)
    args = ap.parse_args()
    args.sizes = [int(s) for s in args.sizes.split(",")]
    if args.worker:
        return worker(args)
    if args.jobs:
        return jobs(args)
    if os.geteuid() != 0:
        sys.exit("bench_hierarchical needs root for its network namespace and tc (unshare -n)")
    rows, lines = [], []
    for layout in args.layouts.split(","):
        rows += in_namespace(args, layout)
        part = table([r for r in rows if r["layout"] == layout])
        lines += part
        print("\n".join(part), flush=True)
    if args.out:
        with open(args.out + ".csv", "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=["collective", "layout", "rate", "link_model", "bytes", "mode", "seconds",
                                              "tuned_from"])
            w.writeheader()
            w.writerows(rows)
        with open(args.out + ".md", "w") as f:
            f.write("\n".join(lines).lstrip() + "\n")
        plot(args.out + ".png", rows, args.collective)


def plot(path, rows, collective="allreduce"):
    """One panel per layout: each program's time over MPICH's default at each size (below 1: faster)."""
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import _benchutil as bu

    panels = []
    for layout in dict.fromkeys(r["layout"] for r in rows):
        mine = [r for r in rows if r["layout"] == layout]
        base = {r["bytes"]: r["seconds"] for r in mine if r["mode"] == "MPICH default"}
        lines = []
        for mode in dict.fromkeys(r["mode"] for r in mine):
            pts = sorted((r["bytes"], r["seconds"] / base[r["bytes"]]) for r in mine if r["mode"] == mode)
            style = ({"linewidth": 2.5, "marker": "o"} if mode.startswith("mpidp") else
                     {"linestyle": "--", "alpha": 0.6} if mode != "MPICH default" else {"color": "black", "marker": "x"})
            lines.append((mode, [p[0] for p in pts], [p[1] for p in pts], style))
        panels.append((f"{layout}: time / MPICH default", lines))
    link = ("a full-duplex link per node" if rows[0].get("link_model") == "per-node" else "one link shared by both directions")
    bu.plot(path, panels, title=f"{collective} (float32) on a simulated cluster, MPICH OFI/TCP, inter-node link "
                                f"tc tbf {rows[0]['rate']}, {link}; below 1: faster than MPICH's default")


if __name__ == "__main__":
    main()
