"""Fault injection (issue 8): each case of fault_cases.CASES is a real mpiexec job with a timeout.

For every case: the job ends (no hang) with the expected exit code, within the case's bound
after the fault; the user sees the expected message from the expected ranks (every rank for
errors decided collectively); and the last good checkpoint still loads, with no newer
half-written one in its place. scripts/gen_fault_table.py runs the same cases into
docs/fault-injection.md.
"""
import re
import sys
from pathlib import Path

import pytest

from _mpirun import run

sys.path.insert(0, str(Path(__file__).resolve().parent))
import fault_cases as fc  # noqa: E402  (beside this file; also the jobs' driver script)

pytestmark = pytest.mark.spawns

_results = {}


@pytest.fixture(scope="module")
def seed_dir(tmp_path_factory):
    return fc.seed_checkpoints(tmp_path_factory.mktemp("seed"), run)


@pytest.fixture(scope="module")
def outcome(tmp_path_factory, seed_dir):
    """Run a case once per module (two tests may look at the same job)."""
    def get(case):
        if case.name not in _results:
            _results[case.name] = fc.run_case(case, tmp_path_factory.mktemp(case.name), seed_dir, run)
        return _results[case.name]
    return get


def _param(case):
    marks = [pytest.mark.xfail(strict=True, reason=case.xfail)] if case.xfail else []
    if case.needs_netns and not fc.netns_available()[0]:
        marks.append(pytest.mark.skip(reason=f"needs the simulated cluster's own network namespace: "
                                             f"{fc.netns_available()[1]}"))
    return pytest.param(case, id=case.name, marks=marks)


@pytest.mark.parametrize("case", [_param(c) for c in fc.CASES])
def test_fault(case, outcome):
    r = outcome(case)
    wrong = fc.problems(case, r)
    assert not wrong, (f"{case.name}: " + "; ".join(wrong) +
                       f"\n(rc={r.rc}, {r.seconds:.1f} s, {r.after_fault} s after the fault, message "
                       f"ranks {r.ranks}, checkpoints {r.checkpoints})\n--- output (tail) ---\n{r.output[-4000:]}")


def test_stall_report_names_only_the_missing_rank(outcome):
    case = fc.by_name("skipped_collective_stall")  # rank 1 skipped the collective; 0 and 2 wait in it
    r = outcome(case)
    reports = [ln.split("ranks not in it:", 1)[1] for ln in r.output.splitlines() if "ranks not in it:" in ln]
    assert reports, r.output[-3000:]
    for text in reports:
        assert re.findall(r"(\d+) \(", text) == [str(case.rank)], f"wrong ranks named: {text}"
