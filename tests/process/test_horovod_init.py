"""Horovod's order: ProcessSets built before init(), created by init(process_sets=[...])."""
import re

import pytest

from _mpirun import python, run

SCRIPT = """
import numpy, mpidp
evens, odds = mpidp.ProcessSet([0, 2]), mpidp.ProcessSet([1])
mpidp.init(process_sets=[evens, odds])
r = mpidp.rank()
mine = evens if r % 2 == 0 else odds
got = mpidp.allreduce(numpy.array([float(r)]), op=mpidp.Sum, process_set=mine)
assert got[0] == (2.0 if mine is evens else 1.0), got
assert (evens.process_set_id, odds.process_set_id) == (1, 2)
assert evens.included() == (r % 2 == 0) and odds.size() == 1
print(f"rank {r} ok", flush=True)
mpidp.shutdown()
"""


@pytest.mark.spawns
def test_process_sets_built_before_init(tmp_path):
    rc, out, _ = run(python("-c", SCRIPT), np=3, timeout=120)
    assert rc == 0, out[-3000:]
    assert sorted(re.findall(r"rank (\d) ok", out)) == ["0", "1", "2"], out[-3000:]  # hydra may splice lines
