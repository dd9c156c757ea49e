"""Topology-aware (hierarchical) allreduce for jobs on more than one node.

A flat ring sends every byte across the slow inter-node link as often as across shared
memory. Here each node first reduce-scatters the message over shared memory, so local
rank j holds its node's sum of a share; the ranks holding the same share on every node
(a *channel*) allreduce it across the nodes, all channels at once, so every rank of a
node drives its own link traffic; then each node allgathers the shares over shared
memory. The message goes in chunks, pipelined: while chunk k crosses the network
(a nonblocking Iallreduce per channel), the node reduce-scatters chunk k + 1 and
allgathers chunk k - 1, and MPI's progress inside those blocking calls keeps chunk k
moving.

Uneven layouts (2 + 1 ranks) work: the message splits into as many channel shares as
the largest node has ranks, and a rank on a smaller node owns a contiguous run of
channels (channel c belongs to local rank ``c * local_size // channels``), so it takes
part in several channel communicators. Each element is reduced in one fixed order: by
one rank of its node (reduce-scatter), then among its channel's members, whose MPI
allreduce gives each member the same bits, then copied; so every rank ends with the same
bits.
"""
import json
import math
import os

import numpy
from mpi4py import MPI

from .. import _env
from ..backend.pinned import pool
from ..backend.xp import asnumpy
from ._buffers import reduce_scatter_pieces, scale
from .ops import mpi_type


class Topology:
    """Which ranks share a node, and the channel communicators across the nodes (collective over ``comm``).

    ``local`` holds the ranks of this rank's node (any split works: tests fake nodes
    by splitting one host's ranks). Channel communicators are created here, once.
    """

    def __init__(self, comm, local):
        self.comm, self.local = comm, local
        first = local.allreduce(comm.Get_rank(), op=MPI.MIN)  # a node is named by its lowest rank
        ranks, me = local.Get_size(), local.Get_rank()
        places = comm.allgather((first, me))
        nodes = sorted(set(f for f, _ in places))
        self.node_sizes = tuple(sum(f == n for f, _ in places) for n in nodes)
        self.node, self.nodes = nodes.index(first), len(nodes)
        self.rank_of = [[None] * k for k in self.node_sizes]  # [node][local rank] -> rank in comm
        for r, (f, j) in enumerate(places):
            self.rank_of[nodes.index(f)][j] = r
        self.channels = max(self.node_sizes)
        # channel c belongs to local rank c * ranks // channels: a contiguous run per rank, one each when even
        self.owner = [c * ranks // self.channels for c in range(self.channels)]
        self.owned = [c for c in range(self.channels) if self.owner[c] == me]
        self.channel_comms = []
        self.from_bytes = None
        if self.nodes == 1:
            return
        if self.channels > 1:  # one rank per node: the flat ring already is the best this can do
            self.from_bytes = _decide_from(comm, self.key(), DEFAULT_FROM if self.even else DEFAULT_FROM_UNEVEN)
        if len(set(self.node_sizes)) == 1:
            self.channel_comms = [comm.Split(me, self.node)]
        else:
            for c in range(self.channels):
                cc = comm.Split(0 if c in self.owned else MPI.UNDEFINED, self.node)
                if cc != MPI.COMM_NULL:
                    self.channel_comms.append(cc)

    @property
    def even(self):
        return len(set(self.node_sizes)) == 1

    def describe(self):
        """The layout as 'nodes x ranks' or '2+1', for path labels and benchmark output."""
        sizes = self.node_sizes
        return f"{len(sizes)}x{sizes[0]}" if self.even else "+".join(map(str, sizes))

    def key(self):
        """What a measured crossover depends on: the layout and the MPI (the tune cache's key)."""
        vendor, version = MPI.get_vendor()
        return f"hierarchical|layout={self.describe()}|mpi={vendor} {'.'.join(map(str, version))}"

    def uses(self, buf):
        """Whether an allreduce of ``buf`` (an MPI-ready buffer) takes the hierarchical path."""
        return (self.from_bytes is not None and isinstance(buf, numpy.ndarray) and buf.nbytes >= self.from_bytes
                and buf.nbytes >= self.channels * buf.itemsize)

    def gathers(self):
        """The crossover (bytes gathered in all) of the hierarchical allgather, or None where it has none:
        it needs an even layout (every node with the same ranks) of several nodes with several ranks."""
        return self.from_bytes if self.even and self.nodes > 1 and self.channels > 1 else None

    def set_from(self, nbytes):
        """Take the hierarchical path from ``nbytes`` on (every rank alike; None: never); returns the old value.

        Only where it can pay: more than one node, and a node with several ranks.
        """
        if self.nodes == 1 or self.channels == 1:
            raise ValueError(f"layout {self.describe()} has no hierarchical path: it needs more than one node "
                             f"and a node with several ranks")
        old, self.from_bytes = self.from_bytes, None if nbytes is None else int(nbytes)
        return old

    def free(self):
        for cc in self.channel_comms:
            cc.Free()
        self.channel_comms = []


# Without a measured crossover the hierarchical path starts here: on the simulated 2 x 2 cluster
# (TCP, 2 Gbit/s, busy 2-core host) it beat MPI's own allreduce at 16 and 64 MiB in every run
# and lost at 4 MiB in two of three. On 2 + 1 the lone rank of the small node carries every
# channel: it won at 64 MiB in every run, at 16 MiB in one of three (docs/bench_hierarchical.md;
# mpidp.tune.hierarchical measures a job's own crossover).
DEFAULT_FROM = 8 << 20
DEFAULT_FROM_UNEVEN = 32 << 20


def _decide_from(comm, key, default=DEFAULT_FROM):
    """The smallest message (bytes) for the hierarchical path, or None for never; rank 0 decides for all."""
    setting = _env.get("MPIDP_HIERARCHICAL").strip().lower()
    if setting == "off":
        return None
    if setting == "on":
        return 0
    if setting.isdigit():
        return int(setting)
    if setting != "auto":
        raise ValueError(f"MPIDP_HIERARCHICAL={setting!r} is not auto, on, off or a size in bytes")
    measured = _cached(key) if comm.Get_rank() == 0 else None
    measured = comm.bcast(measured, root=0)
    return default if measured is None else measured.get("from_bytes")


def _cached(key):
    """The tune cache's entry for ``key`` (written by mpidp.tune.hierarchical), or None."""
    try:
        with open(os.path.expanduser(_env.get("MPIDP_AUTOTUNE_CACHE"))) as f:
            entry = json.load(f).get("entries", {}).get(key)
    except (OSError, ValueError, AttributeError):
        return None
    return entry if isinstance(entry, dict) and "from_bytes" in entry else None


# Bytes of one channel's share of a pipelined chunk. On the simulated 2 x 2 cluster (2 Gbit/s,
# busy 2-core host; one job, 6 reps each) 512 KiB-1 MiB shares took 0.66-0.91x the time of
# 2 MiB shares at 4, 16 and 64 MiB: chunks small enough to keep the link busy from the start,
# big enough that each chunk's three steps cost little.
SHARE_BYTES = 1 << 20


def chunk_elements(topo, itemsize):
    """Elements per pipelined chunk: one share per channel."""
    return topo.channels * max(1, SHARE_BYTES // itemsize)


def allreduce(topo, send, recv, mpi_op, ufunc=None, factor=1.0):
    """Allreduce 1-D ``recv`` (from ``send``, or in place when send is None) over ``topo.comm``,
    times ``factor``; returns True (the factor is applied)."""
    n, itemsize = recv.size, recv.itemsize
    datatype = mpi_type(recv.dtype)
    chunk = chunk_elements(topo, itemsize)
    local, me = topo.local, topo.local.Get_rank()
    share = math.ceil(min(chunk, n) / topo.channels) * len(topo.owned)  # most elements this rank holds per chunk
    raw = pool.acquire(2 * max(1, share) * itemsize)
    scratch = [raw[i * share * itemsize:(i + 1) * share * itemsize].view(recv.dtype) for i in (0, 1)]
    pending = None
    try:
        for k, lo in enumerate(range(0, n, chunk)):
            hi = min(n, lo + chunk)
            bounds = [(hi - lo) * c // topo.channels for c in range(topo.channels + 1)]
            ends = [bounds[c + 1] for c in range(topo.channels) if c + 1 == topo.channels
                    or topo.owner[c + 1] != topo.owner[c]]  # where each local rank's run of shares ends
            displs = [0] + ends[:-1]
            counts = [e - d for d, e in zip(displs, ends)]
            mine = scratch[k % 2][:counts[me]]
            source = recv[lo:hi] if send is None else send[lo:hi]
            reduce_scatter_pieces(local, source, mine, counts, mpi_op, ufunc)
            requests = [cc.Iallreduce(MPI.IN_PLACE, [mine[bounds[c] - displs[me]:bounds[c + 1] - displs[me]], datatype],
                                      op=mpi_op)
                        for c, cc in zip(topo.owned, topo.channel_comms)]
            if pending is not None:
                _gather(local, *pending, datatype, factor)
            pending = (requests, mine, recv[lo:hi], counts, displs)
        if pending is not None:
            _gather(local, *pending, datatype, factor)
    finally:
        pool.release(raw)
    return True


def _gather(local, requests, mine, out, counts, displs, datatype, factor):
    """Wait for a chunk's channel allreduces, scale this rank's shares, allgather the chunk in the node."""
    MPI.Request.Waitall(requests)
    scale(mine, factor)
    local.Allgatherv([mine, datatype], [out, counts, displs, datatype])


def reduce_scatter(topo, send, recv, counts, mpi_op, ufunc=None):
    """Reduce-scatter 1-D ``send`` (rank r's part: ``counts[r]`` elements, in rank order) into ``recv``
    on an even layout: inside the node each local rank gets its node's sum of the parts of the
    ranks with its local rank on every node (packed so that they are contiguous), then its channel
    reduce-scatters those across the nodes. Across the link go 1/local_size of what a flat ring
    sends. Returns False: the caller applies any factor."""
    nodes, me = topo.nodes, topo.local.Get_rank()
    starts = numpy.concatenate(([0], numpy.cumsum(counts)))
    order = [topo.rank_of[i][j] for j in range(topo.channels) for i in range(nodes)]  # by channel, then node
    mine_counts = [int(sum(counts[topo.rank_of[i][j]] for i in range(nodes))) for j in range(topo.channels)]
    itemsize = send.itemsize
    raw = pool.acquire(max(1, send.size * itemsize))
    raw_mine = pool.acquire(max(1, mine_counts[me] * itemsize))  # its own: an empty view must not alias packed
    packed = raw[:send.size * itemsize].view(send.dtype)
    mine = raw_mine[:mine_counts[me] * itemsize].view(send.dtype)
    try:
        at = 0
        for r in order:
            packed[at:at + counts[r]] = send[starts[r]:starts[r] + counts[r]]
            at += counts[r]
        reduce_scatter_pieces(topo.local, packed, mine, mine_counts, mpi_op, ufunc)
        reduce_scatter_pieces(topo.channel_comms[0], mine, recv, [int(counts[topo.rank_of[i][me]]) for i in range(nodes)],
                              mpi_op, ufunc)
    finally:
        pool.release(raw)
        pool.release(raw_mine)
    return False


def allgatherv(comm, topo, start, send, out, counts, displs, datatype):
    """Allgatherv 1-D ``send`` into ``out`` (rank r's ``counts[r]`` elements at ``displs[r]``) over ``comm``:
    through the nodes of ``topo`` (``comm``'s topology) where ``start``, the crossover in the call's checked
    signature (``topo.gathers()``; None: never), is at most the bytes gathered in all (so every rank goes
    the same way, a joined one too), else MPI's own Allgatherv.

    Through the nodes, each rank's block goes to the ranks with its local rank on every other node
    (its channel: every rank of a node drives the links at once), and each node allgathers what its
    ranks received over shared memory. Across the link each node sends its own blocks once, where a
    flat ring sends (ranks - 1) / ranks of everything across each link it crosses. The blocks go in
    pieces, pipelined: while piece k + 1 crosses the network (a nonblocking Iallgatherv), the nodes
    share piece k, and MPI's progress inside those blocking calls keeps piece k + 1 moving."""
    if start is None or out.nbytes < start:
        comm.Allgatherv([send, datatype], [out, counts, displs, datatype])
        return
    me, j = comm.Get_rank(), topo.local.Get_rank()
    counts, displs = [int(c) for c in counts], [int(d) for d in displs]
    out[displs[me]:displs[me] + counts[me]] = asnumpy(send)  # (device memory where the MPI is CUDA-aware)
    channel = [topo.rank_of[i][j] for i in range(topo.nodes)]  # the channel's ranks, in node order
    step = max(1, SHARE_BYTES // out.itemsize)  # elements of each rank's block per piece

    def pieces(ranks, k):  # (counts, displs) of piece k of each of ``ranks``' blocks
        lo = [min(counts[r], k * step) for r in ranks]
        return ([min(counts[r], k * step + step) - a for r, a in zip(ranks, lo)],
                [displs[r] + a for r, a in zip(ranks, lo)])

    def across(k):
        return topo.channel_comms[0].Iallgatherv(MPI.IN_PLACE, [out, *pieces(channel, k), datatype])

    steps = max(1, -(-max(counts) // step))
    pending = across(0)
    for k in range(steps):
        following = across(k + 1) if k + 1 < steps else None
        pending.Wait()
        for node in topo.rank_of:  # each rank holds piece k of its local rank's block on every node: share
            topo.local.Allgatherv(MPI.IN_PLACE, [out, *pieces(node, k), datatype])
        pending = following
