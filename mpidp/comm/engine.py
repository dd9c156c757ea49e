"""One ordered queue of collectives per process, run by a background thread.

Every rank submits collectives in program order and the engine runs them in
that order with blocking MPI calls, so nonblocking operations keep the same
order on every rank and overlap with the caller's compute (mpi4py releases
the GIL inside MPI). A blocking call made while the queue is empty runs
directly in the caller's thread, and a caller waiting for a handle runs the
queued work itself while the engine thread is idle: no thread hand-off on the
common paths (it cost 20-50 us per collective).
"""
import collections
import threading
import time

from .. import timeline
from . import stall


class Handle:
    """A collective in flight: ``wait()`` returns its result (or raises its error) once."""

    __slots__ = ("what", "seq", "_done", "_value", "_error", "_finish", "_finished", "_result",
                 "t_start", "t_end", "_engine")

    def __init__(self, what, seq, finish=None, engine=None):
        self.what, self.seq, self._engine = what, seq, engine
        self._done = threading.Event()
        self._value = self._error = self._result = None
        self._finish, self._finished = finish, False
        self.t_start = self.t_end = 0.0

    def done(self):
        """True when the communication has completed (wait() then returns at once)."""
        return self._done.is_set()

    def wait(self):
        """Block until complete; run the caller-side finish (copy back, scaling); return the result."""
        if not self._finished:
            if self._engine is not None and not self._done.is_set():
                self._engine.help_until(self)  # run queued work here rather than hand it off
            self._done.wait()
            self._finished = True
            if self._error is not None:
                raise self._error
            self._result = self._value if self._finish is None else self._finish(self._value)
            self._finish = self._value = None
        elif self._error is not None:
            raise self._error
        return self._result

    def seconds(self):
        """How long the engine spent running this collective."""
        return self.t_end - self.t_start

    def _complete(self, fn):
        self.t_start = time.perf_counter()
        try:
            self._value = fn()
        except BaseException as exc:  # delivered to the waiter, on every rank alike
            self._error = exc
        self.t_end = time.perf_counter()
        self._done.set()


class Engine:
    def __init__(self):
        self._queue = collections.deque()
        self._cv = threading.Condition()
        self._busy = False
        self._helpers = 0  # callers waiting in help_until: while any waits, it drives the queue
        self._thread = None

    def submit(self, fn, what, seq, finish=None, wake=True):
        """Queue ``fn`` (blocking MPI work) behind everything submitted before; return its Handle.

        ``wake=False`` leaves the engine thread asleep: for work the caller waits for at
        once, which then runs in the caller's thread (a wake-up costs 50-100 us when every
        core is busy).
        """
        handle = Handle(what, seq, finish, self)
        with self._cv:
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name="mpidp-engine", daemon=True)
                self._thread.start()
            self._queue.append((handle, fn))
            if wake:
                self._cv.notify()
        return handle

    def run(self, fn, what, seq, finish=None):
        """Run ``fn`` now in this thread if nothing is queued, else behind the queue; return the result."""
        with self._cv:
            direct = not self._busy and not self._queue
            if direct:
                self._busy = True
        if not direct:
            return self.submit(fn, what, seq, finish).wait()
        try:
            stall.begin_wait(what, seq)
            with timeline.span(what, "comm"):
                value = fn()
        finally:
            stall.end_wait()
            with self._cv:
                self._busy = False
                self._cv.notify_all()
        return value if finish is None else finish(value)

    def help_until(self, handle):
        """Run queued collectives in this thread, in queue order, until ``handle`` is done.

        While the engine thread finishes the collective it is running this waits; then
        the engine thread stands aside and the rest runs here, so a caller that waits
        pays no thread hand-off per collective.
        """
        while True:
            with self._cv:
                self._helpers += 1
                try:
                    while not handle.done() and (self._busy or not self._queue):
                        self._cv.wait()
                finally:
                    self._helpers -= 1
                if handle.done():
                    return
                job, fn = self._queue.popleft()
                self._busy = True
            self._execute(job, fn)

    def drain(self):
        """Wait until every queued collective has run."""
        with self._cv:
            while self._queue or self._busy:
                self._cv.wait()

    def _execute(self, handle, fn):
        stall.begin_wait(handle.what, handle.seq)
        with timeline.span(handle.what, "comm"):
            handle._complete(fn)
        stall.end_wait()
        with self._cv:
            self._busy = False
            self._cv.notify_all()

    def _loop(self):
        while True:
            with self._cv:
                while not self._queue or self._busy or self._helpers:
                    self._cv.wait()
                handle, fn = self._queue.popleft()
                self._busy = True
            self._execute(handle, fn)


engine = Engine()
