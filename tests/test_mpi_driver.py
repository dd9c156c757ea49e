"""Runs every tests/mpi file under real mpiexec at 2, 3 and 4 ranks (1 rank runs in-process)."""
from pathlib import Path

import pytest

from _mpirun import python, run

HERE = Path(__file__).parent
FILES = sorted(p.name for p in (HERE / "mpi").glob("test_*.py"))
HEAVY_YIELD = {"MPIR_CVAR_ENABLE_HEAVY_YIELD": "1"}  # oversubscribed: waiting ranks give up the CPU


@pytest.mark.spawns
@pytest.mark.parametrize("np", [2, 3, 4])
@pytest.mark.parametrize("name", FILES)
def test_under_mpiexec(name, np):
    rc, out, seconds = run(python("-m", "pytest", "-q", "-x", "-p", "no:cacheprovider",
                                  "-o", "timeout=120", f"tests/mpi/{name}"),
                           np=np, timeout=300, env=HEAVY_YIELD if np > 2 else None)
    tail = out[-6000:]
    assert rc is not None, f"tests/mpi/{name} at np={np} hung: killed after {seconds:.0f} s\n{tail}"
    assert rc == 0, f"tests/mpi/{name} at np={np} failed (exit {rc}, {seconds:.1f} s)\n{tail}"
