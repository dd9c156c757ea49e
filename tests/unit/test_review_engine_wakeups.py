"""Review of issue 21's Engine._notify: every thread waiting on an engine is woken when it can go on.

No MPI: an Engine without a communicator, with jobs that are plain Python functions, and events
that put the threads in the order under test (no sleeps, no luck).
"""
import threading

from mpidp.comm import stall
from mpidp.comm.engine import Engine


def _wait_for(predicate, timeout=10.0):
    done = threading.Event()
    for _ in range(int(timeout / 0.01)):
        if predicate():
            return True
        done.wait(0.01)
    return predicate()


def test_stop_returns_when_another_thread_ends_its_direct_job():
    """stop() while a user thread runs a blocking collective directly (the engine thread idle, the
    queue empty): when that job ends the engine thread must be woken to see it may exit, or stop()
    waits for ever (a lost wake-up: the job's end notified only waiters with something to do)."""
    eng = Engine(stall.Progress(), name="review-engine")
    eng.submit(lambda: None, "start the engine thread", 1).wait()
    assert eng._thread is not None
    running, go = threading.Event(), threading.Event()

    def job():
        running.set()
        go.wait(10)

    user = threading.Thread(target=lambda: eng.run(job, "direct", 2), daemon=True)
    user.start()
    assert running.wait(10) and eng._busy
    stopper = threading.Thread(target=eng.stop, daemon=True)
    stopper.start()
    assert _wait_for(lambda: eng._stopping)
    go.set()
    user.join(10)
    stopper.join(10)
    assert not stopper.is_alive(), "stop() never returned: the engine thread was not woken when the job ended"
    assert eng._thread is None
