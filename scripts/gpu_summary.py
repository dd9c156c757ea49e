"""The summary of a scripts/gpu_check.sh run: phases, test counts, cuda_aware, benchmarks, targets.

    python scripts/gpu_summary.py OUTDIR [--dry-run] [--seconds S]

Reads OUTDIR/phases.tsv, OUTDIR/tests/*.xml (JUnit) and OUTDIR/bench/*.json,
prints the summary as markdown and writes it to OUTDIR/summary.md. Exit 1 when
a phase did not pass or (outside a dry run) a GPU test was skipped; missed
performance targets are reported, not failures.
"""
import argparse
import glob
import json
import os
import sys
import time
import xml.etree.ElementTree as ET

# skip reasons that mean "no GPU here": on a GPU machine each of them is a failure of the check
NO_GPU = ("cuda device", "needs cupy", "no gpu", "cupy is not")
TEST_PHASES = {"tests1": "tests at 1 rank", "tests2": "tests at 2 ranks (one GPU shared)",
               "rest": "rest of the suite at 1 rank"}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("outdir")
    p.add_argument("--dry-run", action="store_true", help="a --cpu-dry-run: no figure is a GPU result")
    p.add_argument("--seconds", type=float, default=None, help="wall time of the whole run")
    return p.parse_args(argv)


def read_phases(outdir):
    """[(name, status, seconds, limit, log)] in run order."""
    path = os.path.join(outdir, "phases.tsv")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [tuple((line.rstrip("\n").split("\t") + [""] * 5)[:5]) for line in f if line.strip()]


def read_junit(path):
    """Counts of one JUnit file: passed, failed, errors, skipped, GPU-skipped, seconds, and the failed names."""
    counts = {"passed": 0, "failed": 0, "errors": 0, "skipped": 0, "gpu_skipped": 0, "seconds": 0.0,
              "failures": []}
    root = ET.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else root.findall("testsuite")
    for suite in suites:
        counts["seconds"] += float(suite.get("time", 0) or 0)
        for case in suite.iter("testcase"):
            name = f"{case.get('classname', '')}::{case.get('name', '')}"
            if case.find("failure") is not None:
                counts["failed"] += 1
                counts["failures"].append(name)
            elif case.find("error") is not None:
                counts["errors"] += 1
                counts["failures"].append(name)
            elif case.find("skipped") is not None:
                counts["skipped"] += 1
                message = (case.find("skipped").get("message") or "").lower()
                if any(s in message for s in NO_GPU):
                    counts["gpu_skipped"] += 1
            else:
                counts["passed"] += 1
    return counts


def read_bench(outdir):
    """section -> document, from OUTDIR/bench/*.json (train: every train_<device>_np<N>.json as one list)."""
    docs = {}
    for path in sorted(glob.glob(os.path.join(outdir, "bench", "*.json"))):
        if path.endswith("timeline_trace.json"):
            continue
        try:
            with open(path) as f:
                doc = json.load(f)
        except (OSError, ValueError):
            continue
        if not isinstance(doc, dict) or "section" not in doc:
            continue
        if doc["section"] == "train":
            docs.setdefault("train", []).append(doc)
        else:
            docs[doc["section"]] = doc
    return docs


def table(header, rows):
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return lines


def fmt(value, spec=".3f"):
    return "-" if value is None else format(value, spec)


def summarize(args):
    """(markdown lines, exit status)."""
    phases = read_phases(args.outdir)
    bench = read_bench(args.outdir)
    env = bench.get("env", {})
    info = env.get("info", {})
    ranks = env.get("rows", [])
    lines = ["# GPU check summary", ""]
    if args.dry_run:
        lines += ["**CPU DRY RUN: NumPy stand-ins at tiny sizes. Nothing here was measured on a GPU; these "
                  "figures check the plumbing only.**", ""]
    device = ranks[0].get("device_name") if ranks else None
    lines.append(f"- date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}"
                 + (f", wall time {args.seconds:.0f} s" if args.seconds is not None else ""))
    lines.append(f"- device: {device or 'none (CPU)'}"
                 + (f", {ranks[0].get('device_memory_gib')} GiB, {ranks[0].get('device_count')} device(s)"
                    if device else ""))
    if info:
        lines.append("- versions: " + ", ".join(f"{k} {info[k]}" for k in ("python", "numpy", "cupy", "cuda_runtime",
                                                                          "cuda_driver", "mpi4py", "mpidp")
                                                if k in info))
        lines.append(f"- MPI: {info.get('mpi_library', '?')}")
    for r in ranks:
        lines.append(f"- rank {r['rank']} (local {r['local_rank']}): device {r.get('bound_device')}, "
                     f"cuda_aware() = {r['cuda_aware']} ({r['cuda_aware_how']})")
    lines.append("")

    failed = []
    lines += ["## Phases", ""]
    rows = []
    for name, status, seconds, limit, log in phases:
        rows.append((name, status, seconds, limit, log))
        if status != "ok":
            failed.append(f"phase {name} {status}")
    lines += table(("phase", "status", "seconds", "limit s", "log"), rows) + [""]

    tests = {}
    for phase in TEST_PHASES:
        path = os.path.join(args.outdir, "tests", f"{phase}.xml")
        if os.path.exists(path):
            try:
                tests[phase] = read_junit(path)
            except ET.ParseError as exc:
                failed.append(f"{path} is not valid JUnit XML ({exc})")
    if tests:
        lines += ["## Tests", ""]
        lines += table(("run", "passed", "failed", "errors", "skipped", "of them for want of a GPU", "seconds"),
                       [(TEST_PHASES[p], c["passed"], c["failed"], c["errors"], c["skipped"], c["gpu_skipped"],
                         f"{c['seconds']:.0f}") for p, c in tests.items()]) + [""]
        for p, c in tests.items():
            if c["failures"]:
                failed.append(f"{len(c['failures'])} test(s) failed in {p}")
            for name in c["failures"][:20]:
                lines.append(f"- {p} failed: `{name}`")
        lines.append("")

    lines += bench_lines(bench)

    lines += ["## Targets (issue 20)", ""]
    rows = []
    for phase in ("tests1", "tests2"):
        c = tests.get(phase)
        if c is None:
            rows.append((f"every GPU test green, {TEST_PHASES[phase]}", "not run", "all pass, none skipped", "no"))
            continue
        green = c["failed"] == 0 and c["errors"] == 0 and (c["gpu_skipped"] == 0 or args.dry_run)
        if c["gpu_skipped"] and not args.dry_run:
            failed.append(f"{c['gpu_skipped']} GPU test(s) skipped in {phase} on a machine that should have a GPU")
        rows.append((f"every GPU test green, {TEST_PHASES[phase]}",
                     f"{c['passed']} passed, {c['failed'] + c['errors']} failed, {c['gpu_skipped']} skipped "
                     f"for want of a GPU", "all pass, none skipped",
                     ("yes" if green else "no") + (" (dry run: GPU tests skip)" if args.dry_run else "")))
    for section in ("staging", "offload"):
        doc = bench.get(section)
        if doc is None:
            rows.append((f"{section} targets", "not run", "-", "no"))
            continue
        for t in doc["targets"]:
            met = "yes" if t["met"] else "no"
            if doc["device"] != "gpu":
                met += " (CPU stand-in, not a GPU figure)"
            rows.append((t["name"], fmt(t["measured"]), f">= {t['target']}", met))
    lines += table(("target", "measured", "target", "met"), rows) + [""]
    if failed:
        lines += ["## Failures", ""] + [f"- {f}" for f in failed] + [""]
    lines.append(f"**result: {'FAILED' if failed else 'passed'}**"
                 + (" (dry run: plumbing only)" if args.dry_run else ""))
    return lines, 1 if failed else 0


def bench_lines(bench):
    lines = []
    doc = bench.get("staging")
    if doc and doc["rows"]:
        big = doc["rows"][-1]
        lines += [f"## Benchmarks ({doc['device']})", "",
                  f"- staging at {big['size']}: pinned H2D {big['pinned_h2d_gbps']:.1f} / D2H "
                  f"{big['pinned_d2h_gbps']:.1f} GB/s, pageable {big['pageable_h2d_gbps']:.1f} / "
                  f"{big['pageable_d2h_gbps']:.1f} GB/s, mpidp staging round trip {big['staged_roundtrip_gbps']:.1f} "
                  f"GB/s ({big['staged_vs_pinned']:.2f}x pinned)"]
    doc = bench.get("collectives")
    if doc and doc["rows"]:
        if not lines:
            lines += [f"## Benchmarks ({doc['device']})", ""]
        largest = max(r["bytes"] for r in doc["rows"])
        for r in doc["rows"]:
            if r["bytes"] == largest:
                lines.append(f"- {r['op']} {r['size']} at np={r['ranks']}: device arrays {r['device_us']:.0f} µs, "
                             f"NumPy {r['mpidp_numpy_us']:.0f} µs ({r['device_vs_host']:.2f}x), raw mpi4py "
                             f"{r['raw_numpy_us']:.0f} µs")
    for d in bench.get("train", []):
        for r in d["rows"]:
            lines.append(f"- train {r['model']} on {r['device']} at np={r['ranks']}: {r['samples_per_s']:,.0f} "
                         f"samples/s ({r['step_ms']:.2f} ms/step, batch {r['batch_per_rank']} per rank)")
    doc = bench.get("offload")
    if doc:
        for r in doc["rows"]:
            lines.append(f"- offload batch {r['batch']}: prefetch {r['prefetch_h2d_gbps']:.1f} GB/s vs plain pinned "
                         f"{r['plain_pinned_h2d_gbps']:.1f} GB/s, {r['hidden_fraction']:.0%} of copy time hidden, "
                         f"{r['step_ms']:.1f} ms/step")
    doc = bench.get("timeline")
    if doc and doc["rows"]:
        step = doc["rows"][0]["step_ms"]
        parts = ", ".join(f"rank {r['rank']} {r['category']} {r['ms_in_step']:.2f}" for r in doc["rows"])
        lines.append(f"- one traced step: {step:.2f} ms; ms per category: {parts} (bench/timeline.png)")
    return lines + [""] if lines else []


def main(argv=None):
    args = parse_args(argv)
    if not os.path.isdir(args.outdir):
        sys.exit(f"gpu_summary: {args.outdir} is not a folder written by scripts/gpu_check.sh")
    lines, status = summarize(args)
    text = "\n".join(lines)
    print(text)
    with open(os.path.join(args.outdir, "summary.md"), "w") as f:
        f.write(text + "\n")
    return status


if __name__ == "__main__":
    sys.exit(main())
