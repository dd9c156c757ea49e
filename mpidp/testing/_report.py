"""Cross-rank test outcomes: what a rank sends about a report, how rank 0 decides, how ranks apply it.

Pure functions over pytest reports and plain dicts; no MPI here.
"""
import zlib

# Captured output sent from a failing rank is clipped to its tail: a test that prints
# megabytes on every rank would otherwise make rank 0 receive all of it.
SECTION_CHARS = 20_000


def ranks_word(ranks):
    """'rank 1' or 'ranks 0,2'."""
    return ("rank " if len(ranks) == 1 else "ranks ") + ",".join(map(str, ranks))


def _clip(text, limit=SECTION_CHARS):
    if len(text) <= limit:
        return text
    return f"[... {len(text) - limit} characters cut by mpidp ...]\n" + text[-limit:]


def skip_reason(report):
    """The reason of a skipped report, without pytest's 'Skipped: ' prefix."""
    if hasattr(report, "wasxfail"):
        return str(report.wasxfail)
    longrepr = report.longrepr
    reason = longrepr[2] if isinstance(longrepr, tuple) else str(longrepr)
    return reason[len("Skipped: "):] if reason.startswith("Skipped: ") else reason


def summarize(report, timed_out=None):
    """What one rank tells rank 0 about one phase of one test (small unless it failed)."""
    row = {"outcome": report.outcome, "xfail": hasattr(report, "wasxfail"),
           "duration": report.duration}
    if timed_out:
        row["timed_out"] = timed_out
    if report.failed:
        row["text"] = report.longreprtext
        crash = getattr(report.longrepr, "reprcrash", None)
        row["message"] = crash.message if crash is not None else row["text"].strip().split("\n")[-1]
        row["where"] = (crash.path, crash.lineno) if crash is not None else None
        row["sections"] = [(title, _clip(content)) for title, content in report.sections]
    elif report.skipped:
        row["reason"] = skip_reason(report)
        if isinstance(report.longrepr, tuple):
            row["where"] = tuple(report.longrepr[:2])
    return row


def _group_reasons(rows, ranks):
    reasons = {}
    for r in ranks:
        reasons.setdefault(rows[r]["reason"], []).append(r)
    if len(reasons) == 1:
        return next(iter(reasons))
    return "; ".join(f"{ranks_word(rs)}: {reason}" for reason, rs in reasons.items())


def decide(when, rows):
    """Rank 0's verdict on one phase from every rank's row (index = rank).

    A phase failed if it failed (or timed out) on any rank. A skip counts only where every
    rank skipped, except in setup: a rank that skipped its setup cannot run the test, so
    nobody does. In the call phase an expected failure (xfail) on some rank wins over
    passes elsewhere.
    """
    failed = [r for r, row in enumerate(rows) if row["outcome"] == "failed" or row.get("timed_out")]
    skipped = [r for r, row in enumerate(rows) if row["outcome"] == "skipped"]
    xfailed = [r for r in skipped if rows[r]["xfail"]]
    verdict = {"failed": failed, "skipped": skipped, "size": len(rows),
               "duration": max(row["duration"] for row in rows)}
    if failed:
        verdict["outcome"] = "failed"
        verdict["timed_out"] = [r for r in failed if rows[r].get("timed_out")]
    elif when == "call" and xfailed:
        verdict["outcome"] = "xfailed"
        verdict["reason"] = rows[xfailed[0]]["reason"]
    elif skipped and (when == "setup" or len(skipped) == len(rows)):
        verdict["outcome"] = "skipped"
        reason = _group_reasons(rows, skipped)
        if len(skipped) < len(rows):
            reason = f"skipped on {ranks_word(skipped)} of {len(rows)}: {reason}"
        verdict["reason"] = reason
        verdict["where"] = rows[skipped[0]].get("where")
    else:
        verdict["outcome"] = "passed"
        if skipped:
            verdict["note"] = f"skipped on {ranks_word(skipped)}: {_group_reasons(rows, skipped)}"
    return verdict


class _Crash:
    """The one-line summary pytest prints after 'FAILED nodeid - '."""

    def __init__(self, path, lineno, message):
        self.path, self.lineno, self.message = path, lineno, message


class RanksRepr:
    """A failure seen on some ranks: each distinct traceback once, under the ranks that raised it."""

    def __init__(self, header, groups, crash):
        self.header, self.groups, self.reprcrash = header, groups, crash

    def toterminal(self, tw):
        tw.line(self.header, red=True, bold=True)
        for ranks, text in self.groups:
            tw.sep("-", ranks_word(ranks) + (" (same traceback)" if len(ranks) > 1 else ""))
            for line in text.split("\n"):
                tw.line(line)

    def __str__(self):
        parts = [self.header]
        for ranks, text in self.groups:
            parts += [f"--- {ranks_word(ranks)} ---", text]
        return "\n".join(parts)


def failure_header(verdict, seconds=None):
    """'failed on rank 1 of 3' / 'timed out after 5 s on rank 1 of 2'."""
    size = verdict["size"]
    timed_out = verdict.get("timed_out") or []
    if timed_out and timed_out == verdict["failed"]:
        return f"timed out after {seconds:g} s on {ranks_word(timed_out)} of {size}"
    head = f"failed on {ranks_word(verdict['failed'])} of {size}"
    if timed_out:
        head += f" ({ranks_word(timed_out)} timed out after {seconds:g} s)"
    return head


def ranks_repr(verdict, rows, seconds=None):
    """Rank 0's long report of a failed phase, built from the failing ranks' rows."""
    groups = {}
    for r in verdict["failed"]:
        row = rows[r]
        text = row.get("text") or row.get("timed_out") or "(no report)"
        groups.setdefault(text, []).append(r)
    first = rows[verdict["failed"][0]]
    message = first.get("message") or first.get("timed_out") or ""
    path, lineno = first.get("where") or ("", 0)
    crash = _Crash(path, lineno, f"[{ranks_word(verdict['failed'])}] {message}")
    return RanksRepr(failure_header(verdict, seconds),
                     [(ranks, text) for text, ranks in groups.items()], crash)


def apply(report, verdict, rows=None, seconds=None):
    """Rewrite this rank's report to the agreed outcome; ``rows`` only on rank 0."""
    outcome = verdict["outcome"]
    report.duration = verdict["duration"]
    if outcome == "failed":
        if rows is not None:
            report.longrepr = ranks_repr(verdict, rows, seconds)
            report.sections = [(f"{title} [rank {r}]", content)
                               for r in verdict["failed"] for title, content in rows[r].get("sections", ())]
        elif not report.failed:
            report.longrepr = (f"{failure_header(verdict, seconds)}; "
                               "rank 0's report has the tracebacks")
        if hasattr(report, "wasxfail") and not report.failed:
            del report.wasxfail
        report.outcome = "failed"
    elif outcome == "xfailed":
        if not report.skipped:
            report.longrepr = f"expected failure on {ranks_word(verdict['skipped'])}"
        report.outcome = "skipped"
        report.wasxfail = verdict["reason"]
    elif outcome == "skipped":
        if not report.skipped or len(verdict["skipped"]) < verdict["size"]:
            path, lineno = verdict.get("where") or (str(report.fspath), 0)
            report.longrepr = (path, lineno, "Skipped: " + verdict["reason"])
        report.outcome = "skipped"
    else:
        if report.skipped:
            report.longrepr = None
            report.outcome = "passed"
        if rows is not None and verdict.get("note"):
            report.sections.append(("mpidp", verdict["note"]))


def overall_outcome(reports):
    """One word for a whole test from its agreed phase reports (as pytest's summary counts it)."""
    for rep in reports:
        if rep.failed:
            return "failed" if rep.when == "call" else "error"
    for rep in reports:
        if rep.skipped:
            return "xfailed" if hasattr(rep, "wasxfail") else "skipped"
    if any(hasattr(rep, "wasxfail") for rep in reports):
        return "xpassed"
    return "passed"


def pack_ids(nodeids):
    """Collected node ids, compressed for the cross-rank comparison."""
    return zlib.compress("\n".join(nodeids).encode(), 1)


def first_difference(packed_by_rank):
    """'rank 0 has 5 tests, rank 1 has 4; first difference at #3: a vs b' for differing collections."""
    lists = [zlib.decompress(p).decode().split("\n") if p else [] for p in packed_by_rank]
    base = lists[0]
    for r, other in enumerate(lists[1:], 1):
        if other == base:
            continue
        i = next((i for i, (a, b) in enumerate(zip(base, other)) if a != b), min(len(base), len(other)))
        a = base[i] if i < len(base) else "(end)"
        b = other[i] if i < len(other) else "(end)"
        return (f"rank 0 collected {len(base)} tests, rank {r} collected {len(other)}; "
                f"first difference at #{i}: rank 0 has {a}, rank {r} has {b}")
    return ""


def decide_collection(rows, keep_going=False):
    """Rank 0's verdict after collection: {'stop': reason or None}; a failed import on one rank stops all."""
    bad = [r for r, row in enumerate(rows) if row["errors"]]
    if bad and not keep_going:
        nodeid = rows[bad[0]]["errors"][0][0] or "(session)"
        return {"stop": f"collection failed on {ranks_word(bad)} of {len(rows)} (first: {nodeid})"}
    if len({row["ids"] for row in rows}) > 1:
        return {"stop": "ranks collected different tests: " + first_difference([row["ids"] for row in rows])}
    return {"stop": None}


# How bad an exit status is, worst first: the job's status is the worst of its ranks'.
_SEVERITY = (3, 2, 4, 1, 5, 0)


def decide_final(rows):
    """Rank 0's verdict at session end: one exit status for every rank."""
    statuses = [row["exitstatus"] for row in rows]
    worst = min(statuses, key=lambda s: _SEVERITY.index(s) if s in _SEVERITY else -1)
    return {"exitstatus": worst, "statuses": statuses}
