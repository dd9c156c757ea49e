"""Short soak (issue 8): mixed collectives against NumPy, then training with check_replicas, at np 2 and 3.

The long run is documented in docs/reliability.md; this one takes ~12 s per rank count.
"""
import importlib.util
import json
import os

import numpy
import pytest

from _mpirun import ROOT, python, run

SOAK = ROOT / "scripts" / "soak.py"


def _load_soak():
    """scripts/soak.py as a module (it starts no MPI on import); leaves os.environ as it was."""
    saved = dict(os.environ)
    try:
        spec = importlib.util.spec_from_file_location("soak", SOAK)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        os.environ.clear()
        os.environ.update(saved)
    return module


@pytest.mark.spawns
@pytest.mark.parametrize("np_", [2, 3])
def test_short_soak_is_clean(np_, tmp_path):
    report = tmp_path / "soak.json"
    rc, out, seconds = run(python(SOAK, "--seconds", 12, "--seed", np_, "--json", report), np=np_, timeout=120)
    assert rc == 0, out[-4000:]
    assert "result: PASS" in out, out[-4000:]
    r = json.loads(report.read_text())
    assert r["problems"] == [] and r["ranks"] == np_
    assert r["totals"]["collectives"]["mismatches"] == 0 and r["totals"]["training"]["mismatches"] == 0
    assert r["totals"]["collectives"]["ops"] > 300, r["totals"]  # thousands on an idle machine
    assert r["training"]["steps"] >= 10 and r["training"]["check_replicas"] >= 2, r["training"]
    for rank in r["per_rank"]:
        for phase in ("collectives", "training"):
            assert rank[phase]["rss_growth_kib"] <= r["rss_bound_kib"], rank


def test_references_are_exact_and_catch_a_wrong_result():
    soak = _load_soak()
    for dtype in soak.DTYPES:
        ops = [o for o in soak.OP_NAMES if o != "Average" or dtype in soak.FLOATS]
        for op_name in ops:
            rng = numpy.random.default_rng(0)
            inputs = [soak.values(rng, (257,), dtype, op_name) for _ in range(4)]
            want = soak.reference(inputs, op_name, dtype)
            assert want.dtype == dtype
            assert soak.same(want.copy(), want, op_name)
            wrong = want.copy()
            wrong[100] = (wrong[100].astype(numpy.float32) + 1).astype(dtype)
            assert not soak.same(wrong, want, op_name), (dtype, op_name)
            if op_name == "Sum":  # small integers: the reduction is exact in every dtype
                exact = numpy.sum([a.astype(numpy.float64) for a in inputs], axis=0)
                assert numpy.array_equal(want.astype(numpy.float64), exact)


def test_schedule_is_the_same_on_every_rank():
    soak = _load_soak()
    for i in range(200):
        a, b = soak.Op(7, i, 3, []), soak.Op(7, i, 3, [])
        assert (a.kind, a.op_name, a.dtype, a.elements, a.cols, a.asynchronous, a.root) == \
               (b.kind, b.op_name, b.dtype, b.elements, b.cols, b.asynchronous, b.root)
        assert [list(s) for s in a.splits] == [list(s) for s in b.splits]
        assert all(int(s.sum()) == int(r) for s, r in zip(a.splits, a.rows))
        if a.op_name == "Average":
            assert a.dtype in soak.FLOATS
