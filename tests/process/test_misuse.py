"""Misuses of issue 17 (misuse_cases.CASES): each a real mpiexec job that ends as the table says.

scripts/gen_misuse_table.py runs the same cases into docs/reliability.md.
"""
import sys
from pathlib import Path

import pytest

from _mpirun import run

sys.path.insert(0, str(Path(__file__).resolve().parent))
import misuse_cases as mc  # noqa: E402

pytestmark = pytest.mark.spawns


def _param(case):
    marks = [pytest.mark.xfail(strict=False, reason=case.xfail)] if case.xfail else []
    return pytest.param(case, id=case.name, marks=marks)


@pytest.mark.parametrize("case", [_param(c) for c in mc.CASES])
def test_misuse(case, tmp_path):
    res = mc.run_case(case, tmp_path, run)
    wrong = mc.problems(case, res)
    assert not wrong, (f"{case.name}: " + "; ".join(wrong) + f"\n(rc={res.rc}, {res.seconds:.1f} s, "
                       f"lines {res.lines})\n--- output (tail) ---\n{res.output[-3000:]}")
