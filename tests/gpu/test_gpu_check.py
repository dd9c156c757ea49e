"""scripts/gpu_check.sh and the GPU skip rule, checked without a GPU (they run everywhere).

The GPU run itself cannot be checked here; what can is: usage errors, the fast
and clear refusal on a machine without CuPy or a CUDA device, the summary's
verdicts, and the whole plumbing in --cpu-dry-run (venv, phases, output layout,
bundle).
"""
import os
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "gpu_check.sh"
sys.path.insert(0, str(ROOT / "scripts"))
import gpu_summary  # noqa: E402

pytestmark = pytest.mark.spawns


def check(*args, env=None, timeout=120):
    """(rc, output, seconds) of scripts/gpu_check.sh ARGS with this interpreter."""
    full = {**os.environ, "PYTHON": sys.executable, **(env or {})}
    t0 = time.monotonic()
    p = subprocess.run(["bash", str(SCRIPT), *map(str, args)], capture_output=True, text=True, env=full,
                       cwd=ROOT, timeout=timeout)
    return p.returncode, p.stdout + p.stderr, time.monotonic() - t0


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


@pytest.mark.parametrize("args, message", [
    (["--bogus", "out"], "unknown option --bogus"),
    (["--only", "tests1,nope", "out"], "unknown phase 'nope'"),
    (["--deadline", "1.5", "out"], "--deadline must be whole seconds"),
    ([], "missing OUTDIR"),
    (["a", "b"], "one OUTDIR only"),
])
def test_usage_errors_exit_2_with_the_reason(tmp_path, args, message):
    rc, out, _ = check(*args)
    assert rc == 2 and message in out, out


@pytest.mark.parametrize("fake, message", [
    ("raise ImportError('no module named cupy (fake)')", "cupy is not importable"),
    ("__version__ = '0.fake'\ndef is_available():\n    return False\n", "imports but sees no CUDA device"),
])
def test_without_cupy_or_a_device_it_refuses_at_once(tmp_path, fake, message):
    (tmp_path / "cupy").mkdir()
    (tmp_path / "cupy" / "__init__.py").write_text(fake + "\n")
    out_dir = tmp_path / "out"
    rc, out, seconds = check(out_dir, env={"PYTHONPATH": str(tmp_path)})
    assert rc == 2, out
    assert message in out and "--cpu-dry-run" in out, out
    assert seconds < 20, f"took {seconds:.1f} s to refuse"
    assert not out_dir.exists(), "nothing is written before the machine is known to fit"


# -- the summary's verdicts -------------------------------------------------------------------------

JUNIT = """<?xml version="1.0" encoding="utf-8"?><testsuites><testsuite name="pytest" time="1.5">
<testcase classname="tests.mpi.test_collectives" name="test_a[cupy]" time="0.1"/>
<testcase classname="tests.mpi.test_collectives" name="test_b" time="0.1">{extra}</testcase>
</testsuite></testsuites>"""


def outdir(tmp_path, status="ok", extra=""):
    (tmp_path / "tests").mkdir()
    (tmp_path / "bench").mkdir()
    (tmp_path / "phases.tsv").write_text(f"setup\tok\t3\t-\tlogs/setup.log\ntests1\t{status}\t9\t200\tlogs/tests1.log\n")
    for phase in ("tests1", "tests2"):
        (tmp_path / "tests" / f"{phase}.xml").write_text(JUNIT.format(extra=extra))
    (tmp_path / "bench" / "offload.json").write_text(
        '{"section": "offload", "device": "gpu", "ranks": 1, "rows": [], "notes": [], "targets": ['
        '{"name": "offload copy time hidden", "measured": 0.5, "target": 0.7, "met": false}]}')
    return tmp_path


def test_summary_passes_a_green_run_and_reports_a_missed_target(tmp_path, capsys):
    assert gpu_summary.main([str(outdir(tmp_path))]) == 0
    text = (tmp_path / "summary.md").read_text()
    assert "| offload copy time hidden | 0.500 | >= 0.7 | no |" in text
    assert "2 passed, 0 failed, 0 skipped for want of a GPU" in text
    assert "**result: passed**" in text


def test_summary_fails_a_gpu_test_skipped_on_a_gpu_machine(tmp_path, capsys):
    skipped = '<skipped message="needs cupy and a CUDA device; this machine has none"/>'
    assert gpu_summary.main([str(outdir(tmp_path, extra=skipped))]) == 1
    assert "1 skipped for want of a GPU" in (tmp_path / "summary.md").read_text()
    assert gpu_summary.main([str(tmp_path), "--dry-run"]) == 0  # expected in a dry run


@pytest.mark.parametrize("status, extra", [("timeout", ""), ("ok", '<failure message="boom"/>')])
def test_summary_fails_a_failed_phase_or_test(tmp_path, capsys, status, extra):
    assert gpu_summary.main([str(outdir(tmp_path, status=status, extra=extra))]) == 1
    text = (tmp_path / "summary.md").read_text()
    assert "**result: FAILED**" in text
    if extra:
        assert "tests1 failed: `tests.mpi.test_collectives::test_b`" in text


# -- the whole plumbing, on NumPy ---------------------------------------------------------------------

@pytest.mark.slow
def test_cpu_dry_run_writes_the_layout_and_a_bundle(tmp_path):
    out, venv, bundle = tmp_path / "out", tmp_path / "venv", tmp_path / "gpu-check.tar.gz"
    (tmp_path / "no-wheels").mkdir()  # use this interpreter's mpi4py and MPI: nothing to install
    common = ["--cpu-dry-run", "--venv", venv, "--wheels", tmp_path / "no-wheels"]
    rc, text, _ = check(*common, "--only", "env,staging", "--bundle", bundle, out, timeout=300)
    assert rc == 0, text
    assert "CPU DRY RUN" in text and "**result: passed** (dry run: plumbing only)" in text
    for name in ("phases.tsv", "summary.md", "logs/setup.log", "logs/env.log", "logs/staging.log",
                 "bench/env.json", "bench/staging.json", "bench/staging.csv"):
        assert (out / name).is_file(), f"{name} missing; {sorted(str(p) for p in out.rglob('*'))}"
    phases = [line.split("\t")[:2] for line in (out / "phases.tsv").read_text().splitlines()]
    assert phases == [["setup", "ok"], ["env", "ok"], ["staging", "ok"]]
    assert "- rank 1 (local 1): device None, cuda_aware() = False" in text  # both ranks reported
    with tarfile.open(bundle) as tar:
        assert "out/summary.md" in tar.getnames()
    # no time left: every phase is reported as not run, and the run fails
    rc, text, _ = check(*common, "--only", "staging", "--deadline", "0", out, timeout=300)
    assert rc == 1 and "staging: not run" in text and "| staging | notime |" in text, text
