"""A daemon thread that acts when the main thread overstays a deadline.

A thread, not a signal: a Python signal handler never runs while the main thread waits
inside a C MPI call (mpi-cuda-facts 4.3), but mpi4py releases the GIL there, so a thread
can still print and call ``MPI_Abort``.
"""
import threading
import time


class Watchdog:
    """``arm(deadline, what)`` before a phase, ``disarm()`` after; ``on_expire(what)`` runs in the thread.

    ``deadline`` is a ``time.monotonic()`` value; ``what`` says what overstayed it.
    """

    def __init__(self, on_expire):
        self._on_expire = on_expire
        self._cond = threading.Condition()
        self._deadline = None
        self._what = None
        self.fired = None  # the ``what`` of the deadline that expired, once one has
        threading.Thread(target=self._run, name="mpidp-watchdog", daemon=True).start()

    def arm(self, deadline, what):
        with self._cond:
            self._deadline = deadline if deadline != float("inf") else None
            self._what = what
            self._cond.notify()

    def disarm(self):
        with self._cond:
            self._deadline = None
            self._cond.notify()

    def _run(self):
        with self._cond:
            while True:
                if self._deadline is None:
                    self._cond.wait()
                    continue
                left = self._deadline - time.monotonic()
                if left > 0:
                    self._cond.wait(left)
                    continue
                self.fired = self._what
                break
        self._on_expire(self.fired)
