"""examples/torch_mlp.py: a PyTorch model's gradients averaged with mpidp, checked against one process."""
import pytest

from _mpirun import ROOT, python, run

pytest.importorskip("torch", reason="PyTorch is not installed (pip install 'mpidp[torch]')")


@pytest.mark.spawns
@pytest.mark.slow
def test_torch_example_matches_one_process_at_np2():
    rc, out, _ = run(python(ROOT / "examples" / "torch_mlp.py", "--steps", "20", "--check"), np=2, timeout=300)
    assert rc == 0, out[-3000:]
    assert "2 ranks, 20 steps" in out and "replicas identical" in out, out[-3000:]
    assert "largest difference from one process on the global batch" in out, out[-3000:]
