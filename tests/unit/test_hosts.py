"""Host lists and launch argv, without starting anything: hostfile syntaxes, Slurm/PBS
allocations, restart bookkeeping, and the command each MPI flavour gets."""
import shlex
from pathlib import Path

import pytest

from mpidp.errors import HostfileError, LaunchError
from mpidp.launch import cli, hosts, mpiexec
from mpidp.launch.hosts import Host

ROOT = Path(__file__).resolve().parents[2]


# -- hostfiles and -H ----------------------------------------------------------------------------

@pytest.mark.parametrize("text, expected", [
    ("a:2,b:2", [("a", 2), ("b", 2)]),
    ("a,b", [("a", 1), ("b", 1)]),
    ("localhost:2,localhost:2", [("localhost", 4)]),        # duplicates merge, slots add
    ("n1:1,n2:3,n1:2", [("n1", 3), ("n2", 3)]),               # first-appearance order
    (" node-01.cluster:8 , 10.0.0.7:4 ", [("node-01.cluster", 8), ("10.0.0.7", 4)]),
])
def test_host_list(text, expected):
    assert hosts.parse_host_list(text) == expected


@pytest.mark.parametrize("text, fragment", [
    ("", "empty entry"),
    ("a:2,,b:2", "empty entry"),
    ("a:0", "at least 1 slot"),
    ("a:x", "expected 'host' or 'host:slots'"),
    ("a b", "expected 'host' or 'host:slots'"),
    ("a slots=2", "expected 'host' or 'host:slots'"),   # the Open MPI form is for hostfiles
    ("a:2:3", "expected 'host' or 'host:slots'"),
    ("-a:2", "expected 'host' or 'host:slots'"),
])
def test_host_list_errors(text, fragment):
    with pytest.raises(HostfileError, match=fragment) as err:
        hosts.parse_host_list(text)
    assert f"-H {text!r}" in str(err.value)
    assert "\n" not in str(err.value)


HOSTFILE = """\
# a comment, then a blank line

alpha:2
beta slots=4
gamma slots=2 max_slots=8   # trailing comment
delta
delta
   epsilon:1
alpha:1
"""


def test_hostfile_mixed_syntax():
    assert hosts.parse_hostfile(HOSTFILE) == [("alpha", 3), ("beta", 4), ("gamma", 2),
                                              ("delta", 2), ("epsilon", 1)]
    assert hosts.total_slots(hosts.parse_hostfile(HOSTFILE)) == 12


def test_hostfile_open_mpi_max_slots_alone_and_dashed_key():
    assert hosts.parse_hostfile("a max_slots=3\nb slots = 2\nc max-slots=5 slots=5\n") == [
        ("a", 3), ("b", 2), ("c", 5)]


@pytest.mark.parametrize("line, fragment", [
    ("node1 slots=x", "expected a whole number of slots"),
    ("node1 slots=4 max_slots=2", "max_slots must be at least slots"),
    ("node1 cpus=4", "unknown key 'cpus'"),
    ("node1:0", "at least 1 slot"),
    ("node1: 4", "is not a host entry"),
    ("node1 4", "is not a host entry"),
])
def test_hostfile_errors_name_file_and_line(tmp_path, line, fragment):
    path = tmp_path / "hosts"
    path.write_text(f"# header\ngood:2\n{line}\n")
    with pytest.raises(HostfileError, match=fragment) as err:
        hosts.read_hostfile(str(path))
    assert str(err.value).startswith(f"{path}:3: {line!r}")
    assert isinstance(err.value, LaunchError) and isinstance(err.value, ValueError)


def test_hostfile_empty_or_missing(tmp_path):
    path = tmp_path / "hosts"
    path.write_text("# nothing here\n\n")
    with pytest.raises(HostfileError, match="no hosts in the file"):
        hosts.read_hostfile(str(path))
    with pytest.raises(HostfileError, match="cannot read hostfile .*No such file"):
        hosts.read_hostfile(str(tmp_path / "absent"))


@pytest.mark.parametrize("name, expected", [
    ("localhost.hydra", [("localhost", 4)]),
    ("localhost.openmpi", [("localhost", 4)]),
    ("cluster.hydra.example", [(f"gpu-node0{i}", 4) for i in range(1, 5)]),
    ("cluster.openmpi.example", [(f"gpu-node0{i}", 4) for i in range(1, 5)]),
])
def test_shipped_hostfiles(name, expected):
    assert hosts.read_hostfile(str(ROOT / "hostfiles" / name)) == expected


def test_format_hostfile_round_trips():
    hs = [Host("a", 2), Host("b", 3)]
    assert hosts.format_hostfile(hs, "hydra") == "a:2\nb:3\n"
    assert hosts.format_hostfile(hs, "openmpi") == "a slots=2\nb slots=3\n"
    for syntax in ("hydra", "openmpi"):
        assert hosts.parse_hostfile(hosts.format_hostfile(hs, syntax)) == hs
    assert hosts.format_host_list(hs) == "a:2,b:3"


# -- PBS and Slurm -------------------------------------------------------------------------------

def test_pbs_nodefile_one_line_per_slot(tmp_path):
    path = tmp_path / "nodefile"
    path.write_text("cn001\ncn001\ncn001\ncn001\ncn002\ncn002\ncn002\ncn002\n")
    assert hosts.read_pbs_nodefile(str(path)) == [("cn001", 4), ("cn002", 4)]
    assert hosts.from_environment({"PBS_NODEFILE": str(path)}) == (
        "pbs", [("cn001", 4), ("cn002", 4)])


@pytest.mark.parametrize("text, expected", [
    ("node[01-03,07],gpu5", ["node01", "node02", "node03", "node07", "gpu5"]),
    ("vm", ["vm"]),
    ("n[8-11]", ["n8", "n9", "n10", "n11"]),
    ("n[008-010]", ["n008", "n009", "n010"]),
    ("a[1-2],b[3]", ["a1", "a2", "b3"]),
    ("rack[1-2]-n[1-2]", ["rack1-n1", "rack1-n2", "rack2-n1", "rack2-n2"]),
    ("n[01-03,07],gpu-[1-2]", ["n01", "n02", "n03", "n07", "gpu-1", "gpu-2"]),
    ("cn[1-2,5-6]", ["cn1", "cn2", "cn5", "cn6"]),
])
def test_slurm_nodelist(text, expected):
    assert hosts.expand_slurm_nodelist(text) == expected


@pytest.mark.parametrize("text, fragment", [
    ("node[01-03", "unbalanced brackets"),
    ("node[03-01]", "not a Slurm node list"),
    ("node[a-b]", "not a Slurm node list"),
    (" ", "names no hosts"),
    ("bad_name!", "is not a host name"),
])
def test_slurm_nodelist_errors(text, fragment):
    with pytest.raises(HostfileError, match=fragment):
        hosts.expand_slurm_nodelist(text)


@pytest.mark.parametrize("text, expected", [
    ("2(x3),1", [2, 2, 2, 1]), ("4", [4]), ("1,2,3", [1, 2, 3]), ("8(x2)", [8, 8])])
def test_slurm_tasks_per_node(text, expected):
    assert hosts.expand_slurm_tasks_per_node(text) == expected


def test_slurm_tasks_per_node_error():
    with pytest.raises(HostfileError, match="SLURM_TASKS_PER_NODE='2.x' is not"):
        hosts.expand_slurm_tasks_per_node("2(x")


def test_slurm_allocation():
    env = {"SLURM_JOB_ID": "42", "SLURM_JOB_NODELIST": "node[01-03,07]",
           "SLURM_TASKS_PER_NODE": "2(x3),1"}
    assert hosts.from_environment(env) == ("slurm", [("node01", 2), ("node02", 2), ("node03", 2),
                                                     ("node07", 1)])
    bad = dict(env, SLURM_TASKS_PER_NODE="2(x2)")
    with pytest.raises(HostfileError, match="names 4 nodes but SLURM_TASKS_PER_NODE='2.x2.' gives 2"):
        hosts.from_slurm(bad)
    with pytest.raises(HostfileError, match="SLURM_JOB_NODELIST is not"):
        hosts.from_slurm({"SLURM_JOB_ID": "42"})


def test_slurm_wins_over_pbs_and_nothing_is_local(tmp_path):
    nodefile = tmp_path / "nodefile"
    nodefile.write_text("x\n")
    env = {"SLURM_JOB_ID": "1", "SLURM_JOB_NODELIST": "vm", "SLURM_TASKS_PER_NODE": "2",
           "PBS_NODEFILE": str(nodefile)}
    assert hosts.from_environment(env)[0] == "slurm"
    assert hosts.from_environment({}) == (None, None)


# -- restarts ------------------------------------------------------------------------------------

def test_latest_checkpoint_step(tmp_path):
    prog = ["python", "train.py", "--checkpoint-dir", str(tmp_path)]
    assert cli.latest_checkpoint_step(prog) is None
    for name in ("ckpt-00000005.npz", "ckpt-00000120.npz", "ckpt-00000042.npz",
                 ".ckpt-00000999-x.npz.tmp", "ckpt-latest.npz", "notes.txt"):
        (tmp_path / name).write_bytes(b"")
    assert cli.latest_checkpoint_step(prog) == 120
    assert cli.latest_checkpoint_step(["python", "t.py", f"--checkpoint-dir={tmp_path}"]) == 120
    assert cli.latest_checkpoint_step(["python", "t.py"]) is None
    assert cli.latest_checkpoint_step(["python", "t.py", "--checkpoint-dir", str(tmp_path / "no")]) is None


def test_with_resume_added_once():
    assert cli.with_resume(["python", "t.py"]) == ["python", "t.py", "--resume"]
    assert cli.with_resume(["python", "t.py", "--resume"]) == ["python", "t.py", "--resume"]
    assert cli.with_resume(["python", "t.py", "--resume=yes"]) == ["python", "t.py", "--resume=yes"]


# -- argv per flavour (pure: nothing is run) ------------------------------------------------------

ENV = {"MPIDP_LAUNCHER": "mpidprun", "OMP_NUM_THREADS": "1"}
PROG = ["python", "train.py", "--lr", "0.1"]


def test_hydra_argv():
    cmd = mpiexec.build_command("mpich", 4, PROG, hosts=[Host("a", 2), Host("b", 2)], env=ENV)
    assert cmd.argv == ["mpiexec", "-n", "4", "-hosts", "a:2,b:2",
                        "-genv", "MPIDP_LAUNCHER", "mpidprun", "-genv", "OMP_NUM_THREADS", "1"] + PROG
    assert cmd.hostfile is None and cmd.env == {}
    local = mpiexec.build_command("mpich", 2, PROG, env={})
    assert local.argv == ["mpiexec", "-n", "2"] + PROG


@pytest.mark.parametrize("as_root", [False, True])
def test_open_mpi_argv(as_root):
    cmd = mpiexec.build_command("openmpi", 4, PROG, hosts=[Host("a", 2), Host("b", 2)], env=ENV,
                                oversubscribe=True, as_root=as_root)
    assert cmd.argv == (["mpiexec", "-n", "4", "--host", "a:2,b:2", "--bind-to", "none",
                         "--oversubscribe"] + (["--allow-run-as-root"] if as_root else [])
                        + ["-x", "MPIDP_LAUNCHER=mpidprun", "-x", "OMP_NUM_THREADS=1"] + PROG)
    local = mpiexec.build_command("openmpi", 3, PROG, env={}, as_root=False)
    assert local.argv == ["mpiexec", "-n", "3", "--host", "localhost:3", "--bind-to", "none"] + PROG


def test_srun_argv_keeps_env_out_of_argv():
    cmd = mpiexec.build_command("srun", 8, PROG, env=ENV, mpiexec="srun", srun_pmi="pmi2",
                                oversubscribe=True)
    assert cmd.argv == ["srun", "--ntasks=8", "--mpi=pmi2", "--kill-on-bad-exit=1",
                        "--export=ALL", "--overcommit"] + PROG
    assert cmd.env == ENV  # srun passes the launcher's environment on (--export=ALL)
    with pytest.raises(LaunchError, match="srun takes its hosts from the Slurm allocation"):
        mpiexec.build_command("srun", 2, PROG, hosts=[Host("a", 2)], mpiexec="srun")


@pytest.mark.parametrize("flavour, flag, line", [("mpich", "-f", "n0100:2"),
                                                 ("openmpi", "--hostfile", "n0100 slots=2")])
def test_long_host_lists_go_to_a_hostfile(flavour, flag, line):
    many = [Host(f"n{i:04d}", 2) for i in range(1, 101)]
    cmd = mpiexec.build_command(flavour, 200, PROG, hosts=many, env={}, hostfile_path="/x/hf",
                                as_root=False)
    assert cmd.argv[3:5] == [flag, "/x/hf"]
    path, text = cmd.hostfile
    assert path == "/x/hf" and text.splitlines()[-1] == line and len(text.splitlines()) == 100


def test_argv_is_a_list_that_survives_shell_quoting():
    cmd = mpiexec.build_command("openmpi", 2, ["python", "-c", "print('a b; $HOME')"],
                                env={"X": "two words"}, as_root=False)
    assert shlex.split(shlex.join(cmd.argv)) == cmd.argv


@pytest.mark.parametrize("text, flavour", [
    ("MPICH Version:      5.0.2\nMPICH Release date: ...", "mpich"),
    ("HYDRA build details:\n    Version:   5.0.2", "mpich"),
    ("Intel(R) MPI Library 2021.10 for Linux* OS", "mpich"),
    ("MVAPICH2 Version : 2.3.7", "mpich"),
    ("Open MPI v5.0.11, package: Open MPI user@localhost Distribution", "openmpi"),
    ("mpiexec (Open MPI) 5.0.11", "openmpi"),
    ("mpirun (OpenRTE) 3.1.6", "openmpi"),
    ("Microsoft MPI", ""),
])
def test_classify(text, flavour):
    assert mpiexec.classify(text) == flavour


@pytest.mark.parametrize("name, yes", [("python", True), ("python3", True), ("python3.11", True),
                                       ("/opt/venv/bin/python", True), ("pytest", False),
                                       ("python-config", False), ("./train.sh", False)])
def test_is_python(name, yes):
    assert mpiexec.is_python(name) is yes


# -- the parser ----------------------------------------------------------------------------------

def test_parser_keeps_program_options_for_the_program():
    args = cli.build_parser().parse_args(
        ["-np", "2", "-x", "A=1", "-x", "B", "python", "t.py", "-np", "7", "--timeout", "3"])
    assert args.np == 2 and args.env == ["A=1", "B"] and args.timeout is None
    assert args.program == ["python", "t.py", "-np", "7", "--timeout", "3"]
    assert cli.build_parser().parse_args(["-n", "3", "prog"]).np == 3


def test_forwarded_env():
    env = cli._forwarded_env(["OMP_NUM_THREADS", "X=a=b", "EMPTY="],
                             {"OMP_NUM_THREADS": "2", "MPIDP_CHECK": "0", "MPIDP_LAUNCHER": "x",
                              "HOME": "/root"})
    assert env == {"MPIDP_LAUNCHER": "mpidprun", "MPIDP_CHECK": "0", "OMP_NUM_THREADS": "2",
                   "X": "a=b", "EMPTY": ""}
    with pytest.raises(LaunchError, match="-x NOPE: NOPE is not set here; give -x NOPE=VALUE"):
        cli._forwarded_env(["NOPE"], {})
    with pytest.raises(LaunchError, match="is not VAR or VAR=VALUE"):
        cli._forwarded_env(["1X=2"], {})
