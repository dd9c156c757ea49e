"""Host lists: hostfiles, ``-H`` strings, ``$PBS_NODEFILE`` and Slurm node lists -> ``[Host]``.

Pure text handling; nothing here touches MPI. Every reader returns hosts in
first-appearance order with duplicates merged (their slots added), so
``-H localhost:2,localhost:2`` is one host with 4 slots.
"""
import os
import re
from typing import NamedTuple

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


def _split_top(text, sep=","):
    """Split on ``sep`` outside brackets."""
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        if ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
        elif ch == sep and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    parts.append(text[start:])
    return parts


def _expand_range(body, where):
    out = []
    for part in body.split(","):
        m = re.fullmatch(r"(\d+)(?:-(\d+))?", part.strip())
        if not m:
            raise HostfileError(f"{where}: range {part!r} in [{body}] is not 'N' or 'N-M'")
        lo, hi = m.group(1), m.group(2) or m.group(1)
        if int(hi) < int(lo):
            raise HostfileError(f"{where}: range {part!r} in [{body}] runs backwards")
        width = len(lo)  # node[01-10] keeps the zero padding of the lower bound
        out.extend(str(i).zfill(width) for i in range(int(lo), int(hi) + 1))
    return out


def expand_slurm_nodelist(text):
    """'node[01-03,07],gpu5' -> ['node01', 'node02', 'node03', 'node07', 'gpu5'].

    Several bracket groups in one name ('rack[1-2]-n[1-2]') expand as a product.
    """
    where = f"SLURM_JOB_NODELIST={text!r}"
    if text.count("[") != text.count("]"):
        raise HostfileError(f"{where} has unbalanced brackets; expected a list like 'node[01-03],gpu5'")
    names = []
    for item in _split_top(text.strip()):
        item = item.strip()
        if not item:
            raise HostfileError(f"{where} has an empty entry; expected a list like 'node[01-03],gpu5'")
        expanded = [""]
        for text_part, body in re.findall(r"([^\[\]]*)(?:\[([^\[\]]*)\])?", item):
            choices = _expand_range(body, where) if body else [""]
            expanded = [e + text_part + c for e in expanded for c in choices]
        for name in expanded:
            if not _BARE.match(name):
                raise HostfileError(f"{where}: {name!r} is not a host name")
        names.extend(expanded)
    return names


def expand_slurm_tasks_per_node(text):
    """'2(x3),1' -> [2, 2, 2, 1]."""
    counts = []
    for part in text.split(","):
        m = re.fullmatch(r"\s*(\d+)(?:\(x(\d+)\))?\s*", part)
        if not m:
            raise HostfileError(f"SLURM_TASKS_PER_NODE={text!r}: {part!r} is not 'N' or 'N(xK)'")
        counts.extend([int(m.group(1))] * int(m.group(2) or 1))
    return counts


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
