"""The disk tier of OffloadManager: what it leaves on disk (no MPI: offload never imports it)."""
import os
import subprocess
import sys
import textwrap


def test_a_run_that_ends_normally_leaves_no_files(tmp_path):
    # the disk tier holds a copy of every offloaded parameter and its optimizer state: gigabytes
    # that stayed in disk_dir after every run unless the script called manager.disk.close()
    script = textwrap.dedent(f"""
        import numpy
        from mpidp import models, optim
        from mpidp.offload import OffloadManager
        model = models.mlp(in_features=64, hidden=(64,), seed=0)
        mgr = OffloadManager(model, device_budget_bytes=1 << 20, threshold_bytes=4096, disk_dir={str(tmp_path)!r})
        opt = mgr.wrap_optimizer(optim.Adam(model.parameters(), lr=0.1))
        model(numpy.ones((2, 64), dtype=numpy.float32))
        model.backward(numpy.ones((2, 10), dtype=numpy.float32))
        opt.step()
        assert len(os.listdir(mgr.disk.directory)) == 3, os.listdir(mgr.disk.directory)  # weight and 2 moments
    """)
    proc = subprocess.run([sys.executable, "-c", "import os\n" + script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert os.listdir(tmp_path) == []
