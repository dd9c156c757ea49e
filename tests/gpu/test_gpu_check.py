"""The GPU skip rule, checked without a GPU (it runs everywhere)."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.spawns


def test_only_gpu_marked_tests_skip_for_want_of_a_gpu(tmp_path):
    """A rootdir or folder called 'gpu' must not turn every test into a GPU test (node names are keywords)."""
    root = tmp_path / "gpu"
    (root / "tests").mkdir(parents=True)
    shutil.copy(ROOT / "tests" / "conftest.py", root / "tests" / "conftest.py")
    (root / "pytest.ini").write_text("[pytest]\nmarkers =\n    gpu: needs a GPU\n    spawns: launches mpiexec\n")
    (root / "tests" / "test_x.py").write_text("import pytest\n\n\ndef test_plain():\n    pass\n\n\n"
                                              "@pytest.mark.gpu\ndef test_gpu():\n    pass\n")
    p = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", "tests"],
                       capture_output=True, text=True, cwd=root, timeout=120,
                       env={**os.environ, "PYTHONPATH": str(ROOT)})
    from mpidp.backend import gpu_available
    want = "2 passed" if gpu_available() else "1 passed, 1 skipped"
    assert want in p.stdout, p.stdout + p.stderr
