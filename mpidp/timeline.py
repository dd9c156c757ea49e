"""Per-rank trace of compute, communication, copies and waits, merged into one Chrome-trace JSON.

Off unless ``start()`` is given a path (or ``MPIDP_TIMELINE`` names one),
and then every call below is one global check returning a shared no-op.
Every rank calls ``start`` and ``save`` alike (``save`` is a collective).
On, each rank appends (name, category, start, duration, thread) tuples from
any thread; ``save()`` gathers every rank's events and rank 0 writes one file
for Perfetto / chrome://tracing with one process row per rank and one
thread row per thread name (main, mpidp-engine, mpidp-loader, ...).

Clocks: each rank anchors its ``perf_counter`` to its wall clock at
``start()``; ranks are aligned by wall clock, exact on one node and as good
as the nodes' clock sync (NTP/PTP) across nodes.
"""
import json
import os
import sys
import threading
import time

from . import _env
from ._version import __version__

CATEGORIES = ("compute", "comm", "copy", "wait", "optim", "io")

_perf_ns = time.perf_counter_ns


class _NullSpan:
    """What ``span()`` returns while the timeline is off: one shared object doing nothing."""
    __slots__ = ()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def set(self, **args):
        pass


_NULL = _NullSpan()


class _Recorder:
    """One rank's events: tuples (phase, name, cat, t_ns, dur_ns, tid, args), appended from any thread."""

    def __init__(self, path):
        self.path = path
        self.events = []
        self.tids = {}  # thread name -> tid (row), in order of first event
        self.lock = threading.Lock()
        self.wall0_ns, self.perf0_ns = time.time_ns(), _perf_ns()

    def tid(self):
        name = threading.current_thread().name
        tid = self.tids.get(name)
        if tid is None:
            with self.lock:
                tid = self.tids.setdefault(name, len(self.tids))
        return tid

    def trace(self, rank):
        """This rank's part of the file, as plain Python data (what ``merge`` takes)."""
        return {"rank": rank, "wall0_ns": self.wall0_ns, "perf0_ns": self.perf0_ns,
                "threads": {tid: name for name, tid in self.tids.items()}, "events": list(self.events)}


class _Span:
    __slots__ = ("rec", "name", "cat", "args", "t0")

    def __init__(self, rec, name, cat, args):
        self.rec, self.name, self.cat, self.args = rec, name, cat, args

    def __enter__(self):
        self.t0 = _perf_ns()
        return self

    def set(self, **args):
        """Add arguments known only inside the span (bytes moved, ...)."""
        self.args.update(args)

    def __exit__(self, *exc):
        t1 = _perf_ns()
        self.rec.events.append(("X", self.name, self.cat, self.t0, t1 - self.t0, self.rec.tid(), self.args))
        return False


_rec = None  # the recording _Recorder, or None: the one check on every call


def _category(cat):
    if cat not in CATEGORIES:
        raise ValueError(f"timeline category {cat!r} is not one of {', '.join(CATEGORIES)}")
    return cat


def start(path=None):
    """Start recording on this rank (``path`` default: ``MPIDP_TIMELINE``; none -> stays off); True if on."""
    global _rec
    path = path or _env.get("MPIDP_TIMELINE")
    if not path:
        return False
    _rec = _Recorder(os.fspath(path))
    return True


def stop():
    """Stop recording and drop the events (``save()`` first to keep them)."""
    global _rec
    _rec = None


def enabled():
    """True while recording."""
    return _rec is not None


def span(name, cat="compute", **args):
    """Context manager timing its body as one event; a shared no-op while off."""
    rec = _rec
    if rec is None:
        return _NULL
    return _Span(rec, name, _category(cat), args)


def begin(name, cat="compute", **args):
    """Start an event that ``end(token)`` finishes (possibly in another thread); None while off."""
    rec = _rec
    if rec is None:
        return None
    return (rec, name, _category(cat), _perf_ns(), rec.tid(), args)


def end(token, **args):
    """Finish the event ``begin`` started, on the row of the thread that began it; extra args merged in."""
    if token is None:
        return
    rec, name, cat, t0, tid, begin_args = token
    if args:
        begin_args = {**begin_args, **args}
    rec.events.append(("X", name, cat, t0, _perf_ns() - t0, tid, begin_args))


def instant(name, **args):
    """A point in time on this thread's row (a skipped step, a checkpoint written)."""
    rec = _rec
    if rec is not None:
        rec.events.append(("i", name, "", _perf_ns(), 0, rec.tid(), args))


def counter(name, **values):
    """A counter track of this rank (bytes in flight, loss scale): ``values`` are numbers."""
    rec = _rec
    if rec is not None:
        rec.events.append(("C", name, "", _perf_ns(), 0, 0, values))


def merge(traces):
    """One Chrome-trace document from every rank's ``trace`` (pure: no I/O, no MPI)."""
    traces = [t for t in traces if t is not None]
    t0 = min((t["wall0_ns"] for t in traces), default=0)
    out = []
    for t in sorted(traces, key=lambda t: t["rank"]):
        pid = t["rank"]
        shift = t["wall0_ns"] - t["perf0_ns"] - t0  # perf_counter ns -> ns since the earliest start
        out.append({"ph": "M", "name": "process_name", "pid": pid, "tid": 0, "args": {"name": f"rank {pid}"}})
        out.append({"ph": "M", "name": "process_sort_index", "pid": pid, "tid": 0, "args": {"sort_index": pid}})
        for tid, name in sorted(t["threads"].items()):
            out.append({"ph": "M", "name": "thread_name", "pid": pid, "tid": tid, "args": {"name": name}})
            out.append({"ph": "M", "name": "thread_sort_index", "pid": pid, "tid": tid, "args": {"sort_index": tid}})
        for ph, name, cat, t_ns, dur_ns, tid, args in t["events"]:
            event = {"ph": ph, "name": name, "pid": pid, "tid": tid, "ts": round((t_ns + shift) / 1e3, 3)}
            if ph == "X":
                event["cat"], event["dur"] = cat, round(dur_ns / 1e3, 3)
            elif ph == "i":
                event["s"] = "t"
            if args:
                event["args"] = args
            out.append(event)
    return {"traceEvents": out, "displayTimeUnit": "ms",
            "otherData": {"producer": f"mpidp {__version__}", "t0_unix_ns": t0, "ranks": len(traces)}}


def _job():
    """(rank, size) of mpidp's runtime, or (0, 1) when it was never initialised (MPI is not imported)."""
    runtime = sys.modules.get("mpidp.comm.runtime")
    if runtime is not None and runtime.is_initialized():
        return runtime.rank(), runtime.size()
    return 0, 1


def _write(doc, path):
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "w") as f:
            json.dump(doc, f, separators=(",", ":"), default=str)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def save(path=None):
    """Collective (every rank that recorded calls it): rank 0 writes every rank's events to ``path``.

    Returns the path written on every rank, or None (and no communication)
    while this rank is not recording. Recording goes on, so a later save
    writes everything again; a failed write raises OSError on every rank.
    """
    rec = _rec
    if rec is None:
        return None
    path = os.fspath(path or rec.path)
    rank, size = _job()
    local = rec.trace(rank)
    if size == 1:
        _write(merge([local]), path)
        return path
    from .comm.objects import allgather_object, broadcast_object
    traces = allgather_object(local, name="timeline.save")
    error = None
    if rank == 0:
        try:
            _write(merge(traces), path)
        except OSError as exc:
            error = f"could not write the timeline to {path}: {exc}"
    error = broadcast_object(error, name="timeline.save.status")
    if error:
        raise OSError(error)
    return path


def start_timeline(file_path, mark_cycles=False):
    """Horovod's name: start recording on every rank; ``stop_timeline()`` writes ``file_path``.

    ``mark_cycles`` is accepted for Horovod scripts and changes nothing: mpidp has no
    coordinator cycles, every collective is its own span. Events recorded before are dropped.
    """
    if not file_path:
        raise ValueError("start_timeline needs a file path to write the trace to, got "
                         f"{file_path!r}")
    start(file_path)


def stop_timeline():
    """Horovod's name, a collective: write everything recorded since start_timeline (rank 0 writes
    one file for all ranks), then stop recording. Returns the path, or None when nothing was on."""
    path = save()
    stop()
    return path
