"""Timeline: one valid Chrome-trace JSON with events from every rank and thread; a shared no-op when off."""
import json
import os
import shutil
import tempfile
import threading
import time

import pytest

import mpidp
from mpidp import timeline


@pytest.fixture
def trace_path(rank):
    directory = mpidp.broadcast_object(tempfile.mkdtemp(prefix="mpidp-tl-") if rank == 0 else None)
    yield os.path.join(directory, "sub", "trace.json")
    timeline.stop()
    mpidp.barrier()
    if rank == 0:
        shutil.rmtree(directory, ignore_errors=True)


def test_off_is_a_shared_no_op(monkeypatch):
    timeline.stop()
    monkeypatch.delenv("MPIDP_TIMELINE", raising=False)
    assert timeline.start() is False and not timeline.enabled()
    assert timeline.span("forward", "compute") is timeline.span("x", "comm", bytes=3)
    with timeline.span("forward", "compute") as s:
        s.set(bytes=1)
    assert timeline.begin("allreduce", "comm") is None
    timeline.end(None, bytes=5)
    timeline.instant("x")
    timeline.counter("c", v=1)
    assert timeline.save() is None  # nothing recorded: no collective, no file


def test_every_rank_and_thread_lands_in_one_file(trace_path, rank, size):
    assert timeline.start(trace_path) and timeline.enabled()
    with timeline.span("forward", "compute", batch=8):
        time.sleep(0.002)
    tok = timeline.begin("allreduce.bucket0", "comm", bytes=4096)

    def engine():  # the comm engine thread finishes spans begun elsewhere and records its own
        with timeline.span("allreduce.bucket1", "comm", bytes=1024):
            pass
        timeline.end(tok, waited=True)

    t = threading.Thread(target=engine, name="mpidp-engine")
    t.start()
    t.join()
    with timeline.span("step", "optim") as s:
        s.set(lr=0.1)
    timeline.instant("checkpoint", step=1)
    timeline.counter("loss_scale", scale=1024.0)
    assert timeline.save() == trace_path
    if rank == 0:
        with open(trace_path) as f:
            doc = json.load(f)
        assert doc["displayTimeUnit"] == "ms"
        events = doc["traceEvents"]
        names = {(e["pid"], e["args"]["name"]) for e in events if e["name"] == "process_name"}
        assert names == {(r, f"rank {r}") for r in range(size)}
        for r in range(size):
            mine = [e for e in events if e["pid"] == r]
            threads = {e["args"]["name"]: e["tid"] for e in mine if e["name"] == "thread_name"}
            assert set(threads) == {"MainThread", "mpidp-engine"}
            spans = {e["name"]: e for e in mine if e["ph"] == "X"}
            assert set(spans) == {"forward", "allreduce.bucket0", "allreduce.bucket1", "step"}
            assert spans["forward"]["dur"] >= 2000 and spans["forward"]["args"] == {"batch": 8}
            assert spans["forward"]["cat"] == "compute" and spans["step"]["args"] == {"lr": 0.1}
            # begun on the main thread, ended on the engine thread: drawn on the main thread's row
            assert spans["allreduce.bucket0"]["tid"] == threads["MainThread"]
            assert spans["allreduce.bucket0"]["args"] == {"bytes": 4096, "waited": True}
            assert spans["allreduce.bucket1"]["tid"] == threads["mpidp-engine"]
            assert all(e["ts"] >= 0 for e in mine if "ts" in e)
            assert spans["forward"]["ts"] + spans["forward"]["dur"] <= spans["step"]["ts"]
            assert [e["ph"] for e in mine if e["name"] == "checkpoint"] == ["i"]
            assert [e["args"] for e in mine if e["ph"] == "C"] == [{"scale": 1024.0}]
    assert not [n for n in os.listdir(os.path.dirname(trace_path)) if ".tmp" in n]


def test_stop_ends_recording_and_drops_the_events(trace_path, rank, size):
    timeline.start(trace_path)
    with timeline.span("before", "io"):
        pass
    timeline.save()
    timeline.stop()
    assert not timeline.enabled()
    with timeline.span("after", "io"):
        pass
    assert timeline.save() is None
    if rank == 0:
        with open(trace_path) as f:
            spans = [e["name"] for e in json.load(f)["traceEvents"] if e["ph"] == "X"]
        assert spans == ["before"] * size


def test_path_from_the_environment(trace_path, monkeypatch):
    monkeypatch.setenv("MPIDP_TIMELINE", trace_path)
    assert timeline.start()
    assert timeline.save() == trace_path
    assert os.path.exists(trace_path) or mpidp.rank() != 0


def test_unknown_category_is_refused_while_recording(trace_path):
    timeline.start(trace_path)
    with pytest.raises(ValueError, match="'gpu' is not one of compute, comm, copy, wait, optim, io"):
        timeline.span("x", "gpu")


def test_merge_aligns_ranks_by_wall_clock():
    a = {"rank": 1, "wall0_ns": 2_000_000, "perf0_ns": 500, "threads": {0: "MainThread"},
         "events": [("X", "f", "compute", 1500, 3000, 0, {})]}
    b = {"rank": 0, "wall0_ns": 1_000_000, "perf0_ns": 10_000, "threads": {0: "MainThread"},
         "events": [("X", "f", "compute", 10_000, 1000, 0, {"k": 1})]}
    doc = timeline.merge([a, None, b])
    spans = sorted((e["pid"], e["ts"], e["dur"]) for e in doc["traceEvents"] if e["ph"] == "X")
    # rank 0 started 1 ms before rank 1: rank 0's event at its start is t=0, rank 1's 1 us after its start is 1001 us
    assert spans == [(0, 0.0, 1.0), (1, 1001.0, 3.0)]
    assert doc["otherData"]["ranks"] == 2
