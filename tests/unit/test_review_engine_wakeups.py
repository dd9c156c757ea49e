"""Review of issue 21's Engine._notify: every thread waiting on an engine is woken when it can go on.

No MPI: an Engine without a communicator, with jobs that are plain Python functions, and events
that put the threads in the order under test (no sleeps, no luck).
"""
import signal
import threading

import pytest

from mpidp.comm import engine as engine_mod, stall
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


def _direct_job_in_a_thread(eng):
    """A user thread runs a blocking job directly (the engine busy) until the returned event is set."""
    running, go = threading.Event(), threading.Event()

    def job():
        running.set()
        go.wait(10)

    user = threading.Thread(target=lambda: eng.run(job, "direct", 1), daemon=True)
    user.start()
    assert running.wait(10) and eng._busy
    return user, go


def test_the_engine_thread_takes_work_queued_behind_a_direct_job():
    eng = Engine(stall.Progress(), name="review-engine")
    user, go = _direct_job_in_a_thread(eng)
    handle = eng.submit(lambda: 7, "queued", 2)  # the engine thread starts, sees the engine busy, sleeps
    go.set()
    user.join(10)
    assert _wait_for(handle.done), "the queued job never ran: the engine thread was not woken"
    assert handle.wait() == 7
    eng.stop()


def test_drain_returns_when_a_direct_job_in_another_thread_ends():
    eng = Engine(stall.Progress(), name="review-engine")
    user, go = _direct_job_in_a_thread(eng)
    drainer = threading.Thread(target=eng.drain, daemon=True)
    drainer.start()
    assert _wait_for(lambda: eng._drainers == 1)
    go.set()
    user.join(10)
    drainer.join(10)
    assert not drainer.is_alive(), "drain() never returned"


def test_a_second_waiter_gets_the_result_another_thread_finished():
    eng = Engine(stall.Progress(), name="review-engine")
    finishing, go, results = threading.Event(), threading.Event(), []

    def finish(value):
        finishing.set()
        go.wait(10)
        return value + 1

    handle = eng.submit(lambda: 41, "shared", 1, finish, wake=False)
    first = threading.Thread(target=lambda: results.append(handle.wait()), daemon=True)
    first.start()
    assert finishing.wait(10)
    second = threading.Thread(target=lambda: results.append(handle.wait()), daemon=True)
    second.start()
    assert _wait_for(lambda: eng._finishers == 1)
    go.set()
    first.join(10)
    second.join(10)
    assert not second.is_alive(), "the second waiter was not woken when the first finished the handle"
    assert results == [42, 42]
    eng.stop()


@pytest.mark.parametrize("how", ["waiter runs a queued job", "direct run"])
def test_ctrl_c_as_a_thread_claims_a_job_leaves_the_engine_usable(how, monkeypatch, sigint_raises):
    """SIGINT held while a job runs (engine._hold_sigint) must cover the moment the thread claims the
    job too: a KeyboardInterrupt there left the engine busy for ever and the claimed job never run,
    so every later collective on the communicator (and shutdown) waited for ever."""
    if threading.current_thread() is not threading.main_thread():
        pytest.skip("signals reach the main thread only")
    eng = Engine(stall.Progress(), name="review-engine")
    eng.submit(lambda: None, "start the engine thread", 0).wait()
    assert _wait_for(lambda: len(eng._cv._waiters) == 1)  # the engine thread asleep: wake=False work is ours
    real, fired = engine_mod._enter, []

    def enter(engine, seq, *outer):  # the signal lands in the last bytecodes before the thread's engine is set
        if engine is eng and seq == 1 and not fired:
            fired.append(seq)
            signal.raise_signal(signal.SIGINT)
        return real(engine, seq, *outer)

    monkeypatch.setattr(engine_mod, "_enter", enter)
    ran = []
    if how == "direct run":
        with pytest.raises(KeyboardInterrupt):
            eng.run(lambda: ran.append(1), "interrupted", 1)
        handle = None
    else:
        handle = eng.submit(lambda: ran.append(1) or "first", "interrupted", 1, wake=False)
        with pytest.raises(KeyboardInterrupt):
            handle.wait()
    later = []
    waiter = threading.Thread(target=lambda: later.append((handle.wait() if handle else None,
                                                           eng.run(lambda: "next", "next", 2))), daemon=True)
    waiter.start()
    waiter.join(5)
    assert not waiter.is_alive(), "the engine stayed busy after the Ctrl-C: the next collective waits for ever"
    assert later == [("first" if handle else None, "next")]


def test_ctrl_c_as_a_waiter_claims_the_finish_leaves_the_handle_finished(monkeypatch, sigint_raises):
    """A Ctrl-C between a waiter claiming a handle's finish (FINISHING) and running it left the
    handle FINISHING for ever: every later wait() on it hung. It is held until the finish is done,
    then raised in the waiter."""
    if threading.current_thread() is not threading.main_thread():
        pytest.skip("signals reach the main thread only")
    eng = Engine(stall.Progress(), name="review-engine")
    handle = eng.submit(lambda: 41, "job", 1, finish=lambda v: v + 1, wake=False)
    real = eng.help_until

    def help_until(h):  # the signal lands right after the claim, before the finish runs
        claimed = real(h)
        if claimed:
            signal.raise_signal(signal.SIGINT)
        return claimed

    monkeypatch.setattr(eng, "help_until", help_until)
    with pytest.raises(KeyboardInterrupt):
        handle.wait()
    monkeypatch.setattr(eng, "help_until", real)
    results = []
    other = threading.Thread(target=lambda: results.append(handle.wait()), daemon=True)
    other.start()
    other.join(5)
    assert not other.is_alive(), "the handle stayed FINISHING: a later wait() hangs"
    assert results == [42]
    eng.stop()
