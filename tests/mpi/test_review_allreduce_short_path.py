"""Review of the allreduce short path (8f2f1e0): a cached plan's typed views of the check's buffers
(check.Carrier) must view the buffers the check then uses, however the threads interleave."""
import threading
import time

import numpy

import mpidp
from mpidp.comm import check, engine as engine_mod, runtime


def test_a_plan_made_while_the_engine_thread_makes_the_checks_buffers_views_the_buffers_used(rank, size,
                                                                                               monkeypatch):
    """The first small allreduce's plan makes the check's buffers in the caller's thread (Carrier) while
    the engine thread may be making them for a queued collective: two sets of buffers, the plan's views
    on the one the check no longer uses, and every later call through the plan silently got zeros."""
    eng = engine_mod.engine_for(runtime.get_comm())
    eng.drain()
    monkeypatch.setattr(eng, "meeting", None)  # as after init(): the buffers are made on first use
    monkeypatch.setattr(eng, "plans", {})
    made = threading.Event()

    class Slow(check._Meeting):
        def __init__(self, comm):
            if threading.current_thread().name == eng.name:  # the engine thread is descheduled while it makes them
                made.set()
                time.sleep(0.3)
            super().__init__(comm)

    monkeypatch.setattr(check, "_Meeting", Slow)
    h = mpidp.allgather_async(numpy.array([rank]), name="first")  # the engine thread runs its check
    assert made.wait(30)
    total = size * (size + 1) / 2
    for k in (1, 2, 3):  # the first call makes the plan, the others take it
        got = mpidp.allreduce(numpy.full(3, k * (rank + 1.0)), op=mpidp.Sum, name="after")
        assert got.tolist() == [k * total] * 3, f"call {k}"
    assert mpidp.synchronize(h).tolist() == list(range(size))
    eng.drain()
