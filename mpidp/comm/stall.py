"""Stall inspector: a rank stuck in a collective says which one and which ranks never joined.

Every rank runs one daemon thread. Each communicator (the main one, each
process set) numbers its collectives and records the one it waits for (two
stores on the hot path, nothing else). When a wait outlives
``MPIDP_STALL_WARNING_S`` the thread asks the set's other members what they are
doing on that set, over a private communicator, and logs the ranks that are not
in the same collective of the set; past ``MPIDP_STALL_ABORT_S`` (default 300 s,
0 = never) it aborts the job. A long operation that calls ``tick()`` as it
progresses (a ring step, a piece) restarts the clock: it is slow, not stalled.
"""
import hashlib
import sys
import threading
import time

import numpy
from mpi4py import MPI

from .. import _env
from . import _abort

_QUERY, _REPLY = 1, 2
_POLL_S = 0.2
_ANSWER_S = 2.0


class Progress:
    """What this rank is doing on one communicator: collectives entered, and the wait in progress."""

    __slots__ = ("seq", "waiting", "wait_seq", "wait_start", "members", "key", "label")

    def __init__(self):
        self.seq = self.wait_seq = 0
        self.waiting = None      # description of the collective being waited for
        self.wait_start = 0.0
        self.members, self.key, self.label = (), 0, "all ranks"

    def bind(self, members, index=None):
        """Name the communicator: its members (ranks of the job) and, for a process set, its
        creation index; the key (0 for the main communicator) is then equal on every rank."""
        self.members = members
        if index is not None:
            digest = hashlib.blake2b(repr((members, index)).encode(), digest_size=7).digest()
            self.key = int.from_bytes(digest, "little") | 1
            self.label = f"process set {list(members)}"

    def started(self):
        """Count a collective this rank has entered on the communicator; returns its number."""
        self.seq += 1
        return self.seq

    def begin_wait(self, what, seq):
        self.wait_seq = seq
        self.wait_start = time.monotonic()
        self.waiting = what

    def end_wait(self):
        self.waiting = None

    def tick(self):
        """The wait in progress is progressing: its stall clock starts again."""
        self.wait_start = time.monotonic()

    def row(self):
        if self.waiting is None:
            return [self.seq, 0, 0]
        return [self.wait_seq, 1, int((time.monotonic() - self.wait_start) * 1000)]


main = Progress()
"""mpidp's main communicator."""
progress = main  # the name earlier versions used
_tracked = {0: main}  # key -> Progress of every communicator in use
_thread = None
_stop = threading.Event()


def started():
    """Count a collective this rank has entered on the main communicator; returns its number."""
    return main.started()


def tick():
    """The collective this thread is running progresses (a ring step, a piece): its clock restarts."""
    from .engine import current
    engine = current()
    (engine.progress if engine is not None else main).tick()


def track(p):
    _tracked[p.key] = p


def untrack(p):
    if _tracked.get(p.key) is p:
        del _tracked[p.key]


def start(comm):
    """Start the inspector thread over a duplicate of ``comm`` (collective)."""
    global _thread
    if _thread is not None or comm.Get_size() == 1 or MPI.Query_thread() < MPI.THREAD_MULTIPLE:
        return
    warn_s = _env.get("MPIDP_STALL_WARNING_S")
    abort_s = _env.get("MPIDP_STALL_ABORT_S")
    _stop.clear()
    _thread = threading.Thread(target=_run, args=(comm.Dup(), warn_s, abort_s),
                               name="mpidp-stall-inspector", daemon=True)
    _thread.start()


def stop():
    """Stop the thread (called by shutdown)."""
    global _thread
    if _thread is not None:
        _stop.set()
        _thread.join()
        _thread = None


class _Answers:
    """Answers peers' "what are you doing?" queries; served while this rank asks its own too."""

    def __init__(self, comm):
        self.comm = comm
        self.query = numpy.zeros(1, numpy.int64)  # the key of the communicator asked about
        self.status = MPI.Status()
        self.pending = comm.Irecv(self.query, source=MPI.ANY_SOURCE, tag=_QUERY)
        self.replies = []

    def serve(self):
        while self.pending.Test(self.status):
            p = _tracked.get(int(self.query[0]))
            reply = numpy.array(p.row() if p is not None else [0, 0, -1], numpy.int64)
            self.replies.append((self.comm.Isend(reply, dest=self.status.Get_source(), tag=_REPLY), reply))
            self.pending = self.comm.Irecv(self.query, source=MPI.ANY_SOURCE, tag=_QUERY)
        self.replies = [r for r in self.replies if not r[0].Test()]

    def close(self):
        self.pending.Cancel()
        self.pending.Wait()


def _run(comm, warn_s, abort_s):
    me = comm.Get_rank()
    answers = _Answers(comm)
    warned_for = {}  # key -> (seq, aborting) last reported
    while not _stop.wait(_POLL_S):
        answers.serve()
        for p in list(_tracked.values()):
            what, seq = p.waiting, p.wait_seq
            if what is None:
                warned_for.pop(p.key, None)
                continue
            waited = time.monotonic() - p.wait_start
            level_abort = bool(abort_s) and waited >= abort_s
            if waited < warn_s or warned_for.get(p.key) == (seq, level_abort):
                continue
            missing = _ask_peers(comm, me, p, seq, answers)
            warned_for[p.key] = (seq, level_abort)
            where = "" if p.label == "all ranks" else f" on {p.label}"
            message = (f"[rank {me}] stall: waiting {waited:.0f} s in {what} (collective #{seq}{where}); "
                       f"ranks not in it: {missing or 'none (all ranks wait: suspect a mismatched call order)'}")
            if level_abort:
                sys.stderr.write(message + f"; aborting after MPIDP_STALL_ABORT_S={abort_s:g}\n")
                sys.stderr.flush()
                _abort.abort(comm, 1)
            sys.stderr.write(message + "\n")
            sys.stderr.flush()
    answers.close()
    comm.Free()


def _ask_peers(comm, me, p, seq, answers):
    """Describe the other members of ``p``'s communicator that are not waiting in its collective ``seq``."""
    peers = [r for r in (p.members or range(comm.Get_size())) if r != me]
    rows = {r: numpy.zeros(3, numpy.int64) for r in peers}
    recvs = {r: comm.Irecv(rows[r], source=r, tag=_REPLY) for r in peers}
    ask = numpy.array([p.key], numpy.int64)
    sends = [comm.Isend(ask, dest=r, tag=_QUERY) for r in peers]
    deadline = time.monotonic() + _ANSWER_S
    while time.monotonic() < deadline and not all(q.Test() for q in recvs.values()):
        answers.serve()  # peers waiting in the same collective are asking us at the same time
        time.sleep(0.01)
    out = []
    on = "" if p.label == "all ranks" else " of this set"
    for r in peers:
        if not recvs[r].Test():
            recvs[r].Cancel()
            out.append(f"{r} (no answer: busy without MPI calls, or dead)")
            continue
        their_seq, waiting, ms = rows[r]
        if waiting and their_seq == seq:
            continue
        if ms < 0:
            where = "no collective on this set yet"
        elif waiting:
            where = f"waiting {ms / 1000:.0f} s in collective #{their_seq}{on}"
        else:
            where = f"not in a collective{on}, {their_seq} entered so far"
        out.append(f"{r} ({where})")
    MPI.Request.Waitall(sends)
    return ", ".join(out)
