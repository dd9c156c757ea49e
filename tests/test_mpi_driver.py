"""Runs every tests/mpi file under real mpiexec at 2, 3 and 4 ranks (1 rank runs in-process),
and every tests/gpu file at 2 ranks sharing the machine's GPU(s) where there is one."""
from pathlib import Path

import pytest

from _mpirun import python, run

HERE = Path(__file__).parent
FILES = sorted(p.name for p in (HERE / "mpi").glob("test_*.py"))
GPU_FILES = sorted(p.name for p in (HERE / "gpu").glob("test_*.py"))
HEAVY_YIELD = {"MPIR_CVAR_ENABLE_HEAVY_YIELD": "1"}  # oversubscribed: waiting ranks give up the CPU


def run_file(path, np):
    # only the two plugins the suite needs: autoloading every installed one costs ~1 s per rank
    rc, out, seconds = run(python("-m", "pytest", "-q", "-x", "-rs", "-p", "pytest_timeout", "-p", "mpidp.testing",
                                  "--mpidp", "--mpidp-timeout", "120", "-o", "timeout=150",
                                  "-p", "no:cacheprovider", path),
                           np=np, timeout=300, env={"PYTEST_DISABLE_PLUGIN_AUTOLOAD": "1",
                                                    **(HEAVY_YIELD if np > 2 else {})})
    tail = out[-6000:]
    assert rc is not None, f"{path} at np={np} hung: killed after {seconds:.0f} s\n{tail}"
    if rc == 5 and " skipped" in tail and " passed" not in tail:  # a module-level skip: nothing to run
        reasons = [line for line in tail.splitlines() if line.startswith("SKIPPED")]
        pytest.skip(f"{path} at np={np}: " + (reasons[0] if reasons else "every test skipped"))
    assert rc == 0, f"{path} at np={np} failed (exit {rc}, {seconds:.1f} s)\n{tail}"


@pytest.mark.spawns
@pytest.mark.parametrize("np", [2, 3, 4])
@pytest.mark.parametrize("name", FILES)
def test_under_mpiexec(name, np):
    run_file(f"tests/mpi/{name}", np)


@pytest.mark.gpu
@pytest.mark.spawns
@pytest.mark.parametrize("name", GPU_FILES)
def test_gpu_file_at_two_ranks(name):
    """Staging, stream order and device binding with two ranks on one GPU (skipped without a GPU)."""
    run_file(f"tests/gpu/{name}", 2)
