"""``mpidprun``: argument parsing, checks before launch, the job's lifetime and restarts."""
import argparse
import glob
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from typing import NamedTuple

from .._version import __version__
from ..errors import LaunchError
from . import hosts as _hosts
from . import mpiexec as _mpiexec
from . import simcluster as _sim

__all__ = ["main", "build_parser", "plan", "Plan", "latest_checkpoint_step", "with_resume"]

PROG = "mpidprun"

DESCRIPTION = """\
Start a data-parallel mpidp job: N copies of PROGRAM over MPI.

mpidprun finds the mpiexec of the MPI that mpi4py was built for (MPICH/Hydra
or Open MPI), writes the host list in that MPI's own syntax, forwards the
environment mpidp needs to every rank, and returns the job's exit code.
Inside a Slurm allocation it starts the ranks with srun; inside a PBS job it
reads $PBS_NODEFILE. Nothing is started when the arguments are wrong."""

EPILOG = """\
examples:
  mpidprun -np 4 python scripts/train.py --epochs 2
  mpidprun -H node1:4,node2:4 python scripts/train.py      8 ranks, 4 per host
  mpidprun --hostfile hostfiles/localhost.hydra -np 4 python -m pytest tests/mpi
  mpidprun -np 4 -x OMP_NUM_THREADS=1 -x PYTHONPATH python train.py
  mpidprun -np 2 --mpi openmpi --dry-run python train.py   print the command only
  mpidprun -np 8 --restarts 3 python scripts/train.py --checkpoint-dir ckpt
                               on failure relaunch with --resume, up to 3 times
  sbatch scripts/slurm/train.sbatch                        the same job under Slurm
  mpidprun --simulate-nodes 2x2 --link-rate 2gbit python train.py
                               2 simulated nodes of 2 ranks on this machine (docs/cluster.md)

hosts:
  -H and --hostfile read 'host:slots' (MPICH/Hydra), 'host slots=N' (Open MPI)
  and bare 'host' lines (one slot each, as in $PBS_NODEFILE); '#' starts a
  comment and a repeated host adds its slots. Without either, mpidprun uses
  the Slurm allocation (SLURM_JOB_NODELIST, SLURM_TASKS_PER_NODE), then
  $PBS_NODEFILE, then this machine alone.

environment:
  Every rank gets MPIDP_LAUNCHER=mpidprun, each MPIDP_* variable set here, and
  the -x variables. On this machine alone, unless OMP_NUM_THREADS,
  OPENBLAS_NUM_THREADS or MKL_NUM_THREADS is set, ranks split the cores among
  their BLAS/OpenMP threads (cores // ranks each).

exit status:
  the job's exit code; 2 when the arguments are wrong (nothing was started;
  a job that exits 2 is not restarted either);
  124 when --timeout expired; 128+N when mpidprun was stopped by signal N."""

GRACE_S = 3.0  # after SIGTERM, how long the job may clean up before SIGKILL
REFUSED = 2  # a job's exit status that --restarts does not restart: a usage error, the same command fails again


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        self.exit(2, f"{PROG}: error: {message}; see '{PROG} --help'\n")


def build_parser():
    """The argparse parser of ``mpidprun``."""
    p = _Parser(prog=PROG, description=DESCRIPTION, epilog=EPILOG, allow_abbrev=False,
                usage=f"{PROG} [-np N] [-H HOSTS | --hostfile FILE] [options] PROGRAM [ARGS ...]",
                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-np", "-n", "--num-proc", dest="np", type=int, metavar="N",
                   help="number of ranks (default: all slots of the hosts, or SLURM_NTASKS)")
    where = p.add_mutually_exclusive_group()
    where.add_argument("-H", "--hosts", dest="hosts", metavar="HOSTS",
                       help="comma-separated hosts with slots, e.g. node1:4,node2:4")
    where.add_argument("--hostfile", metavar="FILE",
                       help="file of 'host:slots' or 'host slots=N' lines (see hostfiles/)")
    where.add_argument("--simulate-nodes", metavar="LAYOUT",
                       help="run the job as several nodes on this machine: 2x2 (2 nodes of 2 ranks), "
                            "2+1 or 2,1 (ranks per node), or K with -np; inter-node traffic goes over "
                            "TCP on 127.0.0.x in the job's own network namespace")
    p.add_argument("--link-rate", metavar="RATE",
                   help="with --simulate-nodes: limit the link between the nodes, e.g. 2gbit or 100mbit "
                        "(tc token bucket; needs root or user namespaces, else runs unshaped)")
    p.add_argument("--link-model", choices=_sim.LINK_MODELS, default="shared",
                   help="with --simulate-nodes: 'shared' (default): one loopback shaped as one link that "
                        "all nodes and both directions share; 'per-node' (MPICH, needs the job's own "
                        "namespace): each node in a namespace of its own with its own full-duplex link")
    p.add_argument("-x", dest="env", action="append", default=[], metavar="VAR[=VALUE]",
                   help="forward VAR (its value here, or VALUE) to every rank; repeatable")
    p.add_argument("--oversubscribe", action="store_true",
                   help="allow more ranks than slots")
    p.add_argument("--timeout", type=float, metavar="S",
                   help="kill the job and exit 124 after S seconds (restarts included)")
    p.add_argument("--restarts", type=int, default=0, metavar="K",
                   help="relaunch a failed job up to K times, adding --resume (default 0); not one "
                        "that exited 2, a usage error")
    p.add_argument("--mpi", choices=("auto",) + _mpiexec.LAUNCHERS, default="auto",
                   help="launcher: auto (mpi4py's MPI; srun inside Slurm), mpich, openmpi or srun")
    p.add_argument("--mpiexec", metavar="PATH", help="use this mpiexec instead of searching")
    p.add_argument("--dry-run", action="store_true",
                   help="print the command that would run, shell-quoted, and exit 0")
    p.add_argument("-v", "--verbose", action="store_true",
                   help="say which MPI, mpiexec and hosts were chosen, and the command")
    p.add_argument("--version", action="version", version=f"%(prog)s (mpidp) {__version__}")
    p.add_argument("program", nargs=argparse.REMAINDER, metavar="PROGRAM [ARGS ...]",
                   help="the command every rank runs, e.g. python train.py")
    return p


class Plan(NamedTuple):
    """Everything decided before launch."""
    launcher: str          # 'mpich', 'openmpi' or 'srun'
    mpiexec: str
    np: int
    hosts: list            # None: the launcher's default placement
    host_source: str       # '-H', '--hostfile', 'slurm', 'pbs' or 'local'
    env: dict              # forwarded to every rank
    program: list
    srun_pmi: str
    oversubscribe: bool
    notes: list            # what --verbose prints
    sim: tuple = None      # (Layout, link rate or None, unshare prefix or None) for --simulate-nodes


def _resolve_program(program):
    name = program[0]
    if os.sep in name:
        if not os.path.exists(name):
            raise LaunchError(f"program {name!r} does not exist")
        if os.path.isdir(name) or not os.access(name, os.X_OK):
            raise LaunchError(f"program {name!r} is not executable; chmod +x it or run it "
                              f"through its interpreter, e.g. 'python {name}'")
        return name
    found = shutil.which(name)
    if not found:
        raise LaunchError(f"program {name!r} is not found on PATH")
    return found


def _forwarded_env(specs, environ):
    env = {"MPIDP_LAUNCHER": PROG}
    for key in sorted(environ):
        if key.startswith("MPIDP_") and key != "MPIDP_LAUNCHER":
            env[key] = environ[key]
    for spec in specs:
        key, eq, value = spec.partition("=")
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key):
            raise LaunchError(f"-x {spec!r} is not VAR or VAR=VALUE")
        if not eq:
            if key not in environ:
                raise LaunchError(f"-x {key}: {key} is not set here; give -x {key}=VALUE")
            value = environ[key]
        env[key] = value
    return env


def _hosts_of(args, environ):
    """(source, hosts): -H, --hostfile, the batch system's allocation, or (local, None)."""
    if args.hosts is not None:
        return "-H", _hosts.parse_host_list(args.hosts)
    if args.hostfile is not None:
        return "--hostfile", _hosts.read_hostfile(args.hostfile)
    if args.simulate_nodes is not None:
        layout = _sim.parse_layout(args.simulate_nodes, args.np)
        return "--simulate-nodes", [_hosts.Host(name, n) for name, n in layout.hosts()]
    source, hosts = _hosts.from_environment(environ)
    return source or "local", hosts


def _ranks(args, source, hosts, environ):
    """-np, or all slots of the hosts, or SLURM_NTASKS; checked against the slots."""
    np = args.np
    if np is None:
        if hosts is not None:
            np = _hosts.total_slots(hosts)
        elif environ.get("SLURM_NTASKS", "").isdigit():
            np = int(environ["SLURM_NTASKS"])
        else:
            raise LaunchError("the number of ranks is not known; give -np N, -H or --hostfile")
    if np < 1:
        raise LaunchError(f"-np {np}: the number of ranks must be at least 1")
    slots = _hosts.total_slots(hosts) if hosts is not None else None
    if slots is not None and np > slots and not args.oversubscribe:
        where = _hosts.format_host_list(hosts)
        where = where if len(where) <= 60 else f"{len(hosts)} hosts"
        raise LaunchError(f"{np} ranks but only {slots} slots on {where} (from {source}); "
                          f"pass --oversubscribe or give more slots")
    return np


def _launcher(args, source, info, environ, notes):
    """'mpich', 'openmpi' or 'srun' for --mpi ``args.mpi`` and mpi4py's MPI ``info``."""
    if args.mpi != "auto":
        if info is not None and info.flavour and args.mpi != "srun" and info.flavour != args.mpi:
            notes.append(f"warning: mpi4py is built for {_mpiexec.NAMES[info.flavour]} but --mpi "
                         f"{args.mpi} was given; the ranks may start as separate 1-rank jobs")
        return args.mpi
    if source == "slurm" and shutil.which("srun", path=environ.get("PATH")):
        return "srun"
    if not info.flavour:
        raise LaunchError(f"mpi4py's MPI library is neither MPICH nor Open MPI "
                          f"({info.version!r}); pass --mpi mpich|openmpi|srun")
    return info.flavour


def _share_cores(env, environ, np, notes):
    """Local ranks split this machine's cores among their BLAS/OpenMP threads (as torchrun does).

    Left alone when the user set any of the variables: their choice wins.
    """
    names = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")
    if any(name in environ or name in env for name in names):
        return
    threads = str(max(1, (os.cpu_count() or 1) // max(np, 1)))
    for name in names:
        env[name] = threads
    notes.append(f"{np} local ranks share {os.cpu_count()} cores: {threads} BLAS/OpenMP thread(s) each "
                 f"(set OMP_NUM_THREADS to choose)")


def plan(args, environ=None):
    """Check ``args`` and decide the launch; ``LaunchError`` (one sentence) when anything is wrong.

    The cheap checks come first, so bad input fails before any subprocess runs.
    """
    environ = os.environ if environ is None else environ
    program = list(args.program)
    if program[:1] == ["--"]:
        program = program[1:]
    if not program:
        raise LaunchError("no program given; put the command after the options, "
                          "e.g. 'mpidprun -np 4 python train.py'")
    resolved = _resolve_program(program)
    if args.restarts < 0:
        raise LaunchError(f"--restarts {args.restarts}: must be 0 or more")
    if args.timeout is not None and args.timeout <= 0:
        raise LaunchError(f"--timeout {args.timeout:g}: must be more than 0 seconds")
    if args.link_rate is not None and args.simulate_nodes is None:
        raise LaunchError(f"--link-rate {args.link_rate} shapes the link between simulated nodes; "
                          f"give --simulate-nodes too")
    if args.link_model != "shared" and args.simulate_nodes is None:
        raise LaunchError(f"--link-model {args.link_model} is a model of the links between simulated "
                          f"nodes; give --simulate-nodes too")
    env = _forwarded_env(args.env, environ)
    source, hosts = _hosts_of(args, environ)
    np = _ranks(args, source, hosts, environ)
    if args.mpi == "srun" and source not in ("slurm", "local"):
        raise LaunchError(f"srun takes its hosts from the Slurm allocation, not from {source}; "
                          f"pass --mpi mpich|openmpi to use mpiexec with them")
    if args.mpiexec and not shutil.which(args.mpiexec, path=environ.get("PATH")):
        raise LaunchError(f"--mpiexec {args.mpiexec}: not found or not executable; give the path of "
                          f"an mpiexec (or srun)")

    notes, info = [], None
    if not (args.dry_run and args.mpi in ("mpich", "openmpi")):
        # the ranks' python decides which MPI matters: probe it when the program is one
        info = _mpiexec.probe_mpi4py(resolved if _mpiexec.is_python(program[0]) else None)
        notes.append(f"mpi4py of {info.python} loads {info.version or 'an unknown MPI'}"
                     + (f" from {info.libdirs[0]}" if info.libdirs else ""))
    launcher = _launcher(args, source, info, environ, notes)
    sim = None
    if args.simulate_nodes is not None:
        sim = _simulated(args, launcher, np, env, environ, notes)
    if not hosts or sim:  # simulated nodes share this machine's cores too
        _share_cores(env, environ, np, notes)

    srun_pmi = ""
    if launcher == "srun":  # (--mpi srun with -H/--hostfile was refused above)
        hosts = None
        exe = args.mpiexec or shutil.which("srun", path=environ.get("PATH")) or "srun"
        srun_pmi = _mpiexec.SRUN_PMI.get(info.flavour if info else "", "")
    elif args.dry_run and info is None and not args.mpiexec:
        try:
            exe = _mpiexec.find_mpiexec(launcher)
        except LaunchError:
            exe = "mpiexec"  # a dry run only shows the command; the binary need not be here
    else:
        exe = _mpiexec.find_mpiexec(launcher, info, explicit=args.mpiexec)
    notes.append(f"launcher {launcher}: {exe}")
    notes.append(f"hosts from {source}: {_hosts.format_host_list(hosts)}" if hosts
                 else "hosts: this machine")
    return Plan(launcher, exe, np, hosts, source, env, program, srun_pmi, args.oversubscribe, notes, sim)


def _simulated(args, launcher, np, env, environ, notes):
    """(layout, rate, unshare prefix, link model) of --simulate-nodes; MPICH is told to cross nodes
    over TCP (Open MPI is told so on its command line, see ``_command``)."""
    layout = _sim.parse_layout(args.simulate_nodes, np)
    rate = _sim.check_rate(args.link_rate) if args.link_rate else None
    if launcher not in ("mpich", "openmpi"):
        raise LaunchError(f"--simulate-nodes starts the nodes through MPICH's or Open MPI's mpiexec, "
                          f"not {_mpiexec.NAMES.get(launcher, launcher)}; pass --mpi mpich|openmpi")
    if launcher == "mpich":
        for key, value in _sim.MPICH_TCP_ENV.items():
            env.setdefault(key, environ.get(key, value))
    elif np > (os.cpu_count() or 1):
        # Open MPI yields when it knows the ranks outnumber the cores, but here each node's slots
        # are its own: its ranks would spin, and the 64 MiB Allreduce on 2x2 took 3-10 s, not 0.3
        env.setdefault(_sim.OPENMPI_YIELD, environ.get(_sim.OPENMPI_YIELD, "1"))
        notes.append(f"{np} ranks on {os.cpu_count()} cores: Open MPI's waiting ranks yield "
                     f"({_sim.OPENMPI_YIELD}={env[_sim.OPENMPI_YIELD]})")
    prefix, why = _sim.isolation()
    if prefix is None and launcher == "openmpi":
        # PRRTE's daemons would talk over this machine's own network (they never use loopback)
        # and, under one host name, be taken for one node
        raise LaunchError(f"--simulate-nodes with Open MPI needs the job's own network namespace, "
                          f"which is not available here ({why}); run as root, allow user namespaces, "
                          f"or use MPICH")
    per_node = args.link_model == "per-node"
    if per_node and launcher != "mpich":
        raise LaunchError(f"--link-model per-node runs MPICH's Hydra proxies in the nodes' own namespaces; "
                          f"it was not built for {_mpiexec.NAMES.get(launcher, launcher)}: use --mpi mpich "
                          f"or the shared link model")
    if per_node and prefix is None:
        raise LaunchError(f"--link-model per-node needs the job's own network namespace, which is not "
                          f"available here ({why}); run as root, allow user namespaces, or use the shared "
                          f"link model")
    if prefix is not None and launcher == "mpich":
        # libfabric's TCP provider on the node's link (never its lo), or on the job's lo: the job's
        # namespace has no other interface, so a cluster's FI_TCP_IFACE=eth0 would fail MPI_Init
        iface = _sim.NODE_LINK if per_node else "lo"
        given = env.get("FI_TCP_IFACE", environ.get("FI_TCP_IFACE", iface))
        if given != iface:
            notes.append(f"FI_TCP_IFACE={given} replaced by {iface}: the job's namespace has no {given}")
        env["FI_TCP_IFACE"] = iface
    where = "; ".join(f"node {i} at {addr} ({n} rank{'s' * (n > 1)})"
                      for i, (addr, n) in enumerate(layout.hosts()))
    notes.append(f"simulated cluster {layout}: {where}")
    if prefix is None:
        notes.append(f"warning: simulated nodes without their own network namespace ({why}): "
                     f"they talk over this machine's loopback"
                     + (f", and --link-rate {rate} is not applied" if rate else "")
                     + ", with one host name")
    elif per_node:
        notes.append("a namespace per node, each with its own full-duplex link to a hub"
                     + (f", limited to {rate} each way (tc tbf on both ends)" if rate else " (unshaped)"))
    elif rate:
        notes.append(f"inter-node link limited to {rate} (tc tbf on the namespace's lo)")
    return layout, rate, prefix, args.link_model


def _agent_script(path):
    """Write the executable Hydra runs instead of ssh: it runs the node's command here."""
    with open(path, "w") as f:
        f.write(f"#!/bin/sh\nexec {shlex.quote(sys.executable)} -m mpidp.launch._simhelper node \"$@\"\n")
    os.chmod(path, 0o755)


def _command(p, program, hostfile_path):
    command = _mpiexec.build_command(p.launcher, p.np, program, hosts=p.hosts, env=p.env,
                                     oversubscribe=p.oversubscribe,
                                     mpiexec=p.mpiexec, hostfile_path=hostfile_path,
                                     srun_pmi=p.srun_pmi)
    if p.sim is None:
        return command
    layout, rate, prefix, model = p.sim
    job = os.path.dirname(hostfile_path)
    agent = os.path.join(job, "simnode")
    if p.launcher == "openmpi":  # PRRTE starts a prted per node through the agent
        # the daemons keep to their link: a cluster's oob_tcp_if_include (eth0) is not in the namespace
        start = ["--prtemca", "plm_ssh_agent", agent, "--prtemca", "oob_tcp_if_include", _sim.DAEMON_LINK[0]]
        for key, value in _sim.OPENMPI_TCP_MCA.items():  # wins over OMPI_MCA_* of the environment
            start += ["--mca", key, value]
    else:
        start = ["-launcher", "ssh", "-launcher-exec", agent]
    per_node = model == "per-node"
    if per_node:  # mpiexec stays in the hub: the nodes' proxies reach it there
        start += ["-localhost", _sim.HUB_ADDRESS]
    argv = command.argv[:1] + start + command.argv[1:]
    if p.launcher == "openmpi":  # a site's btl_tcp_if_exclude beside if_include lo: Open MPI refuses both
        argv = [shutil.which("env") or "env", "-u", _sim.OPENMPI_TCP_EXCLUDE] + argv
    env = dict(command.env, **{_sim.ENV_JOB: job})
    if per_node:
        env[_sim.ENV_LINKS] = os.path.join(job, "netns")
    if prefix is not None:
        env["MPIDP_SIM_NETNS"] = "1"
        # per-node: the nodes' namespaces are bound to files in a mount namespace of the job's own,
        # so that they go when the job does
        argv = prefix[:-1] + (["--mount"] if per_node else []) + prefix[-1:] + [
            sys.executable, "-m", "mpidp.launch._simhelper", "netns"] + (
            ["--rate", rate] if rate else []) + (
            ["--daemon-link"] if p.launcher == "openmpi" else []) + (
            ["--per-node", str(len(layout.ranks))] if per_node else []) + ["--"] + argv
    return _mpiexec.Command(argv, env, command.hostfile)


def latest_checkpoint_step(program):
    """Step of the newest ``ckpt-<step>.npz`` in the program's ``--checkpoint-dir``; None if none."""
    directory = None
    for i, arg in enumerate(program):
        if arg == "--checkpoint-dir" and i + 1 < len(program):
            directory = program[i + 1]
        elif arg.startswith("--checkpoint-dir="):
            directory = arg.split("=", 1)[1]
    if not directory:
        return None
    steps = [int(m.group(1)) for path in glob.glob(os.path.join(glob.escape(directory), "ckpt-*.npz"))
             for m in [re.fullmatch(r"ckpt-(\d+)\.npz", os.path.basename(path))] if m]
    return max(steps) if steps else None


def with_resume(program):
    """``program`` with ``--resume`` appended unless it is there already."""
    if any(a == "--resume" or a.startswith("--resume=") for a in program[1:]):
        return list(program)
    return list(program) + ["--resume"]


def _say(message):
    print(f"{PROG}: {message}", file=sys.stderr, flush=True)


def _display(command):
    assigns = [f"{k}={shlex.quote(v)}" for k, v in command.env.items()]
    return " ".join(assigns + [shlex.join(command.argv)])


def _stat(pid):
    """(ppid, start time) of ``pid`` from /proc, or None when it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return int(fields[1]), fields[19]


def _descendants(pid):
    """[(pid, start time)] of every process below ``pid``. Hydra's proxies and ranks each call
    setsid, so killing the job's process group alone would leave them running."""
    children = {}
    for entry in os.listdir("/proc") if os.path.isdir("/proc") else []:
        st = _stat(entry) if entry.isdigit() else None
        if st:
            children.setdefault(st[0], []).append((int(entry), st[1]))
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child[0])
    return out


def _alive(members):
    """The members of ``members`` that still run (same pid and start time: not a reused pid)."""
    return [(pid, start) for pid, start in members if (_stat(pid) or (0, None))[1] == start]


def _signal_group(pgid, signum):
    try:
        os.killpg(pgid, signum)
    except OSError:
        pass


def _stop(proc, signum, grace):
    """Stop the job: ``signum`` to its process group (mpiexec/srun pass it on to the ranks), then
    after ``grace`` seconds SIGKILL to the group and to every process that was below it."""
    members = _descendants(proc.pid)
    _signal_group(proc.pid, signum)
    try:
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        members += _descendants(proc.pid)
        _signal_group(proc.pid, signal.SIGKILL)
        proc.wait()
    end = time.monotonic() + 1.0
    while _alive(members) and time.monotonic() < end:
        time.sleep(0.05)
    for pid, _ in _alive(members):
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass


TAIL_BYTES = 16384  # of each output stream, kept to read mpiexec's last words about a failure


def _forward(source, sink, tail):
    """Copy ``source`` (a pipe) to ``sink`` as it comes, keeping its last TAIL_BYTES in ``tail``."""
    while True:
        try:
            chunk = os.read(source.fileno(), 65536)
        except OSError:
            chunk = b""
        if not chunk:
            break
        try:
            sink.write(chunk)
            sink.flush()
        except (OSError, ValueError):
            pass
        tail[:] = (bytes(tail) + chunk)[-TAIL_BYTES:]
    source.close()


def run_bounded(argv, env=None, deadline=None, grace=GRACE_S, tails=None):
    """Run ``argv`` in its own session until it exits, ``deadline`` (time.monotonic) passes, or
    mpidprun gets SIGINT/SIGTERM/SIGHUP. Returns (exit code, why): why is 'exit', 'timeout' or
    'signal'; a child killed by signal N gives 128+N, as a shell reports it. With ``tails`` (a
    list) the job's stdout and stderr pass through here and end up, their last bytes, in it."""
    received = []
    pipe = subprocess.PIPE if tails is not None else None
    try:
        proc = subprocess.Popen(argv, env=env, start_new_session=True, stdout=pipe, stderr=pipe)
    except OSError as exc:
        raise LaunchError(f"cannot start {argv[0]}: {exc.strerror}") from None
    forwarders = []
    if tails is not None:
        tails[:] = [bytearray(), bytearray()]
        for source, sink, tail in ((proc.stdout, sys.stdout.buffer, tails[0]),
                                   (proc.stderr, sys.stderr.buffer, tails[1])):
            forwarders.append(threading.Thread(target=_forward, args=(source, sink, tail), daemon=True))
            forwarders[-1].start()
    handled = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
    previous = {}
    if threading.current_thread() is threading.main_thread():  # signal handlers live there only
        previous = {s: signal.signal(s, lambda signum, frame: received.append(signum))
                    for s in handled}
    try:
        while True:
            step = 0.1 if deadline is None else max(0.0, min(0.1, deadline - time.monotonic()))
            try:
                code = proc.wait(timeout=step)
                return (128 - code if code < 0 else code), "exit"
            except subprocess.TimeoutExpired:
                pass
            if received:
                _stop(proc, received[0], grace)
                return 128 + received[0], "signal"
            if deadline is not None and time.monotonic() >= deadline:
                _stop(proc, signal.SIGTERM, grace)
                return 124, "timeout"
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        for thread in forwarders:  # a rank that outlived mpiexec may hold the pipe: wait briefly
            thread.join(timeout=2.0)


# What mpiexec prints when a process ends badly: Hydra names the host, Open MPI the rank and node
# (in a help text that it wraps at any space).
_HYDRA_FAILED = re.compile(r"PID (\d+) RUNNING AT (\S+)\s*\n=\s*(?:EXIT CODE|KILLED BY SIGNAL): (\d+)")
_OPENMPI_FAILED = re.compile(r"process\s+rank\s+(\d+)\s+with\s+PID\s+(\d+)\s+on\s+node\s+(\S+)\s+"
                             r"exited\s+on\s+signal\s+(\d+)")
# PRRTE ends the job when it loses a node's daemon, then exits 0
_PRTE_LOST = re.compile(r"PRTE\s+has\s+lost\s+communication\s+with\s+a\s+remote\s+daemon\.[\s\S]*?"
                        r"Remote\s+daemon:\s*\S+\s+on\s+node\s+(\S+)")


def failed_host(p, text):
    """'host 127.0.0.3 (simulated node 1: ranks 2,3) ...' from mpiexec's report of a failed
    process in ``text``, or None when it names no host of the job."""
    found = _HYDRA_FAILED.search(text)
    if found:
        pid, host, code = found.groups()
        what = f"a process there (pid {pid}) ended with exit code {code}"
    else:
        found = _OPENMPI_FAILED.search(text)
        if found:
            rank, pid, host, code = found.groups()
            what = f"rank {rank} (pid {pid}) ended by signal {code}"
        else:
            found = _PRTE_LOST.search(text)
            if not found:
                return None
            host, what = found.group(1), "mpiexec lost its daemon there (a lost node, or its network)"
        if p.sim:  # PRRTE names a simulated node by the host name its daemon reported
            host = {_sim.node_name(i): h.name for i, h in enumerate(p.hosts)}.get(host, host)
    where = _hosts.placement(p.hosts or [], p.np)
    if host not in where:
        return None
    node = ""
    if p.sim:
        node = f"simulated node {[h.name for h in p.hosts].index(host)}: "
    return (f"host {host} ({node}{_hosts.ranks_text(where[host])}) failed: {what}, "
            f"and mpiexec ended the job")


def lost_daemons(p, job):
    """'host 127.0.0.3 (simulated node 1: ranks 2,3) failed: ...' for each simulated node whose daemon
    died by a signal in this run (the node helper leaves a file saying so); the files are removed."""
    where = _hosts.placement(p.hosts or [], p.np)
    out = []
    for path in sorted(glob.glob(os.path.join(glob.escape(job), _sim.LOST + "*"))):
        index = int(path.rsplit("-", 1)[1])
        with open(path) as f:
            signum = f.read().strip()
        os.remove(path)
        host = p.hosts[index].name
        out.append(f"host {host} (simulated node {index}: {_hosts.ranks_text(where.get(host, []))}) failed: "
                   f"its MPI daemon was killed by signal {signum}, so the node's ranks went with it "
                   f"(a lost node), and the job ended")
    return out


def run(p, timeout=None, restarts=0, verbose=False):
    """Run the planned job (with restarts) and return its exit code."""
    deadline = time.monotonic() + timeout if timeout else None
    program = p.program
    tmpdir = tempfile.mkdtemp(prefix="mpidprun-")
    try:
        for attempt in range(restarts + 1):
            if attempt:
                step = latest_checkpoint_step(program)
                _say(f"job failed (exit code {code}); restart {attempt}/{restarts} from "
                     + ("the start" if step is None else f"step {step}"))
                program = with_resume(program)
            command = _command(p, program, os.path.join(tmpdir, "hostfile"))
            if p.sim:
                _agent_script(os.path.join(tmpdir, "simnode"))
            if command.hostfile:
                with open(command.hostfile[0], "w") as f:
                    f.write(command.hostfile[1])
            if verbose:
                _say(f"command: {_display(command)}")
            teeable = all(hasattr(stream, "buffer") for stream in (sys.stdout, sys.stderr))
            tails = [] if p.hosts and p.launcher != "srun" and teeable else None
            code, why = run_bounded(command.argv, env=dict(os.environ, **command.env),
                                    deadline=deadline, grace=GRACE_S, tails=tails)
            if p.sim:  # ranks a lost node's daemon orphaned are no longer below mpiexec: the node is gone
                for pid in _sim.job_processes(tmpdir):
                    try:
                        os.kill(pid, signal.SIGKILL)
                    except OSError:
                        pass
            text = tails[0].decode("utf-8", "replace") + tails[1].decode("utf-8", "replace") if tails else ""
            daemons = lost_daemons(p, tmpdir) if p.sim and why == "exit" else []
            if code == 0 and why == "exit" and (daemons or _PRTE_LOST.search(text)):
                code = 1  # prterun's status after it ended the job for a lost daemon: a failure, to restart
            for lost in daemons:
                _say(lost)
            if code != 0 and why == "exit" and text and not daemons:
                lost = failed_host(p, text)
                if lost:
                    _say(lost)
            if why == "timeout":
                _say(f"error: job timed out after {timeout:g} s; killed it and all its ranks")
                return 124
            if why == "signal":
                _say(f"stopped by signal {code - 128}; the job was killed, no restart")
                return code
            if code == 0:
                return 0
            if code == REFUSED and attempt < restarts:
                _say(f"job exited {REFUSED} (the status of a usage error: it refused its arguments); the same "
                     f"command would be refused again, no restart")
                return code
        return code
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)


def main(argv=None):
    """Entry point of ``mpidprun``; returns the exit status."""
    args = build_parser().parse_args(argv)
    try:
        p = plan(args)
    except LaunchError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2
    for note in p.notes:
        if args.verbose or note.startswith("warning:"):
            _say(note)
    if args.dry_run:
        with tempfile.TemporaryDirectory(prefix="mpidprun-") as tmpdir:
            command = _command(p, p.program, os.path.join(tmpdir, "hostfile"))
            print(_display(command), flush=True)
            if command.hostfile:
                _say(f"{command.hostfile[0]} would hold:\n{command.hostfile[1]}".rstrip())
        return 0
    try:
        return run(p, timeout=args.timeout, restarts=args.restarts, verbose=args.verbose)
    except LaunchError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2
