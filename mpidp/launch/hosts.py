"""Host lists: hostfiles, ``-H`` strings, ``$PBS_NODEFILE`` and Slurm node lists -> ``[Host]``.

Pure text handling; nothing here touches MPI. Every reader returns hosts in
first-appearance order with duplicates merged (their slots added), so
``-H localhost:2,localhost:2`` is one host with 4 slots.
"""
import os
import re
from typing import NamedTuple

import hostlist

from ..errors import HostfileError

__all__ = ["Host", "parse_host_list", "parse_hostfile", "read_hostfile", "read_pbs_nodefile",
           "expand_slurm_nodelist", "expand_slurm_tasks_per_node", "from_slurm", "from_environment",
           "merge", "total_slots", "format_host_list", "format_hostfile", "placement", "ranks_text"]

_NAME = r"[A-Za-z0-9_](?:[A-Za-z0-9_.\-]*[A-Za-z0-9_])?"
_BARE = re.compile(rf"^({_NAME})$")
_HYDRA = re.compile(rf"^({_NAME}):(\d+)$")
_OPENMPI = re.compile(rf"^({_NAME})((?:\s+[A-Za-z_\-]+\s*=\s*\S+)+)$")
_OPENMPI_KEYS = {"slots", "max_slots", "max-slots"}

_EXPECTED = "'host', 'host:slots' or 'host slots=N [max_slots=M]'"


class Host(NamedTuple):
    """One machine and how many ranks it may run."""
    name: str
    slots: int


def merge(hosts):
    """Merge repeated names (slots add up), keeping first-appearance order."""
    slots = {}
    for name, n in hosts:
        slots[name] = slots.get(name, 0) + n
    return [Host(name, n) for name, n in slots.items()]


def total_slots(hosts):
    """Sum of the slots of ``hosts``."""
    return sum(h.slots for h in hosts)


def _slots(text, where, line):
    n = int(text)
    if n < 1:
        raise HostfileError(f"{where}: {line!r} gives {n} slots; a host needs at least 1 slot")
    return n


def _parse_entry(entry, where, expected=_EXPECTED):
    """One host entry -> Host; ``where`` names the source in errors. The 'slots=' form is read
    only where ``expected`` offers it (hostfiles, not -H)."""
    m = _BARE.match(entry)
    if m:
        return Host(m.group(1), 1)
    m = _HYDRA.match(entry)
    if m:
        return Host(m.group(1), _slots(m.group(2), where, entry))
    m = _OPENMPI.match(entry) if "slots=" in expected else None
    if m:
        fields = {}
        for pair in re.findall(r"([A-Za-z_\-]+)\s*=\s*(\S+)", m.group(2)):
            key, value = pair
            if key not in _OPENMPI_KEYS:
                raise HostfileError(f"{where}: {entry!r} has the unknown key {key!r}; "
                                    f"expected {_EXPECTED}")
            if not value.isdigit():
                raise HostfileError(f"{where}: {entry!r} has {key}={value}; "
                                    f"expected a whole number of slots")
            fields[key.replace("-", "_")] = int(value)
        slots = fields.get("slots", fields.get("max_slots", 1))
        if slots < 1:
            raise HostfileError(f"{where}: {entry!r} gives {slots} slots; a host needs at least 1 slot")
        if "max_slots" in fields and fields["max_slots"] < slots:
            raise HostfileError(f"{where}: {entry!r} has max_slots={fields['max_slots']} below "
                                f"slots={slots}; max_slots must be at least slots")
        return Host(m.group(1), slots)
    raise HostfileError(f"{where}: {entry!r} is not a host entry; expected {expected}")


def parse_host_list(text):
    """``-H`` syntax: 'a:2,b:2' or 'a,b' (1 slot each) -> merged ``[Host]``."""
    entries = [e.strip() for e in text.split(",")]
    if not text.strip() or any(not e for e in entries):
        raise HostfileError(f"-H {text!r} has an empty entry; expected a comma-separated list "
                            f"like 'node1:2,node2:2'")
    return merge(_parse_entry(e, f"-H {text!r}", "'host' or 'host:slots'") for e in entries)


def parse_hostfile(text, name="<hostfile>"):
    """Hostfile text in MPICH/Hydra ('host:n'), Open MPI ('host slots=n') or bare one-line-per-slot
    syntax, with '#' comments and blank lines -> merged ``[Host]``."""
    hosts = []
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if line:
            hosts.append(_parse_entry(line, f"{name}:{number}"))
    if not hosts:
        raise HostfileError(f"{name}: no hosts in the file; expected lines like {_EXPECTED}")
    return merge(hosts)


def read_hostfile(path):
    """``parse_hostfile`` of the file at ``path``; a missing file is a ``HostfileError``."""
    try:
        with open(path) as f:
            text = f.read()
    except OSError as exc:
        raise HostfileError(f"cannot read hostfile {path}: {exc.strerror}") from None
    return parse_hostfile(text, path)


def read_pbs_nodefile(path):
    """``$PBS_NODEFILE``: one line per slot, a host repeated once per slot."""
    return read_hostfile(path)


def expand_slurm_nodelist(text):
    """'node[01-03,07],gpu-[1-2]' -> ['node01', 'node02', 'node03', 'node07', 'gpu-1', 'gpu-2'] (python-hostlist).

    Several bracket groups in one name ('rack[1-2]-n[1-2]') expand as a product.
    """
    try:
        names = hostlist.expand_hostlist(text.strip(), allow_duplicates=True)
    except hostlist.BadHostlist as exc:
        raise HostfileError(f"SLURM_JOB_NODELIST={text!r} is not a Slurm node list ({exc}); expected a list "
                            f"like 'node[01-03],gpu5'") from None
    if not names:
        raise HostfileError(f"SLURM_JOB_NODELIST={text!r} names no hosts; expected a list like 'node[01-03],gpu5'")
    for name in names:
        if not _BARE.match(name):
            raise HostfileError(f"SLURM_JOB_NODELIST={text!r}: {name!r} is not a host name")
    return names


def expand_slurm_tasks_per_node(text):
    """'2(x3),1' -> [2, 2, 2, 1] (python-hostlist)."""
    try:
        return hostlist.parse_slurm_tasks_per_node(text.strip())
    except hostlist.BadHostlist:
        raise HostfileError(f"SLURM_TASKS_PER_NODE={text!r} is not a list of 'N' or 'N(xK)'") from None


def from_slurm(env):
    """Hosts of the Slurm allocation described by ``env`` (SLURM_JOB_NODELIST, SLURM_TASKS_PER_NODE)."""
    nodelist = env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
    if not nodelist:
        raise HostfileError("SLURM_JOB_ID is set but SLURM_JOB_NODELIST is not; "
                            "run mpidprun inside the job's batch script or salloc shell")
    names = expand_slurm_nodelist(nodelist)
    per_node = env.get("SLURM_TASKS_PER_NODE")
    counts = expand_slurm_tasks_per_node(per_node) if per_node else [1] * len(names)
    if len(counts) != len(names):
        raise HostfileError(f"SLURM_JOB_NODELIST={nodelist!r} names {len(names)} nodes but "
                            f"SLURM_TASKS_PER_NODE={per_node!r} gives {len(counts)} counts")
    return merge(Host(n, c) for n, c in zip(names, counts))


def from_environment(env=None):
    """(source, hosts) of the batch system mpidprun runs under, or (None, None) outside one."""
    env = os.environ if env is None else env
    if env.get("SLURM_JOB_ID"):
        return "slurm", from_slurm(env)
    if env.get("PBS_NODEFILE"):
        return "pbs", read_pbs_nodefile(env["PBS_NODEFILE"])
    return None, None


def placement(hosts, np):
    """{host name: [ranks]} as mpiexec places ``np`` ranks by slot: each host's slots in turn, in
    host order, around again when ranks outnumber slots (Hydra's and Open MPI's default)."""
    out = {h.name: [] for h in hosts}
    rank = 0
    while rank < np and hosts:
        for h in hosts:
            take = min(h.slots, np - rank)
            out[h.name] += range(rank, rank + take)
            rank += take
    return out


def ranks_text(ranks):
    """'rank 2', 'ranks 2,3' or 'ranks 4-7'."""
    if len(ranks) == 1:
        return f"rank {ranks[0]}"
    if len(ranks) > 2 and list(ranks) == list(range(ranks[0], ranks[-1] + 1)):
        return f"ranks {ranks[0]}-{ranks[-1]}"
    return "ranks " + ",".join(map(str, ranks))


def format_host_list(hosts):
    """'a:2,b:2': the command-line form both MPICH (``-hosts``) and Open MPI (``--host``) read."""
    return ",".join(f"{h.name}:{h.slots}" for h in hosts)


def format_hostfile(hosts, syntax):
    """Hostfile text in ``syntax`` 'hydra' ('a:2') or 'openmpi' ('a slots=2')."""
    if syntax == "hydra":
        return "".join(f"{h.name}:{h.slots}\n" for h in hosts)
    if syntax == "openmpi":
        return "".join(f"{h.name} slots={h.slots}\n" for h in hosts)
    raise ValueError(f"unknown hostfile syntax {syntax!r}; expected 'hydra' or 'openmpi'")
