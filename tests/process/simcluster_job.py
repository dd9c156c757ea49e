"""What one rank of a simulated-cluster job sees: topology, environment, node-local scratch, and
collectives against NumPy. Run by tests/process/test_simcluster.py as
``mpidprun --simulate-nodes LAYOUT python simcluster_job.py OUTDIR``; each rank writes OUTDIR/rank-<r>.json."""
import json
import os
import re
import socket
import subprocess
import sys
import time

import numpy as np
from mpi4py import MPI

import mpidp
from mpidp import timeline
from mpidp.comm import runtime

out = sys.argv[1]
mpidp.init()
rank, size = mpidp.rank(), mpidp.size()
seen = {"rank": rank, "size": size, "shared": MPI.COMM_WORLD.Split_type(MPI.COMM_TYPE_SHARED).Get_size(),
        "mpi": MPI.get_vendor()[0], "local_rank": mpidp.local_rank(), "local_size": mpidp.local_size(),
        "cross_rank": mpidp.cross_rank(), "cross_size": mpidp.cross_size(), "device": runtime.device(),
        "hostname": socket.gethostname(), "tmpdir": os.environ.get("TMPDIR"),
        "threads": os.environ.get("OMP_NUM_THREADS"), "node": os.environ.get("MPIDP_SIM_NODE")}
try:  # GPUs this rank can see: binding by local rank is checked for real where there are some
    import cupy
    seen["gpus"] = cupy.cuda.runtime.getDeviceCount() if cupy.is_available() else 0
except ImportError:
    seen["gpus"] = 0

# node-local scratch: local rank 0 writes, its node's ranks read; other nodes' files are not there
with timeline.span("scratch", "io"):
    scratch = os.path.join(os.environ["TMPDIR"], "cache.txt")
    if mpidp.local_rank() == 0:
        with open(scratch + ".tmp", "w") as f:
            f.write(f"written by rank {rank}")
        os.replace(scratch + ".tmp", scratch)
    mpidp.barrier()
    seen["scratch"] = open(scratch).read()

# collectives on every rank's own values, checked here against NumPy
failures = []
def check(name, got, want):
    if got.shape != want.shape or got.dtype != want.dtype or not np.allclose(got, want, rtol=1e-5, atol=1e-5):
        failures.append(f"{name}: got {got.ravel()[:4]} {got.shape} {got.dtype}, want {want.ravel()[:4]} {want.shape}")

everyone = [np.random.default_rng(r).standard_normal(1 << 20).astype(np.float32) for r in range(size)]
for n in (7, 1 << 20):  # small, and large (4 MiB: the ring path)
    mine = everyone[rank][:n]
    check(f"allreduce sum {n}", mpidp.allreduce(mine, op=mpidp.Sum), np.sum([e[:n] for e in everyone], axis=0))
    check(f"allreduce average {n}", mpidp.allreduce(mine), np.mean([e[:n] for e in everyone], axis=0, dtype=np.float32))
for root in range(size):
    check(f"broadcast root {root}", mpidp.broadcast(everyone[rank][:100], root_rank=root), everyone[root][:100])
rows = [r + 1 for r in range(size)]  # a different first dimension per rank
check("allgather", mpidp.allgather(np.full((rows[rank], 3), rank, np.int64)),
      np.concatenate([np.full((rows[r], 3), r, np.int64) for r in range(size)]))
m = 5 * size + 2  # not a multiple of the size: the first ranks get one row more
full = np.sum([np.arange(m * 2, dtype=np.float64).reshape(m, 2) * (r + 1) for r in range(size)], axis=0)
start = sum(m // size + (r < m % size) for r in range(rank))
count = m // size + (rank < m % size)
check("reducescatter", mpidp.reducescatter(np.arange(m * 2, dtype=np.float64).reshape(m, 2) * (rank + 1), op=mpidp.Sum),
      full[start:start + count])


def lo_bytes(dev="lo", field=0):
    """Bytes received (field 8: sent) on ``dev``: /proc/net/dev shows the reader's network namespace
    (the job's own, or with per-node links the node's own)."""
    with open("/proc/net/dev") as f:
        return next(int(line.split(":")[1].split()[field]) for line in f if line.strip().startswith(dev + ":"))


def tbf_stats(dev):
    """(bytes sent, overlimits) of the tc token bucket on ``dev`` in this rank's namespace."""
    out = subprocess.run(["tc", "-s", "qdisc", "show", "dev", dev], capture_output=True, text=True).stdout
    m = re.search(r"qdisc tbf .*?Sent (\d+) bytes .*?overlimits (\d+)", out, re.S)
    return (int(m.group(1)), int(m.group(2))) if m else (0, 0)


# a raw MPI Allreduce: between nodes its bytes cross the (shaped) loopback, inside a node they do not
payload = np.full(1 << 21, rank + 1, np.float32)  # 8 MiB
MPI.COMM_WORLD.Barrier()
before = lo_bytes()
MPI.COMM_WORLD.Allreduce(MPI.IN_PLACE, payload)
MPI.COMM_WORLD.Barrier()
seen["lo_bytes"], seen["payload_bytes"] = lo_bytes() - before, payload.nbytes
check("raw Allreduce", payload, np.full(1 << 21, size * (size + 1) / 2, np.float32))

if os.environ.get("MPIDP_SIM_LINKS"):  # --link-model per-node: a 64 MiB Allreduce over each node's own link
    big = np.full(1 << 24, rank + 1, np.float32)
    MPI.COMM_WORLD.Barrier()
    before = lo_bytes(), lo_bytes("simlink"), lo_bytes("simlink", 8), tbf_stats("simlink")
    start = time.perf_counter()
    MPI.COMM_WORLD.Allreduce(MPI.IN_PLACE, big)
    seen["big_seconds"] = MPI.COMM_WORLD.allreduce(time.perf_counter() - start, op=MPI.MAX)
    MPI.COMM_WORLD.Barrier()
    after = lo_bytes(), lo_bytes("simlink"), lo_bytes("simlink", 8), tbf_stats("simlink")
    seen["big"] = {"bytes": big.nbytes, "lo": after[0] - before[0], "link_rx": after[1] - before[1],
                   "link_tx": after[2] - before[2], "tbf_sent": after[3][0] - before[3][0],
                   "tbf_overlimits": after[3][1] - before[3][1]}
    check("raw Allreduce 64 MiB", big[::4096], np.full(1 << 12, size * (size + 1) / 2, np.float32))
seen["failures"] = failures

# timeline clocks: every rank's "after" span starts after every rank's "before" span ended
with timeline.span("before", "compute"):
    time.sleep(0.01 * (size - rank))
mpidp.barrier()
with timeline.span("after", "compute"):
    pass
with open(os.path.join(out, f"rank-{rank}.json"), "w") as f:
    json.dump(seen, f)
mpidp.shutdown()
