"""Slurm and PBS: allocations read from the environment, the job scripts, and
scripts/slurm/train.sbatch submitted to a real single-node Slurm started here.

The Slurm fixture needs Debian's slurm-wlm (slurmctld, slurmd, sbatch, ...) and
root; it skips, saying which, when either is missing:
    apt-get install -y --no-install-recommends slurm-wlm
Authentication is auth/none where that plugin exists (Debian 12's Slurm 22.05),
else a private munged (the munge package comes with slurm-wlm).
"""
import glob
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from mpidp.launch import cli

ROOT = Path(__file__).resolve().parents[2]
SBATCH = ROOT / "scripts" / "slurm" / "train.sbatch"
PBS = ROOT / "scripts" / "pbs" / "train.pbs"
_LEFTOVERS = ("PMI_", "PMIX_", "HYDRA_", "OMPI_", "MPI_LOCAL", "PRTE_", "SLURM_", "PBS_", "MPIDP_")
SLURM_PROGRAMS = ("slurmctld", "slurmd", "sbatch", "salloc", "srun", "squeue", "scancel", "sinfo",
                  "scontrol")


def clean_env(extra=None):
    env = {k: v for k, v in os.environ.items() if not k.startswith(_LEFTOVERS)}
    env["PYTHONUNBUFFERED"] = "1"
    env.update({k: str(v) for k, v in (extra or {}).items()})
    return env


def bounded(cmd, env, timeout, cwd=ROOT):
    """Run ``cmd`` in its own session; on timeout SIGTERM, then SIGKILL the group, and fail."""
    proc = subprocess.Popen([str(c) for c in cmd], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env, cwd=cwd, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            out, err = proc.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            out, err = proc.communicate()
        pytest.fail(f"{' '.join(map(str, cmd))} ran past {timeout} s\n{out}\n{err}")
    return proc.returncode, out, err


# A training stand-in: fails once after writing the checkpoint of step 3 (as mpidp.checkpoint
# names it), then, resumed, reports what each rank saw.
RESUMABLE = '''\
import json, os, sys
from mpi4py import MPI
comm = MPI.COMM_WORLD
args = sys.argv[1:]
ckpt = args[args.index("--checkpoint-dir") + 1]
first = not os.path.exists(os.path.join(ckpt, "ckpt-00000003.npz"))
comm.Barrier()
if first and os.environ.get("TEST_FAIL_FIRST") == "1":
    if comm.rank == 0:
        open(os.path.join(ckpt, "ckpt-00000003.npz"), "wb").close()
    comm.Barrier()
    sys.exit(3)
keep = ("MPIDP_", "SLURM_PROCID", "SLURM_JOB_ID", "SLURM_GPUS_ON_NODE", "OMP_NUM_THREADS")
seen = {"rank": comm.rank, "size": comm.size, "argv": args,
        "env": {k: v for k, v in os.environ.items() if k.startswith(keep)}}
with open(os.path.join(ckpt, f"rank-{comm.rank}.json"), "w") as f:
    json.dump(seen, f)
comm.Barrier()
sys.exit(int(os.environ.get("TEST_EXIT", "0")))
'''


def reports(directory):
    return [json.loads(p.read_text()) for p in sorted(Path(directory).glob("rank-*.json"))]


@pytest.fixture
def resumable(tmp_path):
    path = tmp_path / "resumable.py"
    path.write_text(RESUMABLE)
    return path


# -- the scripts themselves ----------------------------------------------------------------------

def directives(path, prefix):
    """The directives a batch system reads: '#SBATCH'/'#PBS' lines before the first command."""
    found = []
    for line in path.read_text().splitlines()[1:]:
        if line.startswith(prefix):
            found.append(line[len(prefix):].split("#")[0].strip())
        elif line.strip() and not line.startswith("#"):
            break
    return found


@pytest.mark.parametrize("path", [SBATCH, PBS], ids=["sbatch", "pbs"])
def test_job_script_syntax(path):
    assert os.access(path, os.X_OK), f"{path} is not executable"
    rc, _, err = bounded(["bash", "-n", path], clean_env(), timeout=30)
    assert rc == 0, err


def test_sbatch_directives():
    opts = dict(d.lstrip("-").split("=", 1) for d in directives(SBATCH, "#SBATCH ") if "=" in d)
    assert opts == {"job-name": "mpidp-train", "nodes": "2", "ntasks-per-node": "4",
                    "gpus-per-node": "4", "cpus-per-task": "8", "time": "02:00:00",
                    "output": "%x-%j.out", "error": "%x-%j.err"}
    assert "--requeue" in directives(SBATCH, "#SBATCH ")


def test_pbs_directives():
    found = directives(PBS, "#PBS ")
    assert found == ["-N mpidp-train", "-l select=2:ncpus=32:ngpus=4:mpiprocs=4",
                     "-l walltime=02:00:00", "-j oe", "-o mpidp-train.log", "-r y"]


# -- allocations read from the environment (mpidprun --dry-run, in this process) -------------------

ALLOCATION = {"SLURM_JOB_ID": "77", "SLURM_JOB_NODELIST": "node[01-03]", "SLURM_NTASKS": "6",
              "SLURM_TASKS_PER_NODE": "2(x3)"}


def dry_run(capsys, monkeypatch, args, env, path=None):
    for key in list(os.environ):
        if key.startswith(_LEFTOVERS):
            monkeypatch.delenv(key)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    if path is not None:
        monkeypatch.setenv("PATH", f"{path}{os.pathsep}{os.environ['PATH']}")
    rc = cli.main(["--dry-run", *args])
    out, err = capsys.readouterr()
    assert rc == 0, err
    return out.strip(), err


def fake_srun(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text("#!/bin/sh\nexit 99\n")
    (bin_dir / "srun").chmod(0o755)
    return bin_dir


def test_inside_slurm_srun_gets_the_allocation(capsys, monkeypatch, tmp_path):
    bin_dir = fake_srun(tmp_path)
    out, _ = dry_run(capsys, monkeypatch, [sys.executable, "train.py"], ALLOCATION, path=bin_dir)
    # MPICH's libmpi talks PMI-1/2: plain srun (MpiDefault=none) would start 6 one-rank jobs
    assert out == (f"MPIDP_LAUNCHER=mpidprun {bin_dir}/srun --ntasks=6 --mpi=pmi2 "
                   f"--kill-on-bad-exit=1 --export=ALL {sys.executable} train.py")


def test_inside_slurm_np_defaults_to_all_task_slots(capsys, monkeypatch, tmp_path):
    env = {k: v for k, v in ALLOCATION.items() if k != "SLURM_NTASKS"}
    out, _ = dry_run(capsys, monkeypatch, [sys.executable, "t.py"], env, path=fake_srun(tmp_path))
    assert "--ntasks=6 " in out


def test_inside_slurm_mpiexec_gets_the_expanded_node_list(capsys, monkeypatch):
    out, _ = dry_run(capsys, monkeypatch, ["--mpi", "mpich", "-np", "5", "python", "t.py"],
                     ALLOCATION)
    assert out.split()[1:5] == ["-n", "5", "-hosts", "node01:2,node02:2,node03:2"]
    out, _ = dry_run(capsys, monkeypatch, ["--mpi", "openmpi", "python", "t.py"], ALLOCATION)
    assert out.split()[1:5] == ["-n", "6", "--host", "node01:2,node02:2,node03:2"]


def test_inside_slurm_too_many_ranks(capsys, monkeypatch):
    monkeypatch.setenv("SLURM_JOB_ID", "77")
    monkeypatch.setenv("SLURM_JOB_NODELIST", "gpu[1-2]")
    monkeypatch.setenv("SLURM_TASKS_PER_NODE", "4(x2)")
    assert cli.main(["-np", "9", "python", "t.py"]) == 2
    assert capsys.readouterr().err == (
        "mpidprun: error: 9 ranks but only 8 slots on gpu1:4,gpu2:4 (from slurm); "
        "pass --oversubscribe or give more slots\n")


def test_inside_pbs_the_nodefile_gives_hosts(capsys, monkeypatch, tmp_path):
    nodefile = tmp_path / "nodefile"
    nodefile.write_text("cn1\ncn1\ncn2\ncn2\n")
    out, _ = dry_run(capsys, monkeypatch, ["--mpi", "mpich", "python", "t.py"],
                     {"PBS_NODEFILE": str(nodefile), "PBS_JOBID": "12.pbs"})
    assert out.split()[1:5] == ["-n", "4", "-hosts", "cn1:2,cn2:2"]


# -- the job scripts run as the batch system would run them (no batch system needed) ------------

@pytest.mark.spawns
def test_pbs_script_runs_the_job(tmp_path, resumable):
    nodefile = tmp_path / "nodefile"
    nodefile.write_text("localhost\nlocalhost\nlocalhost\n")
    env = clean_env({"PBS_NODEFILE": nodefile, "PBS_O_WORKDIR": ROOT, "PBS_JOBNAME": "pbs-test",
                     "PBS_JOBID": "7.server", "PYTHON": sys.executable, "TRAIN_SCRIPT": resumable,
                     "TRAIN_ARGS": "--epochs 2", "SCRATCH_DIR": tmp_path, "TEST_FAIL_FIRST": "1"})
    rc, out, err = bounded(["bash", PBS], env, timeout=60)
    assert rc == 0, out + err
    ckpt = tmp_path / "mpidp" / "pbs-test"
    assert f"mpidp: job 7.server: 3 ranks on localhost, checkpoints in {ckpt}" in out
    assert "mpidprun: job failed (exit code 3); restart 1/1 from step 3" in err
    seen = reports(ckpt)
    assert [r["size"] for r in seen] == [3] * 3
    assert seen[0]["argv"] == ["--checkpoint-dir", str(ckpt), "--resume", "--epochs", "2"]
    assert seen[0]["env"]["OMP_NUM_THREADS"] == "8"


@pytest.mark.spawns
def test_sbatch_script_under_a_stand_in_allocation(tmp_path, resumable):
    """The script's logic and mpidprun's reading of SLURM_* without Slurm: mpiexec on the hosts."""
    env = clean_env({"SLURM_JOB_ID": "5", "SLURM_JOB_NAME": "fake", "SLURM_JOB_NODELIST": "localhost",
                     "SLURM_TASKS_PER_NODE": "2", "SLURM_NTASKS": "2", "SLURM_CPUS_PER_TASK": "3",
                     "SLURM_SUBMIT_DIR": ROOT, "MPIDPRUN_OPTS": "--mpi mpich --verbose",
                     "PYTHON": sys.executable, "TRAIN_SCRIPT": resumable, "SCRATCH_DIR": tmp_path})
    rc, out, err = bounded(["bash", SBATCH], env, timeout=60)
    assert rc == 0, out + err
    assert "hosts from slurm: localhost:2" in err
    ckpt = tmp_path / "mpidp" / "fake"
    seen = reports(ckpt)
    assert [r["size"] for r in seen] == [2, 2]
    assert seen[1]["argv"] == ["--checkpoint-dir", str(ckpt), "--resume"]
    assert seen[1]["env"]["OMP_NUM_THREADS"] == "3"


# -- a real Slurm --------------------------------------------------------------------------------

def _find(name):
    return shutil.which(name) or next((str(p) for d in ("/usr/sbin", "/usr/local/sbin", "/sbin")
                                       for p in [Path(d) / name] if p.exists()), None)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _processes_with(marker):
    """Pids (not ours) whose environment contains ``marker``: what this fixture's Slurm started."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit() and int(entry) != os.getpid():
            try:
                with open(f"/proc/{entry}/environ", "rb") as f:
                    if marker in f.read().split(b"\0"):
                        found.append(int(entry))
            except OSError:
                pass
    return found


_PLUGIN_DIRS = ("/usr/lib/*/slurm-wlm", "/usr/lib/*/slurm", "/usr/lib64/slurm", "/usr/lib/slurm",
                "/usr/local/lib/slurm")


def _auth():
    """'none' where Slurm has the auth/none plugin (no daemon needed), else 'munge' where munged
    is installed, else None. MPIDP_TEST_SLURM_AUTH=none|munge chooses."""
    forced = os.environ.get("MPIDP_TEST_SLURM_AUTH")
    if forced:
        return forced
    if any(glob.glob(os.path.join(d, "auth_none.so")) for d in _PLUGIN_DIRS):
        return "none"
    return "munge" if _find("munged") and _find("munge") else None


def _start_munge(daemons):
    """A private munged (own key and socket); returns the socket path."""
    # munged wants every directory above its socket searchable by all, unlike pytest's tmp (0700)
    root = Path(tempfile.mkdtemp(prefix="mpidp-munge-"))
    root.chmod(0o711)
    key = root / "munge.key"
    key.write_bytes(os.urandom(1024))
    key.chmod(0o400)
    sock = root / "munge.socket"
    daemons.append(subprocess.Popen(
        [_find("munged"), "-F", f"--key-file={key}", f"--socket={sock}", f"--pid-file={root}/pid",
         f"--log-file={root}/munged.log", f"--seed-file={root}/seed"],
        stdout=subprocess.DEVNULL, stderr=open(root / "munged.stderr", "w"),
        stdin=subprocess.DEVNULL, start_new_session=True))
    deadline = time.monotonic() + 10
    while not sock.exists():
        if time.monotonic() > deadline or daemons[-1].poll() is not None:
            pytest.fail(f"munged did not start: {(root / 'munged.stderr').read_text()}")
        time.sleep(0.05)
    return sock, root


SLURM_CONF = """\
ClusterName=mpidptest
SlurmctldHost={host}(127.0.0.1)
SlurmUser=root
SlurmdUser=root
{auth}
SlurmctldPort={ctld_port}
SlurmdPort={d_port}
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd.pid
SlurmctldLogFile={root}/slurmctld.log
SlurmdLogFile={root}/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SchedulerType=sched/builtin
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
MailProg=/bin/true
KillWait=2
JobCompType=jobcomp/none
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
# the node claims 8 CPUs and 4 GPUs whatever the machine has, so the real job script fits
SlurmdParameters=config_overrides
GresTypes=gpu
NodeName={host} NodeAddr=127.0.0.1 CPUs=8 RealMemory=1000 Gres=gpu:4 State=UNKNOWN
PartitionName=debug Nodes={host} Default=YES MaxTime=30 State=UP
"""


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    """A one-node Slurm on localhost: its environment (SLURM_CONF) for sbatch/salloc/squeue."""
    missing = [name for name in SLURM_PROGRAMS if not _find(name)]
    if missing:
        pytest.skip(f"Slurm is not installed ({', '.join(missing)} not found); install it with "
                    f"'apt-get install -y --no-install-recommends slurm-wlm'")
    if os.geteuid() != 0:
        pytest.skip("the one-node Slurm runs slurmd, which starts jobs as their user, so it needs "
                    "root; this suite runs as uid %d" % os.geteuid())
    auth = _auth()
    if auth is None:
        pytest.skip("this Slurm has no auth/none plugin and munge is not installed; "
                    "apt-get install -y munge")
    root = tmp_path_factory.mktemp("slurm")
    for sub in ("state", "spool", "dev"):
        (root / sub).mkdir()
    daemons, munge_dir = [], None
    if auth == "munge":
        sock, munge_dir = _start_munge(daemons)
        auth_lines = f"AuthType=auth/munge\nAuthInfo=socket={sock}\nCredType=cred/munge"
    else:
        auth_lines = "AuthType=auth/none\nCredType=cred/none"
    host = socket.gethostname().split(".")[0]
    conf = root / "slurm.conf"
    conf.write_text(SLURM_CONF.format(host=host, root=root, ctld_port=_free_port(),
                                      d_port=_free_port(), auth=auth_lines))
    # GPUs as plain files: slurmd logs that they are no devices, and counts them anyway
    (root / "gres.conf").write_text(f"NodeName={host} Name=gpu File={root}/dev/gpu[0-3]\n")
    for i in range(4):
        (root / "dev" / f"gpu{i}").touch()
    env = clean_env({"SLURM_CONF": conf})
    for name, args in (("slurmctld", ["-D", "-c"]), ("slurmd", ["-D", "-N", host])):
        log = open(root / f"{name}.stdout", "w")
        daemons.append(subprocess.Popen([_find(name), *args, "-f", str(conf)], env=env, stdout=log,
                                        stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                        start_new_session=True))
        log.close()

    def logs():
        return "\n".join(f"--- {p.name}\n" + "\n".join(p.read_text().splitlines()[-15:])
                         for p in sorted(root.glob("*.log")) + sorted(root.glob("*.stdout")))

    try:
        deadline = time.monotonic() + 30
        state = ""
        while time.monotonic() < deadline:
            if any(d.poll() is not None for d in daemons):
                pytest.fail(f"a Slurm daemon exited at start\n{logs()}")
            out = subprocess.run([_find("sinfo"), "-h", "-N", "-o", "%T"], env=env,
                                 capture_output=True, text=True, timeout=10)
            state = out.stdout.strip()
            if state == "idle":
                break
            time.sleep(0.3)
        else:
            pytest.fail(f"the Slurm node is {state or 'not known'} after 30 s\n{logs()}")
        yield env
    finally:
        _stop_slurm(env, daemons, conf)
        if munge_dir is not None:
            shutil.rmtree(munge_dir, ignore_errors=True)


def _stop_slurm(env, daemons, conf):
    """Cancel the jobs, stop slurmd, slurmctld (and munged), then end what outlived them."""
    jobs = subprocess.run([_find("squeue"), "-h", "-o", "%i"], env=env, capture_output=True,
                          text=True, timeout=10).stdout.split()
    if jobs:
        subprocess.run([_find("scancel"), *jobs], env=env, capture_output=True, timeout=10)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and subprocess.run(
                [_find("squeue"), "-h"], env=env, capture_output=True, text=True,
                timeout=10).stdout.strip():
            time.sleep(0.3)
    for d in reversed(daemons):  # slurmd, slurmctld, then munged
        if d.poll() is None:
            d.send_signal(signal.SIGTERM)
    for d in reversed(daemons):
        try:
            d.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(d.pid, signal.SIGKILL)
            d.wait()
    # slurmstepd and job processes carry this cluster's SLURM_CONF: end any that outlived it
    for pid in _processes_with(f"SLURM_CONF={conf}".encode()):
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass


def _wait_for(slurm, job, timeout=90):
    """Exit code of ``job`` once it ends, polling every 0.2 s (sbatch --wait polls at 2, then 10 s)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        out = subprocess.run([_find("scontrol"), "-o", "show", "job", job], env=slurm,
                             capture_output=True, text=True, timeout=10).stdout
        state = re.search(r"JobState=(\S+)", out)
        if state and state.group(1) not in ("PENDING", "CONFIGURING", "RUNNING", "COMPLETING"):
            return int(re.search(r"ExitCode=(\d+):", out).group(1))
        time.sleep(0.2)
    pytest.fail(f"Slurm job {job} still not done after {timeout} s")


def _submit(slurm, tmp_path, resumable, extra_env):
    """Submit scripts/slurm/train.sbatch on one node; (exit code, job id, .out text, .err text).

    The job's end is polled with scontrol: ``sbatch --wait`` gives the same exit code but looks
    only after 2 s and then every 10 s, which made each test 10 s long."""
    env = dict(slurm, PYTHON=sys.executable, TRAIN_SCRIPT=str(resumable), SCRATCH_DIR=str(tmp_path),
               **{k: str(v) for k, v in extra_env.items()})
    cmd = [_find("sbatch"), "--parsable", "--nodes=1", "--cpus-per-task=1", "--time=5",
           f"--output={tmp_path}/%x-%j.out", f"--error={tmp_path}/%x-%j.err"]
    rc, out, err = bounded(cmd + [SBATCH], env, timeout=60)
    job = out.strip().split(";")[0]
    assert rc == 0 and re.fullmatch(r"\d+", job), f"sbatch said {out!r} {err!r}"
    rc = _wait_for(slurm, job)
    files = {ext: (tmp_path / f"mpidp-train-{job}.{ext}").read_text() for ext in ("out", "err")}
    return rc, job, files["out"], files["err"]


@pytest.mark.spawns
def test_sbatch_train_script_fails_once_and_resumes(slurm, tmp_path, resumable):
    start = time.monotonic()
    rc, job, out, err = _submit(slurm, tmp_path, resumable, {"TEST_FAIL_FIRST": 1})
    seconds = time.monotonic() - start
    assert rc == 0, out + err
    ckpt = tmp_path / "mpidp" / "mpidp-train"
    host = socket.gethostname().split(".")[0]
    assert (f"mpidp: job {job} on {host}: 4 ranks (4 per node), checkpoints in {ckpt}, "
            f"restart count 0") in out
    assert "mpidprun: job failed (exit code 3); restart 1/1 from step 3" in err
    seen = reports(ckpt)
    assert [r["rank"] for r in seen] == [0, 1, 2, 3]
    for r in seen:
        assert r["size"] == 4                                   # one job of 4 ranks, not 4 singletons
        assert r["argv"] == ["--checkpoint-dir", str(ckpt), "--resume"]
        assert r["env"]["SLURM_PROCID"] == str(r["rank"])       # started by srun
        assert r["env"]["SLURM_JOB_ID"] == job
        assert r["env"]["MPIDP_LAUNCHER"] == "mpidprun"
        assert r["env"]["SLURM_GPUS_ON_NODE"] == "4"            # --gpus-per-node=4 was granted
        assert r["env"]["OMP_NUM_THREADS"] == "1"               # = --cpus-per-task
    assert seconds < 60


@pytest.mark.spawns
def test_sbatch_passes_the_job_exit_code(slurm, tmp_path, resumable):
    rc, _, out, err = _submit(slurm, tmp_path, resumable,
                              {"TEST_EXIT": 7, "RESTARTS": 0, "RUN_NAME": "exitcode"})
    assert rc == 7, out + err
    assert len(reports(tmp_path / "mpidp" / "exitcode")) == 4


@pytest.mark.spawns
def test_mpidprun_in_salloc_uses_srun(slurm, tmp_path, resumable):
    env = dict(slurm, TEST_EXIT="0")
    cmd = [_find("salloc"), "--ntasks=3", "--cpus-per-task=1", "--time=5",
           sys.executable, "-m", "mpidp.run", "--verbose", "--timeout", "60",
           sys.executable, resumable, "--checkpoint-dir", tmp_path]
    rc, out, err = bounded(cmd, env, timeout=90)
    assert rc == 0, out + err
    assert "--ntasks=3 --mpi=pmi2 --kill-on-bad-exit=1 --export=ALL" in err
    assert [r["size"] for r in reports(tmp_path)] == [3, 3, 3]
