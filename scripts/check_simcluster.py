"""Check a simulated cluster (docs/cluster.md): what each rank sees, and a raw 64 MiB Allreduce.

    mpidprun --simulate-nodes 2x2 --link-rate 2gbit python scripts/check_simcluster.py [--reps 5]

Each rank prints its host name, the size of its COMM_TYPE_SHARED communicator and mpidp's
topology; rank 0 then prints the median time of a raw ``comm.Allreduce`` (slowest rank per rep) and
the bytes the job's ``lo`` carried during it (/proc/net/dev: the job's own network namespace, so
between nodes the bytes cross the shaped link; inside one node they do not). With
``--link-model per-node`` it prints the bytes rank 0's node link (``simlink``) received instead.
"""
import argparse
import socket
import statistics
import time

import numpy as np
from mpi4py import MPI

import mpidp


def link_bytes():
    """(device, bytes it received) in this process's network namespace: the node's own link with
    --link-model per-node, else lo."""
    with open("/proc/net/dev") as f:
        rows = {line.split(":")[0].strip(): int(line.split(":")[1].split()[0]) for line in f if ":" in line}
    dev = "simlink" if "simlink" in rows else "lo"
    return dev, rows[dev]


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--mib", type=int, default=64, help="message size in MiB (default 64)")
    p.add_argument("--reps", type=int, default=5, help="timed repetitions (default 5)")
    args = p.parse_args()
    mpidp.init()
    comm = MPI.COMM_WORLD
    shared = comm.Split_type(MPI.COMM_TYPE_SHARED)
    line = (f"rank {comm.rank}/{comm.size} on {socket.gethostname()}: COMM_TYPE_SHARED {shared.Get_size()}, "
            f"local {mpidp.local_rank()}/{mpidp.local_size()}, cross {mpidp.cross_rank()}/{mpidp.cross_size()}")
    lines = comm.gather(line)
    if comm.rank == 0:
        print("\n".join(lines), flush=True)
    x = np.ones(args.mib << 18, np.float32)
    comm.Allreduce(MPI.IN_PLACE, x)  # warm-up: connections
    seconds, carried = [], []
    for _ in range(args.reps):
        x[:] = 1
        comm.Barrier()
        (dev, before), start = link_bytes(), time.perf_counter()
        comm.Allreduce(MPI.IN_PLACE, x)
        seconds.append(comm.allreduce(time.perf_counter() - start, op=MPI.MAX))
        carried.append(link_bytes()[1] - before)
        if x[0] != comm.size or x[-1] != comm.size:
            raise SystemExit(f"rank {comm.rank}: Allreduce gave {x[0]}, expected {comm.size}")
    if comm.rank == 0:
        print(f"{MPI.get_vendor()[0]} Allreduce of {args.mib} MiB: median {statistics.median(seconds):.3f} s "
              f"(of {', '.join(f'{s:.3f}' for s in seconds)}); {dev} carried {statistics.median(carried) / 2**20:.0f} MiB "
              f"per Allreduce", flush=True)
    shared.Free()
    mpidp.shutdown()


if __name__ == "__main__":
    main()
