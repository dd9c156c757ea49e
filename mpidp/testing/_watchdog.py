"""A daemon thread that acts when the main thread overstays a deadline.

A thread, not a signal: a Python signal handler never runs while the main thread waits
inside a C MPI call (mpi-cuda-facts 4.3), but mpi4py releases the GIL there, so a thread
can still print and call ``MPI_Abort``. The thread wakes a few times a second and reads
the deadline; arming is one attribute store, so the per-phase cost is nothing (waking the
thread on every arm cost about 0.5 ms of GIL hand-over per phase).
"""
import threading
import time

TICK_S = 0.1  # how late the watchdog may act


class Watchdog:
    """``arm(deadline, what)`` before a phase, ``disarm()`` after; ``on_expire(what)`` runs in the thread.

    ``deadline`` is a ``time.monotonic()`` value (``inf`` for none); ``what`` says what overstayed it.
    """

    def __init__(self, on_expire):
        self._on_expire = on_expire
        self._armed = None  # (deadline, what): replaced whole, so the thread never sees half of it
        self.fired = None   # the ``what`` of the deadline that expired, once one has
        threading.Thread(target=self._run, name="mpidp-watchdog", daemon=True).start()

    def arm(self, deadline, what):
        self._armed = (deadline, what)

    def disarm(self):
        self._armed = None

    def _run(self):
        while True:
            armed = self._armed
            now = time.monotonic()
            if armed is not None and now >= armed[0]:
                self.fired = armed[1]
                self._on_expire(armed[1])
                return
            time.sleep(TICK_S if armed is None else min(TICK_S, armed[0] - now))
