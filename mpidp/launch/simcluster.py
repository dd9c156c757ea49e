"""A simulated cluster on one machine: K "nodes" at 127.0.0.2, 127.0.0.3, ... joined by a shaped link.

``mpidprun --simulate-nodes 2x2 --link-rate 2gbit`` starts the job through MPICH's Hydra or Open
MPI's PRRTE as if each node were a remote host: the launcher "ssh"es to every 127.0.0.x address
through ``node`` below, which runs the node's proxy (Hydra) or daemon (PRRTE's ``prted``) here
with that node's own host name (a UTS namespace) and its own scratch folder (``TMPDIR``). Ranks on
one node share memory; between nodes MPICH is told to use its libfabric TCP provider and Open MPI
its TCP BTL over ``lo``, so that traffic really crosses the loopback device. The whole job runs
in its own network namespace (``unshare -n`` as root, ``unshare -rn`` otherwise where user
namespaces are allowed), where ``netns`` brings up ``lo`` and limits its rate with ``tc``
(token bucket): shared memory inside a node is untouched, so only inter-node traffic is shaped.
With ``--link-model per-node`` (``node_links``) each node instead runs in a network namespace of
its own, joined to the job's namespace by its own veth pair shaped at both ends: a full-duplex
link per node.
Only 127.0.0.0/8 addresses are used, inside the job's own namespace.

Nothing here initialises MPI. ``python -m mpidp.launch._simhelper netns|node|cut ...`` runs the
helpers below for the launch command; users start jobs with ``mpidprun``.
"""
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from typing import NamedTuple

from ..errors import LaunchError

__all__ = ["Layout", "parse_layout", "isolation", "shaping_available", "node_address", "node_name",
           "RATE_PATTERN", "MPICH_TCP_ENV", "OPENMPI_TCP_MCA", "OPENMPI_TCP_EXCLUDE", "OPENMPI_YIELD",
           "check_rate", "node_processes", "job_processes", "listening_ports", "cut_link", "LINK_MODELS",
           "HUB_ADDRESS", "NODE_LINK", "node_links", "main"]

FIRST_OCTET = 2          # node i is 127.0.0.(2 + i); 127.0.0.1 stays the launcher's own address
MAX_NODES = 250
RATE_PATTERN = r"\d+(\.\d+)?([kmgt]?bit|[kmgt]?bps)"
TBF_BURST = "512kb"      # token bucket depth: >= rate / HZ for every rate up to 40 Gbit/s
TBF_LATENCY = "50ms"
# MPICH's default UCX netmod moves data between these "nodes" through shared memory (UCX sees
# one host); its OFI netmod with libfabric's TCP provider sends it over the loopback device.
MPICH_TCP_ENV = {"MPIR_CVAR_CH4_NETMOD": "ofi", "FI_PROVIDER": "tcp"}
# Open MPI: ob1 with shared memory inside a node and TCP over lo between nodes (its UCX PML, like
# MPICH's, would use shared memory between these "nodes" too: one host to it)
OPENMPI_TCP_MCA = {"pml": "ob1", "btl": "self,sm,tcp", "btl_tcp_if_include": "lo"}
OPENMPI_TCP_EXCLUDE = "OMPI_MCA_btl_tcp_if_exclude"  # dropped from the job's env: Open MPI refuses it beside include
OPENMPI_YIELD = "OMPI_MCA_mpi_yield_when_idle"  # set when the nodes' ranks outnumber the cores
# PRRTE's daemons never use a loopback interface for their own (out-of-band) TCP channel, and
# would find none: a veth pair in the job's namespace carries one more 127.0.0.0/8 address for it.
# It is not a node's address (PRRTE would take that node for its own host), and traffic to it is
# local, so it crosses lo too.
DAEMON_LINK = ("simoob0", "simoob1")
SSH_VALUE_OPTIONS = "BbcDEeFIiJLlmOoPpQRSWw"  # ssh's options that take a value (PRRTE passes plm_ssh_args)
DAEMON_ADDRESS = "127.0.0.254"
# --link-model per-node: every node in a network namespace of its own, joined to the job's
# namespace (the hub, a switch) by its own veth pair shaped at both ends, so each node has a
# full-duplex link of the given rate; mpiexec stays in the hub at HUB_ADDRESS
LINK_MODELS = ("shared", "per-node")
HUB_ADDRESS = "127.0.0.254"
NODE_LINK = "simlink"              # a node's end of its link: the same name in every node's namespace
ENV_LINKS = "MPIDP_SIM_LINKS"      # per-node model: the folder where node i's namespace is bound at node<i>
ENV_NODE = "MPIDP_SIM_NODE"        # set on every process of a simulated node: its index
ENV_JOB = "MPIDP_SIM_JOB"          # set on every process of the job: the job's scratch folder


class Layout(NamedTuple):
    """Ranks per simulated node, e.g. (2, 2) or (2, 1)."""
    ranks: tuple

    @property
    def np(self):
        return sum(self.ranks)

    def hosts(self):
        """[(address, slots)] in node order: what Hydra's ``-hosts`` gets."""
        return [(node_address(i), n) for i, n in enumerate(self.ranks)]

    def ranks_of(self, node):
        """The global ranks that node ``node`` runs (Hydra fills hosts in order)."""
        start = sum(self.ranks[:node])
        return list(range(start, start + self.ranks[node]))

    def __str__(self):
        if len(set(self.ranks)) == 1:
            return f"{len(self.ranks)}x{self.ranks[0]}"
        return "+".join(map(str, self.ranks))


def node_address(i):
    """The 127.0.0.x address of simulated node ``i``."""
    return f"127.0.0.{FIRST_OCTET + i}"


def node_name(i):
    """The host name simulated node ``i`` runs under."""
    return f"simnode{i}"


def parse_layout(text, np=None):
    """'2x2' (2 nodes of 2), '2+1' or '2,1' (uneven), or 'K' (K nodes sharing ``np`` ranks evenly)."""
    text = str(text).strip()
    expected = "give 'KxN' (K nodes of N ranks), 'A+B+...' or 'A,B,...' (ranks per node), or K with -np"
    if re.fullmatch(r"\d+x\d+", text):
        k, n = map(int, text.split("x"))
        ranks = (n,) * k
    elif re.fullmatch(r"\d+([+,]\d+)+", text):
        ranks = tuple(int(part) for part in re.split(r"[+,]", text))
    elif re.fullmatch(r"\d+", text):
        k = int(text)
        if np is None:
            raise LaunchError(f"--simulate-nodes {text}: the number of ranks is not known; give -np N "
                              f"too, or the ranks per node, e.g. {text}x2")
        if k < 1 or np % k:
            raise LaunchError(f"--simulate-nodes {text} with -np {np}: {np} ranks do not split evenly "
                              f"over {k} nodes; give the ranks per node, e.g. "
                              f"{'+'.join(str(np // k + (i < np % k)) for i in range(max(k, 1)))}")
        ranks = (np // k,) * k
    else:
        raise LaunchError(f"--simulate-nodes {text!r} is not a node layout; {expected}")
    if not ranks or min(ranks) < 1:
        raise LaunchError(f"--simulate-nodes {text!r}: every node needs at least 1 rank")
    if len(ranks) > MAX_NODES:
        raise LaunchError(f"--simulate-nodes {text!r}: {len(ranks)} nodes, at most {MAX_NODES}")
    if np is not None and np != sum(ranks):
        raise LaunchError(f"--simulate-nodes {text} runs {sum(ranks)} ranks but -np {np} was given; "
                          f"drop -np or make them agree")
    return Layout(ranks)


def check_rate(rate):
    """``rate`` if tc reads it (2gbit, 100mbit, 1.5gbit, 125mbps); ``LaunchError`` otherwise."""
    if not re.fullmatch(RATE_PATTERN, rate.strip().lower()):
        raise LaunchError(f"--link-rate {rate!r} is not a rate; give e.g. 2gbit, 100mbit or 125mbps")
    return rate.strip().lower()


def _tool(name):
    """Path of ``name`` on PATH or in the sbin folders (not on a normal user's PATH)."""
    return shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin:/usr/bin:/bin")


def isolation():
    """(unshare argv prefix, why) for a private network + UTS namespace; (None, why not) when
    neither root nor a user namespace can have one."""
    missing = [name for name in ("unshare", "ip") if _tool(name) is None]
    if missing:
        return None, f"{' and '.join(missing)} not found (Debian/Ubuntu: apt-get install util-linux iproute2)"
    unshare = _tool("unshare")
    # root without CAP_SYS_ADMIN (a default Docker container) cannot unshare as itself, but often
    # can through a user namespace: each is tried, never assumed
    tries = [([unshare, "--net", "--uts", "--"], "root: own network namespace")] if os.geteuid() == 0 else []
    tries.append(([unshare, "--map-root-user", "--net", "--uts", "--"], "user namespace: own network namespace"))
    failed = []
    for prefix, what in tries:
        try:
            out = subprocess.run(prefix + ["true"], capture_output=True, text=True, timeout=10,
                                 stdin=subprocess.DEVNULL)
        except (OSError, subprocess.TimeoutExpired) as exc:
            failed.append(f"'{' '.join(prefix[:-1])}' failed ({exc})")
            continue
        if out.returncode == 0:
            return prefix, what
        failed.append(f"'{' '.join(prefix[:-1])}': {(out.stderr.strip().splitlines() or ['no output'])[-1]}")
    who = "root without the right to unshare" if os.geteuid() == 0 else "not root"
    return None, f"{who} and user namespaces are not allowed here ({'; '.join(failed)})"


def shaping_available():
    """(True, '') when a job here can get its own namespace and a tc-shaped link; else (False, why)."""
    prefix, why = isolation()
    if prefix is None:
        return False, why
    if _tool("tc") is None:
        return False, "tc not found (Debian/Ubuntu: apt-get install iproute2)"
    return True, ""


def _say(message):
    print(f"mpidprun: {message}", file=sys.stderr, flush=True)


def _end_with_parent(signum=signal.SIGTERM):
    """``signum`` to this process (and what it execs) should its parent die without stopping it: for
    mpiexec, mpidprun SIGKILLed by a test's timeout (Hydra then ends the job instead of leaving it
    running); for a node's daemon, its "ssh" killed (a real sshd hangs up the session)."""
    try:
        import ctypes
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, int(signum))  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _daemon_link(ip):
    """The veth pair carrying DAEMON_ADDRESS (no IPv6 link-local address: 127.0.0.0/8 only)."""
    a, b = DAEMON_LINK
    steps = [["link", "add", a, "type", "veth", "peer", "name", b],
             ["link", "set", a, "addrgenmode", "none"], ["link", "set", b, "addrgenmode", "none"],
             ["addr", "add", f"{DAEMON_ADDRESS}/32", "dev", a],
             ["link", "set", a, "up"], ["link", "set", b, "up"]]
    for step in steps:
        out = subprocess.run([ip] + step, capture_output=True, text=True)
        if out.returncode != 0:
            return f"'ip {' '.join(step)}' failed: {out.stderr.strip()}"
    return ""


def _mac(ip, dev, netns=None):
    out = subprocess.run(_in(netns) + [ip, "-o", "link", "show", "dev", dev], capture_output=True, text=True)
    m = re.search(r"link/ether ([0-9a-f:]+)", out.stdout)
    return m.group(1) if m else None


def _in(netns):
    return [_tool("nsenter"), f"--net={netns}"] if netns else []


def node_links(nodes, rate, folder):
    """In the job's namespace (the hub), as root there and with a mount namespace of the job's own:
    a network namespace per node bound at ``folder``/node<i>, each joined to the hub by its own veth
    pair (``NODE_LINK`` in the node at 127.0.0.(2 + i), simhub<i> in the hub), each end's egress
    limited to ``rate`` by tc tbf: a full-duplex link per node. 127.0.0.0/8 is routed between the
    namespaces (route_localnet), the hub forwards between the links and has HUB_ADDRESS; inside a
    node, lo keeps only 127.0.0.1. Returns '' or why it failed."""
    ip, tc, sysctl = _tool("ip"), _tool("tc"), _tool("sysctl")
    if not (ip and tc and sysctl and _tool("nsenter")):
        return "ip, tc, sysctl and nsenter are needed (Debian/Ubuntu: apt-get install iproute2 procps util-linux)"
    localnet = ["net.ipv4.conf.all.route_localnet=1", "net.ipv4.conf.default.route_localnet=1"]
    shape = ["root", "tbf", "rate", rate, "burst", TBF_BURST, "latency", TBF_LATENCY] if rate else None
    # 127.0.0.1/8 on lo would make all of 127/8 local: keep only the namespace's own addresses there
    steps = [[ip, "link", "set", "lo", "up"], [ip, "addr", "del", "127.0.0.1/8", "dev", "lo"],
             [ip, "addr", "add", "127.0.0.1/32", "dev", "lo"], [ip, "addr", "add", f"{HUB_ADDRESS}/32", "dev", "lo"],
             [sysctl, "-qw", "net.ipv4.ip_forward=1"] + localnet]
    for step in steps:
        why = _step(step)
        if why:
            return why
    os.makedirs(folder, exist_ok=True)
    for i in range(nodes):
        ns, hub, address = os.path.join(folder, f"node{i}"), f"simhub{i}", node_address(i)
        open(ns, "w").close()
        steps = [[_tool("unshare"), f"--net={ns}", "true"],
                 [ip, "link", "add", hub, "type", "veth", "peer", "name", NODE_LINK, "netns", ns],
                 [ip, "link", "set", hub, "addrgenmode", "none"], [ip, "link", "set", hub, "up"],
                 [ip, "route", "add", f"{address}/32", "dev", hub, "src", HUB_ADDRESS]]
        inside = [[ip, "link", "set", "lo", "up"], [ip, "addr", "del", "127.0.0.1/8", "dev", "lo"],
                  [ip, "addr", "add", "127.0.0.1/32", "dev", "lo"], [sysctl, "-qw"] + localnet,
                  [ip, "link", "set", NODE_LINK, "addrgenmode", "none"],
                  [ip, "addr", "add", f"{address}/32", "dev", NODE_LINK], [ip, "link", "set", NODE_LINK, "up"],
                  [ip, "route", "add", "127.0.0.0/8", "via", HUB_ADDRESS, "dev", NODE_LINK, "onlink", "src", address]]
        steps += [_in(ns) + step for step in inside]
        for step in steps:
            why = _step(step)
            if why:
                return why
        # no ARP for 127.0.0.0/8 between namespaces: each end knows the other's MAC address
        macs = _mac(ip, hub), _mac(ip, NODE_LINK, ns)
        if None in macs:
            return f"no MAC address of {hub} or of node {i}'s {NODE_LINK}"
        steps = [_in(ns) + [ip, "neigh", "replace", HUB_ADDRESS, "lladdr", macs[0], "dev", NODE_LINK,
                            "nud", "permanent"],
                 [ip, "neigh", "replace", address, "lladdr", macs[1], "dev", hub, "nud", "permanent"]]
        if shape:
            steps += [[tc, "qdisc", "replace", "dev", hub] + shape, _in(ns) + [tc, "qdisc", "replace", "dev", NODE_LINK] + shape]
        for step in steps:
            why = _step(step)
            if why:
                return why
    return ""


def _step(argv):
    out = subprocess.run(argv, capture_output=True, text=True)
    if out.returncode != 0:
        return f"'{' '.join(os.path.basename(a) if i == 0 else a for i, a in enumerate(argv))}' failed: {out.stderr.strip()}"
    return ""


def _netns(argv):
    """Inside the job's new namespace: ``lo`` up, its rate limited, with ``--daemon-link`` the
    daemons' link (Open MPI), with ``--per-node K`` K nodes with a link each (``node_links``),
    then exec the launch command."""
    rate, daemon_link, per_node = None, False, 0
    while argv[:1] in (["--rate"], ["--daemon-link"], ["--per-node"]):
        if argv[0] == "--rate":
            rate, argv = argv[1], argv[2:]
        elif argv[0] == "--per-node":
            per_node, argv = int(argv[1]), argv[2:]
        else:
            daemon_link, argv = True, argv[1:]
    if argv[:1] == ["--"]:
        argv = argv[1:]
    _end_with_parent()
    if per_node:
        why = node_links(per_node, rate, os.environ[ENV_LINKS])
        if why:
            _say(f"error: cannot give the {per_node} simulated nodes their own links: {why}")
            return 1
        os.execvp(argv[0], argv)
    ip, tc = _tool("ip"), _tool("tc")
    out = subprocess.run([ip, "link", "set", "lo", "up"], capture_output=True, text=True)
    if out.returncode != 0:
        _say(f"error: cannot bring up lo in the job's network namespace: {out.stderr.strip()}")
        return 1
    why = _daemon_link(ip) if daemon_link else ""
    if why:
        _say(f"error: cannot give Open MPI's daemons their link in the job's network namespace: {why}")
        return 1
    if rate:
        shape = [tc, "qdisc", "replace", "dev", "lo", "root", "tbf", "rate", rate,
                 "burst", TBF_BURST, "latency", TBF_LATENCY] if tc else None
        out = subprocess.run(shape, capture_output=True, text=True) if shape else None
        if out is None or out.returncode != 0:
            why = "tc not found" if out is None else (out.stderr.strip().splitlines() or ["failed"])[-1]
            _say(f"--link-rate {rate} not applied ({why}); the simulated nodes' link is unshaped")
    os.execvp(argv[0], argv)


def _node(argv):
    """Hydra's or PRRTE's "ssh": skip ssh's options, take the host, run the remote command as
    that node."""
    while argv and argv[0].startswith("-") and argv[0] != "--":
        flags, argv = argv[0][1:], argv[1:]
        for i, flag in enumerate(flags):  # '-xT', '-p 22', '-p22', '-o Key=value'
            if flag in SSH_VALUE_OPTIONS:
                argv = argv[1:] if i == len(flags) - 1 else argv
                break
    argv = argv[1:] if argv[:1] == ["--"] else argv
    if len(argv) < 2:
        _say(f"error: simulated ssh got no host and command: {argv}")
        return 255
    host, command = argv[0], " ".join(argv[1:])  # ssh joins the rest into one shell command
    m = re.fullmatch(r"127\.0\.0\.(\d+)", host)
    if not m or not FIRST_OCTET <= int(m.group(1)) < FIRST_OCTET + MAX_NODES:
        _say(f"error: {host} is not a simulated node address (127.0.0.2 and up)")
        return 255
    index = int(m.group(1)) - FIRST_OCTET
    env = dict(os.environ)
    env[ENV_NODE] = str(index)
    job = env.get(ENV_JOB)
    if job:  # node-local scratch, as a cluster node's own /tmp
        env["TMPDIR"] = os.path.join(job, node_name(index))
        os.makedirs(env["TMPDIR"], exist_ok=True)
    if os.environ.get("MPIDP_SIM_NETNS") == "1":
        # in the job's UTS namespace: each node gets one of its own, with its own host name
        script = 'hostname "$0" && exec sh -c "$1"'
        links = os.environ.get(ENV_LINKS)  # per-node links: and the node's own network namespace
        enter = _in(os.path.join(links, f"node{index}")) if links else []
        return _as_ssh(enter + [_tool("unshare"), "--uts", "--", "sh", "-c", script, node_name(index), command],
                       env, job, index)
    return _as_ssh(["sh", "-c", command], env, job, index)


LOST = "lost-node-"  # a file in the job's folder per node whose daemon died by a signal: what killed it


def _as_ssh(argv, env, job, index):
    """Run a node's command (its MPI daemon) as ssh would: stay its parent, pass signals on (it dies
    with this process), and return its exit status, or 255 as ssh does when the connection drops.

    A daemon that dies by a signal nobody sent through here (itself, or below the shell that runs it)
    and leaves its ranks running is a lost node: its ranks go too, as they would with the node
    (orphans would keep its pipes open, and Hydra would wait for them until the job's timeout), and a
    file in the job's folder tells mpidprun, which ends with an error even where mpiexec exits 0
    (prterun does, after ending the job for a lost daemon)."""
    child = subprocess.Popen(argv, env=env, preexec_fn=lambda: _end_with_parent(signal.SIGKILL))
    forwarded = []

    def forward(signum, frame):
        forwarded.append(signum)
        child.send_signal(signum)
    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(signum, forward)
    code = child.wait()
    status = code if code >= 0 else 128 - code  # (a shell between reports its child's death by signal N so)
    if forwarded or not job or not 128 < status < 160:
        return status
    deadline = time.monotonic() + 1.0  # a daemon that ends a job itself kills its ranks first
    while (left := node_processes(job, index, ranks_only=True)) and time.monotonic() < deadline:
        time.sleep(0.05)
    if not left:
        return status
    with open(os.path.join(job, f"{LOST}{index}"), "w") as f:
        f.write(str(status - 128))
    for pid in node_processes(job, index):
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass
    return 255


def node_processes(job, node, ranks_only=False):
    """Pids of the processes of simulated node ``node`` in the job whose scratch folder is ``job``
    (only its MPI ranks with ``ranks_only``: not the node's proxy)."""
    want = {f"{ENV_JOB}={job}".encode(), f"{ENV_NODE}={node}".encode()}
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/environ", "rb") as f:
                env = set(f.read().split(b"\0"))
        except OSError:
            continue
        is_rank = any(e.startswith((b"PMI_RANK=", b"OMPI_COMM_WORLD_RANK=")) for e in env)
        if want <= env and (is_rank or not ranks_only):
            pids.append(int(entry))
    return sorted(pids)


def job_processes(job):
    """Pids of every process of the job whose scratch folder is ``job`` (those a lost node's daemon
    orphaned too: they are no longer below mpiexec)."""
    want = f"{ENV_JOB}={job}".encode()
    pids = []
    for entry in os.listdir("/proc"):
        try:
            with open(f"/proc/{entry}/environ", "rb") as f:
                if entry.isdigit() and want in f.read().split(b"\0"):
                    pids.append(int(entry))
        except OSError:
            continue
    return pids


def _socket_inodes(pids):
    inodes = set()
    for pid in pids:
        try:
            for fd in os.listdir(f"/proc/{pid}/fd"):
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
                if target.startswith("socket:["):
                    inodes.add(target[8:-1])
        except OSError:
            continue
    return inodes


def listening_ports(pids, exclude=()):
    """The TCP ports the processes ``pids`` listen on (from /proc: their sockets' inodes), without
    sockets that the processes ``exclude`` hold too (Hydra's control port, inherited by all)."""
    inodes = _socket_inodes(pids) - _socket_inodes(exclude)
    ports = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as f:
                rows = f.read().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            fields = row.split()
            if fields[9] in inodes and fields[3] == "0A":  # LISTEN
                ports.add(int(fields[1].rsplit(":", 1)[1], 16))
    return sorted(ports)


def cut_link(job, node_a, node_b, ip=None):
    """Drop every packet between the ranks of nodes ``node_a`` and ``node_b``, as a failed link
    would: packets vanish, nothing reports an error. Every connection between two ranks has one
    end at a rank's listening port, so a ``blackhole`` policy-routing rule for each listening port
    of the two nodes' ranks (as source and as destination), ahead of the local table, cuts them
    all, open or new; a third node loses its connections to these two as well. Runs only inside a
    simulated job's own network namespace (from one of its ranks). Returns the ports cut."""
    if os.environ.get("MPIDP_SIM_NETNS") != "1":
        raise LaunchError("cut_link changes routing rules: it runs only inside a simulated job's own "
                          "network namespace (mpidprun --simulate-nodes as root or with user namespaces)")
    if os.environ.get(ENV_LINKS):
        raise LaunchError("cut_link blackholes ports in the caller's namespace, which with --link-model per-node "
                          "is one node's own: it was not built for per-node links; use the shared link model")
    ip = ip or _tool("ip")
    rules = subprocess.run([ip, "rule", "show"], capture_output=True, text=True, check=True).stdout
    if re.search(r"^0:\s+from all lookup local", rules, re.M):
        # rules are read in order of preference and the local table (preference 0) would deliver
        # first: move it behind the rules below (this namespace is the job's alone)
        subprocess.run([ip, "rule", "add", "pref", "1000", "lookup", "local"], check=True, capture_output=True)
        subprocess.run([ip, "rule", "del", "pref", "0"], check=True, capture_output=True)
    ranks = node_processes(job, node_a, True) + node_processes(job, node_b, True)
    others = set(node_processes(job, node_a) + node_processes(job, node_b)) - set(ranks)
    ports = listening_ports(ranks, exclude=others)
    for port in ports:
        for end in ("sport", "dport"):
            subprocess.run([ip, "rule", "add", "pref", "100", "ipproto", "tcp", end, str(port), "blackhole"],
                           check=True, capture_output=True)
    return ports


def main(argv=None):
    """``python -m mpidp.launch._simhelper netns [--rate R] [--daemon-link] [--per-node K] -- CMD...`` |
    ``node SSH-ARGS...``."""
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["netns"]:
        return _netns(argv[1:])
    if argv[:1] == ["node"]:
        return _node(argv[1:])
    if argv[:1] == ["cut"] and len(argv) == 4:
        print(" ".join(map(str, cut_link(argv[1], int(argv[2]), int(argv[3])))))
        return 0
    print("usage: python -m mpidp.launch._simhelper netns [--rate R] [--daemon-link] [--per-node K] -- CMD... | "
          "node SSH-ARGS... | "
          "cut JOB NODE_A NODE_B", file=sys.stderr)
    return 2
