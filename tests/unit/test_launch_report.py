"""mpidprun names the host of a failed job from what mpiexec printed: Hydra's report of a process,
Open MPI's of a rank, and PRRTE's of a lost daemon (after which prterun exits 0: a failure all the
same, so that --restarts restarts it)."""
from types import SimpleNamespace

from mpidp.launch import cli, simcluster

HOSTS = [SimpleNamespace(name="127.0.0.2", slots=2), SimpleNamespace(name="127.0.0.3", slots=2)]
SIM = SimpleNamespace(hosts=HOSTS, np=4, sim=("2x2", None, None, "shared"))

PRTE_LOST = """--------------------------------------------------------------------------
PRTE has lost communication with a remote daemon.

  HNP daemon   : [prterun-vm-16094@0,0] on node vm
  Remote daemon: [prterun-vm-16094@0,2] on node simnode1

This is usually due to either a failure of the TCP network
connection to the node, or possibly an internal failure of
the daemon itself. We cannot recover from this failure, and
therefore will terminate the job.
--------------------------------------------------------------------------
"""


def test_a_lost_prrte_daemon_names_its_node():
    assert cli.failed_host(SIM, "noise\n" + PRTE_LOST) == (
        "host 127.0.0.3 (simulated node 1: ranks 2,3) failed: mpiexec lost its daemon there (a lost node, "
        "or its network), and mpiexec ended the job")
    assert cli._PRTE_LOST.search(PRTE_LOST.replace("\n", "\n ")), "PRRTE wraps its help text anywhere"
    real = SimpleNamespace(hosts=[SimpleNamespace(name="a", slots=1), SimpleNamespace(name="simnode1", slots=1)], np=2, sim=None)
    assert cli.failed_host(real, PRTE_LOST).startswith("host simnode1 (rank 1) failed: mpiexec lost its daemon")


def test_hydra_and_open_mpi_reports_still_name_their_host():
    hydra = "=\n=   BAD TERMINATION OF ONE OF YOUR APPLICATION PROCESSES\n=   PID 77 RUNNING AT 127.0.0.2\n" \
            "=   KILLED BY SIGNAL: 9 (Killed)\n"
    assert cli.failed_host(SIM, hydra).startswith("host 127.0.0.2 (simulated node 0: ranks 0,1) failed: a process "
                                                   "there (pid 77) ended with exit code 9")
    ompi = "prterun noticed that process rank 3 with PID 0 on node simnode1 exited on\nsignal 9 (Killed)."
    assert cli.failed_host(SIM, ompi).startswith("host 127.0.0.3 (simulated node 1: ranks 2,3) failed: rank 3")
    assert cli.failed_host(SIM, "nothing here") is None


def test_lost_daemon_files_name_their_node_once(tmp_path):
    (tmp_path / f"{simcluster.LOST}1").write_text("9")
    assert cli.lost_daemons(SIM, str(tmp_path)) == [
        "host 127.0.0.3 (simulated node 1: ranks 2,3) failed: its MPI daemon was killed by signal 9, so the "
        "node's ranks went with it (a lost node), and the job ended"]
    assert cli.lost_daemons(SIM, str(tmp_path)) == []  # read once: a restart starts clean
