"""One ordered queue of collectives per communicator, each run by its own background thread.

Every rank submits collectives in program order and each communicator's engine
runs them in that order with blocking MPI calls, so nonblocking operations keep
the same order on every rank and overlap with the caller's compute (mpi4py
releases the GIL inside MPI). Communicators (process sets) do not wait for each
other: overlapping sets used in different orders on different ranks complete,
as in Horovod. A blocking call made while the queue is empty runs directly in
the caller's thread, and a caller waiting for a handle runs the queued work
itself while the engine thread is idle: no thread hand-off on the common paths
(it cost 20-50 us per collective).

Every MPI call on mpidp's communicators runs as a job of its communicator's
engine; ``current()`` says which engine's job this thread is executing, so
helpers that issue collectives (``check.agree``) route themselves through it.
"""
import collections
import random
import signal
import threading
import time

import numpy

from .. import timeline
from . import stall

try:
    from _signal import getsignal as _getsignal  # signal.getsignal's enum conversion costs 5 us
except ImportError:  # pragma: no cover - other Pythons
    _getsignal = signal.getsignal

_PENDING, _DONE, _FINISHING, _FINISHED = range(4)
_local = threading.local()  # .engine / .seq: the job this thread is executing, if any
_BUSY = object()  # claim(): the engine cannot run a job in this thread now
_OUTSIDE = (None, 0)  # _enter(): this thread ran no job
_MAIN = threading.main_thread().ident

test_delay_s = 0.0
"""Test-only: when > 0, random sleeps up to this long where callers submit and wait and where
the engine thread picks up work, to shake out ordering bugs (the torture test sets it)."""


def _jitter():
    time.sleep(random.random() * test_delay_s)


def current():
    """The Engine whose job this thread is executing, or None."""
    return getattr(_local, "engine", None)


class Handle:
    """A collective in flight: ``wait()`` returns its result (or raises its error).

    The caller-side finish (copy back, scaling) runs exactly once, in whichever waiting
    thread gets there first; every other waiter gets the same result or error.
    """

    __slots__ = ("what", "seq", "_engine", "_state", "_value", "_error", "_finish", "_release", "_result",
                 "t_start", "t_end")

    def __init__(self, what, seq, finish=None, engine=None, release=None):
        self.what, self.seq, self._engine = what, seq, engine or _main
        self._state = _PENDING
        self._value = self._error = self._result = None
        self._finish, self._release = finish, release
        self.t_start = self.t_end = 0.0

    def done(self):
        """True when the communication has completed (wait() then returns at once)."""
        return self._state != _PENDING

    def wait(self):
        """Block until complete; run the caller-side finish once; return the result."""
        if self._state != _FINISHED:
            self._settle()
        if self._error is not None:
            raise self._error
        return self._result

    def seconds(self):
        """How long the engine spent running this collective."""
        return self.t_end - self.t_start

    def _settle(self):
        engine = self._engine
        if test_delay_s:
            _jitter()
        if not engine.help_until(self):  # runs queued work here rather than hand it off
            return  # another waiter finished it
        try:
            if self._error is None:
                self._result = self._value if self._finish is None else self._finish(self._value)
            elif self._release is not None:
                self._release()  # staging buffers go back to their pool on errors too
        except BaseException as exc:
            self._error = exc
        finally:
            self._finish = self._value = self._release = None
            with engine._lock:
                self._state = _FINISHED
                engine._notify()
            _hold_while_finishing(False)

    def _complete(self, fn):
        self.t_start = time.perf_counter()
        try:
            self._value = fn()
        except BaseException as exc:  # delivered to the waiter, on every rank alike
            self._error = exc
        self.t_end = time.perf_counter()
        self._state = _DONE


class Engine:
    """The ordered queue of one communicator (``comm`` is bound on first use)."""

    def __init__(self, progress, comm=None, name="mpidp-engine"):
        self.progress, self.comm, self.name = progress, comm, name
        self._queue = collections.deque()
        self._lock = threading.RLock()  # the condition's lock; ``with self._lock`` skips its Python wrapper
        self._cv = threading.Condition(self._lock)
        self._busy = False
        self._helpers = 0  # callers waiting in help_until: while any waits, it drives the queue
        self._drainers = 0  # callers waiting in drain()
        self._finishers = 0  # callers waiting while another thread finishes their handle
        self._thread = None
        self._stopping = False
        self.plans = {}  # the collectives' per-signature work, cached (valid while ``comm`` is bound)
        self.meeting = None  # the check's buffers (``check.meet``; valid while ``comm`` is bound)

    def started(self):
        """Number the next collective on this communicator (program order, so equal on every rank).

        Inside a job of this engine it is that job's number: a helper that runs within a job
        (a check, a nested collective) belongs to it, and numbering it here would race the
        caller's thread.
        """
        if getattr(_local, "engine", None) is self:
            return _local.seq
        return self.progress.started()

    def peek(self):
        """The number ``started()`` will give next, without taking it: a collective refused by its
        local checks before any communication takes no number, so it did nothing at all."""
        if getattr(_local, "engine", None) is self:
            return _local.seq
        return self.progress.seq + 1

    def submit(self, fn, what, seq, finish=None, wake=True, release=None):
        """Queue ``fn`` (blocking MPI work) behind everything submitted before; return its Handle.

        ``finish(value)`` runs in the waiting thread; ``release()`` runs instead when ``fn``
        raised. ``wake=False`` leaves the engine thread asleep: for work the caller waits for
        at once, which then runs in the caller's thread (a wake-up costs 50-100 us when every
        core is busy).
        """
        handle = Handle(what, seq, finish, self, release)
        with self._lock:
            if self._thread is None:
                self._stopping = False
                self._thread = threading.Thread(target=self._loop, name=self.name, daemon=True)
                self._thread.start()
            self._queue.append((handle, fn))
            if wake:  # all: a single wake-up may go to a waiter that cannot take this job
                self._cv.notify_all()
        if test_delay_s:
            _jitter()
        return handle

    def run(self, fn, what, seq, finish=None, release=None):
        """Run ``fn`` now in this thread if nothing is queued, else behind the queue; return the result."""
        if getattr(_local, "engine", None) is self:  # inside one of our jobs: already in order
            value = fn()
            return value if finish is None else finish(value)
        outer = self.claim(what, seq)
        if outer is _BUSY:
            return self.submit(fn, what, seq, finish, release=release).wait()
        try:
            if timeline.enabled():
                with timeline.span(what, "comm"):
                    value = fn()
            else:  # a small collective's whole budget is a few microseconds: no null span
                value = fn()
        except BaseException:
            if release is not None:
                release()
            raise
        finally:
            self.unclaim(outer)
        return value if finish is None else finish(value)

    def claim(self, what, seq):
        """Claim the engine to run collective ``seq`` in this thread now (the direct path of ``run``, for
        callers that run their job inline): what ``unclaim`` takes once it is done, or ``_BUSY``
        where work is queued or running, or this thread runs one of this engine's jobs."""
        outer = getattr(_local, "engine", None)
        if outer is self:
            return _BUSY
        outer = _enter(self, seq, outer)  # SIGINT is held from here on: a job claimed below always runs and ends
        with self._lock:
            if self._busy or self._queue:
                direct = False
            else:
                direct = self._busy = True
        if not direct:
            _leave(outer)
            return _BUSY
        p = self.progress  # (Progress.begin_wait, inline: this path's budget is a few microseconds)
        p.wait_seq, p.wait_start, p.waiting = seq, time.monotonic(), what
        return outer

    def unclaim(self, outer):
        """End what ``claim`` began."""
        self.progress.waiting = None
        with self._lock:
            self._busy = False
            self._notify()
        _leave(outer)

    def help_until(self, handle):
        """Run queued collectives in this thread, in queue order, until ``handle`` is done;
        then claim its finish: True when this thread is to finish it, False when another
        waiter did.

        While the engine thread finishes the collective it is running this waits; then
        the engine thread stands aside and the rest runs here, so a caller that waits
        pays no thread hand-off per collective.
        """
        nested = getattr(_local, "engine", None) is self  # waiting inside one of our own jobs
        while True:
            with self._lock:
                self._helpers += 1
                try:
                    while handle._state == _PENDING and (not self._queue or (self._busy and not nested)):
                        self._cv.wait()
                except BaseException:  # interrupted while waiting: the engine thread takes over
                    self._helpers -= 1
                    self._cv.notify_all()
                    raise
                self._helpers -= 1
                if handle._state != _PENDING:
                    if not self._helpers and self._queue and not self._busy:
                        self._cv.notify_all()  # the engine thread stood aside for us: the rest is its own
                    self._finishers += 1
                    try:
                        while handle._state == _FINISHING:  # another waiter is finishing it
                            self._cv.wait()
                    finally:
                        self._finishers -= 1
                    if handle._state == _FINISHED:
                        return False
                    handle._state = _FINISHING
                    _hold_while_finishing(True)  # released by Handle._settle once finished
                    return True
                outer = _enter(self, self._queue[0][0].seq)  # SIGINT held before the job is claimed
                job, fn = self._queue.popleft()
                if not nested:
                    self._busy = True
            self._execute(job, fn, nested, outer)

    def _notify(self):
        """Wake the threads waiting on this engine, where one can go on (call with the lock held): a
        waiter in help_until, drain() or for a handle's finish, or the engine thread when work is
        queued or stop() waits for it to end (it may end once the job running elsewhere is done).
        The idle engine thread is not woken for nothing: on a busy core each needless wake-up
        took the GIL from the caller (0.4 ms per training step at one rank)."""
        if self._queue or self._helpers or self._drainers or self._finishers or self._stopping:
            self._cv.notify_all()

    def drain(self):
        """Wait until every queued collective has run."""
        with self._lock:
            self._drainers += 1
            try:
                while self._queue or self._busy:
                    self._cv.wait()
            finally:
                self._drainers -= 1

    def idle(self):
        """True when nothing is queued or running."""
        with self._lock:
            return not self._queue and not self._busy

    def stop(self):
        """Run what is queued, then end the engine thread (a later submit starts a new one)."""
        with self._lock:
            thread, self._stopping = self._thread, True
            self._cv.notify_all()
        if thread is not None and thread is not threading.current_thread():
            thread.join()

    def _execute(self, handle, fn, nested=False, outer=None):
        """Run a claimed job (``outer``: what ``_enter`` returned, where the caller entered already)."""
        if outer is None:
            outer = _enter(self, handle.seq)
        if not nested:
            self.progress.begin_wait(handle.what, handle.seq)
        try:
            if timeline.enabled():
                with timeline.span(handle.what, "comm"):
                    handle._complete(fn)
            else:  # (a small collective's whole budget is a few microseconds: no null span)
                handle._complete(fn)
        finally:
            if not nested:
                self.progress.end_wait()
            with self._lock:
                if not nested:
                    self._busy = False
                self._notify()
            _leave(outer)

    def _loop(self):
        numpy.seterr(all="ignore")  # this thread's own error state; reductions never raise in it
        while True:
            with self._lock:
                while not self._queue or self._busy or self._helpers:
                    if self._stopping and not self._queue and not self._busy:
                        self._thread = None
                        return
                    self._cv.wait()
                handle, fn = self._queue.popleft()
                self._busy = True
            if test_delay_s:
                _jitter()
            self._execute(handle, fn)


# --- a KeyboardInterrupt never lands inside a job ------------------------------------------------
# Python runs signal handlers in the main thread between bytecodes: a Ctrl-C arriving while the
# main thread runs a queued job (helping while it waits for another handle) would stop that job
# half-way, on this rank only, and hand the KeyboardInterrupt to the wrong handle. While the main
# thread executes a job, SIGINT is held and delivered as soon as the job is complete.

_held = []  # the (signum, frame) held while a job ran
_wrapped = None  # the handler ours wraps


def _hold_sigint(signum, frame):
    if getattr(_local, "engine", None) is not None or getattr(_local, "finishing", 0):
        _held.append((signum, frame))
    else:
        _wrapped(signum, frame)


def _enter(engine, seq, outer=False):
    """Mark this thread as running job ``seq`` of ``engine`` (``outer``: the engine whose job it runs,
    or None, where the caller read it already); returns what ``_leave`` restores."""
    if outer is False:
        outer = getattr(_local, "engine", None)
    if outer is None:
        if threading.get_ident() == _MAIN:
            _guard_sigint()
        outer = _OUTSIDE
    else:
        outer = outer, _local.seq
    _local.engine, _local.seq = engine, seq
    return outer


def _leave(outer):
    _local.engine, _local.seq = outer
    if _held:
        _deliver_held()


def _hold_while_finishing(on):
    """A waiter that claimed a handle's finish holds SIGINT until the finish is done (a Ctrl-C in
    between would leave the handle FINISHING for every other waiter)."""
    if on and threading.get_ident() == _MAIN:
        _guard_sigint()
    _local.finishing = getattr(_local, "finishing", 0) + (1 if on else -1)  # a finish may wait on another
    if not on:
        _deliver_held()


def _deliver_held():
    if (_held and getattr(_local, "engine", None) is None and not getattr(_local, "finishing", 0)
            and threading.get_ident() == _MAIN):
        signum, frame = _held.pop()
        _held.clear()
        _wrapped(signum, frame)


def _guard_sigint():
    global _wrapped
    handler = _getsignal(signal.SIGINT)
    if handler is _hold_sigint or not callable(handler):
        return
    _wrapped = handler
    try:
        signal.signal(signal.SIGINT, _hold_sigint)
    except ValueError:  # not the main interpreter
        pass


# --- one engine per communicator -----------------------------------------------------------------

_main = Engine(stall.main)
engine = _main
"""The engine of mpidp's main communicator (``engine.run(fn, what, seq)`` runs ``fn`` in order)."""
_by_comm = {}  # id(comm) -> Engine
_lock = threading.Lock()


def engine_for(comm):
    """The engine that orders every MPI call on ``comm`` (one of mpidp's communicators)."""
    eng = _by_comm.get(id(comm))
    if eng is not None and eng.comm is comm:
        return eng
    return _bind(comm)


def _bind(comm):
    from . import check, runtime
    with _lock:
        eng = _by_comm.get(id(comm))
        if eng is not None and eng.comm is comm:
            return eng
        members = tuple(int(r) for r in check._world_ranks(comm))
        if comm is runtime.get_comm():
            eng, eng.comm = _main, comm
            eng.plans.clear()
            eng.meeting = None
            for stale in [k for k, e in _by_comm.items() if e is _main]:
                del _by_comm[stale]
            eng.progress.bind(members)
        else:
            from . import process_set  # its creation index tells two sets of the same ranks apart
            index = next((i for i, ps in enumerate(process_set._created) if ps.comm is comm), -1)
            eng = Engine(stall.Progress(), comm, f"mpidp-engine{list(members)}")
            eng.progress.bind(members, index)
            stall.track(eng.progress)
        _by_comm[id(comm)] = eng
        return eng


def engines():
    """Every engine bound to a communicator (the main one first)."""
    with _lock:
        return sorted(set(_by_comm.values()), key=lambda e: e is not _main)


def release(comm):
    """Run what is queued on ``comm`` and end its engine (before the communicator is freed)."""
    with _lock:
        eng = _by_comm.pop(id(comm), None)
    if eng is not None and eng is not _main:
        eng.stop()
        stall.untrack(eng.progress)


def stop_all():
    """Run what is queued on every communicator and end the engine threads (before freeing them)."""
    for eng in engines():
        eng.stop()
    with _lock:
        for eng in _by_comm.values():
            if eng is not _main:
                stall.untrack(eng.progress)
        _by_comm.clear()
        _main.comm = None
