"""What init() decides: ProcessSets built before it (Horovod's order), and is_homogeneous() over
simulated nodes."""
import re
import subprocess

import pytest

from _mpirun import mpiexec, python, run

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


FAKE_SSH = """#!/bin/sh
# hydra's ssh launcher calls this with ssh's options and a host: run the command here instead
while [ $# -gt 0 ]; do case "$1" in -*) shift;; *) shift; break;; esac; done
exec sh -c "$*"
"""


@pytest.mark.spawns
@pytest.mark.parametrize("hosts, want", [
    ("127.0.0.2:2,127.0.0.3:2", "True"),
    # 3+2+1 ranks: the middle node's first rank sees local_size 2 x cross_size 3 == 6 ranks, so
    # only an exchange, not a local formula, finds the job inhomogeneous on every rank
    ("127.0.0.2:3,127.0.0.3:2,127.0.0.4:1", "False"),
])
def test_is_homogeneous_over_simulated_nodes(tmp_path, hosts, want):
    version = subprocess.run([mpiexec(), "--version"], capture_output=True, text=True).stdout
    if "HYDRA" not in version:
        pytest.skip("simulated nodes need MPICH's hydra launcher (-launcher-exec)")
    ssh = tmp_path / "fakessh"
    ssh.write_text(FAKE_SSH)
    ssh.chmod(0o755)
    n = sum(int(h.split(":")[1]) for h in hosts.split(","))
    # every rank's answer, printed by rank 0 alone: hydra may splice lines that ranks print at once
    script = ("import mpidp; mpidp.init(); seen = mpidp.allgather_object(mpidp.is_homogeneous())\n"
              "if mpidp.rank() == 0: print(' '.join(f'homogeneous {v}' for v in seen), flush=True)\n"
              "mpidp.shutdown()")
    rc, out, _ = run([mpiexec(), "-launcher", "ssh", "-launcher-exec", ssh, "-hosts", hosts, "-n", n,
                      *python("-c", script)], timeout=120, env={"MPIR_CVAR_ENABLE_HEAVY_YIELD": "1"})
    assert rc == 0, out[-3000:]
    assert re.findall(r"homogeneous (\w+)", out) == [want] * n, out[-3000:]
