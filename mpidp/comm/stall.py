"""Stall inspector: a rank stuck in a collective says which one and which ranks never joined.

Every rank runs one daemon thread. A waiting rank records what it waits for
(two stores on the hot path, nothing else). When a wait outlives
``MPIDP_STALL_WARNING_S`` the thread asks every peer's thread what it is doing,
over a private communicator, and logs the ranks that are not in the same
collective; past ``MPIDP_STALL_ABORT_S`` (default 300 s, 0 = never) it aborts the
job. A long operation that calls ``tick()`` as it progresses (a piece, a ring step)
restarts the clock: it is slow, not stalled.
"""
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


class _Progress:
    """What this rank is doing: collective counter, and the wait in progress (if any)."""
    seq = 0
    waiting = None      # description of the collective being waited for
    wait_seq = 0
    wait_start = 0.0


progress = _Progress()
_thread = None
_stop = threading.Event()


def started():
    """Count a collective this rank has entered; returns its number."""
    progress.seq += 1
    return progress.seq


def begin_wait(what, seq):
    progress.wait_seq = seq
    progress.wait_start = time.monotonic()
    progress.waiting = what


def tick():
    """The wait in progress is progressing: its stall clock starts again."""
    progress.wait_start = time.monotonic()


def end_wait():
    progress.waiting = None


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


def _state_row():
    if progress.waiting is None:
        return [progress.seq, 0, 0]
    return [progress.wait_seq, 1, int((time.monotonic() - progress.wait_start) * 1000)]


class _Answers:
    """Answers peers' "what are you doing?" queries; served while this rank asks its own too."""

    def __init__(self, comm):
        self.comm = comm
        self.query = numpy.zeros(1, numpy.int64)
        self.status = MPI.Status()
        self.pending = comm.Irecv(self.query, source=MPI.ANY_SOURCE, tag=_QUERY)
        self.replies = []

    def serve(self):
        while self.pending.Test(self.status):
            reply = numpy.array(_state_row(), numpy.int64)
            self.replies.append((self.comm.Isend(reply, dest=self.status.Get_source(), tag=_REPLY), reply))
            self.pending = self.comm.Irecv(self.query, source=MPI.ANY_SOURCE, tag=_QUERY)
        self.replies = [r for r in self.replies if not r[0].Test()]

    def close(self):
        self.pending.Cancel()
        self.pending.Wait()


def _run(comm, warn_s, abort_s):
    me, n = comm.Get_rank(), comm.Get_size()
    answers = _Answers(comm)
    warned_for = None
    while not _stop.wait(_POLL_S):
        answers.serve()
        what, seq = progress.waiting, progress.wait_seq
        if what is None:
            warned_for = None
            continue
        waited = time.monotonic() - progress.wait_start
        if waited < warn_s or warned_for == (seq, abort_s and waited >= abort_s):
            continue
        missing = _ask_peers(comm, me, n, seq, answers)
        level_abort = bool(abort_s) and waited >= abort_s
        warned_for = (seq, level_abort)
        message = (f"[rank {me}] stall: waiting {waited:.0f} s in {what} (collective #{seq}); "
                   f"ranks not in it: {missing or 'none (all ranks wait: suspect a mismatched call order)'}")
        if level_abort:
            sys.stderr.write(message + f"; aborting after MPIDP_STALL_ABORT_S={abort_s:g}\n")
            sys.stderr.flush()
            _abort.abort(comm, 1)
        sys.stderr.write(message + "\n")
        sys.stderr.flush()
    answers.close()
    comm.Free()


def _ask_peers(comm, me, n, seq, answers):
    """Describe the peers that are not waiting in collective ``seq``."""
    peers = [r for r in range(n) if r != me]
    rows = {r: numpy.zeros(3, numpy.int64) for r in peers}
    recvs = {r: comm.Irecv(rows[r], source=r, tag=_REPLY) for r in peers}
    ask = numpy.array([seq], numpy.int64)
    sends = [comm.Isend(ask, dest=r, tag=_QUERY) for r in peers]
    deadline = time.monotonic() + _ANSWER_S
    while time.monotonic() < deadline and not all(q.Test() for q in recvs.values()):
        answers.serve()  # peers waiting in the same collective are asking us at the same time
        time.sleep(0.01)
    out = []
    for r in peers:
        if not recvs[r].Test():
            recvs[r].Cancel()
            out.append(f"{r} (no answer: busy without MPI calls, or dead)")
            continue
        their_seq, waiting, ms = rows[r]
        if waiting and their_seq == seq:
            continue
        where = f"waiting {ms / 1000:.0f} s in collective #{their_seq}" if waiting else \
            f"not in a collective, {their_seq} entered so far"
        out.append(f"{r} ({where})")
    MPI.Request.Waitall(sends)
    return ", ".join(out)
