"""Small allreduces in a loop that also runs nonblocking ones, against raw mpi4py, interleaved.

    mpiexec -n 2 python scripts/bench_small.py [--bytes 4 --rounds 15 --calls 300]

A training loop's metrics and flags are small blocking allreduces between nonblocking gradient
exchanges, so the engine thread is alive while they run. Each round times ``--calls`` calls of
each variant in turn: raw ``comm.Allreduce``, mpidp ``allreduce`` with the check on and off,
``allreduce_``, and an ``allreduce_async`` + ``synchronize`` round trip (float32, op Sum). Each
round's time is the slowest rank's. Rank 0 prints the median over rounds per variant and its
ratio to raw. Two floors run alongside: the least any Python layer over mpi4py must do (a call, a
result array, the MPI call; with the check on, the check's Allgather carrying the payload, the
fingerprints compared and the rows reduced with MPI's op). ``--breakdown`` then times, on each
rank alone, the pieces of mpidp's short path for the same call (rank 0's figures): where the
microseconds between the floor and mpidp go.
"""
import argparse
import statistics
import time
import timeit

import numpy
from mpi4py import MPI

import mpidp
from mpidp.comm import check


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--bytes", type=int, default=4, help="message size in bytes (default 4)")
    ap.add_argument("--rounds", type=int, default=15, help="interleaved rounds (default 15)")
    ap.add_argument("--calls", type=int, default=300, help="calls per variant and round (default 300)")
    ap.add_argument("--breakdown", action="store_true", help="also time the pieces of the short path")
    args = ap.parse_args(argv)
    mpidp.init()
    comm = MPI.COMM_WORLD
    x = numpy.ones(max(1, args.bytes // 4), numpy.float32)
    out = numpy.empty_like(x)

    # The floors: what any Python layer must do at least (a call, a result array, the MPI call(s)), so
    # that what is left over is mpidp's own. With the check on: the check's Allgather carrying the
    # payload, the fingerprints compared, the rows reduced in rank order with MPI's op.
    n = comm.size
    row, rows = numpy.zeros(16, numpy.int64), numpy.zeros((n, 16), numpy.int64)
    mine = row.view(numpy.uint8)[8:8 + x.nbytes].view(x.dtype)
    theirs = [rows[r].view(numpy.uint8)[8:8 + x.nbytes].view(x.dtype) for r in range(n)]

    def floor_off(x):
        result = numpy.empty(x.shape, x.dtype)
        comm.Allreduce(x, result, op=MPI.SUM)
        return result

    def floor_on(x):
        row[0] = 12345
        mine[...] = x
        comm.Allgather(row, rows)
        if rows[:, 0].tolist().count(12345) != n:
            raise RuntimeError("fingerprints differ")
        result = theirs[0].copy()
        for r in theirs[1:]:
            MPI.SUM.Reduce_local(r, result)
        return result

    # name -> (call, check on): check.set_enabled is this rank's switch alone, flipped on every rank
    # between variants (the public set_check is itself a collective)
    variants = {
        "raw comm.Allreduce": (lambda: comm.Allreduce(x, out, op=MPI.SUM), True),
        "floor, check off": (lambda: floor_off(x), True),
        "floor, check on": (lambda: floor_on(x), True),
        "allreduce": (lambda: mpidp.allreduce(x, op=mpidp.Sum, name="small"), True),
        "allreduce, check off": (lambda: mpidp.allreduce(x, op=mpidp.Sum, name="small"), False),
        "allreduce_": (lambda: mpidp.allreduce_(x, op=mpidp.Sum, name="small_"), True),
        "async + synchronize": (lambda: mpidp.synchronize(mpidp.allreduce_async(x, op=mpidp.Sum, name="async")),
                                True),
    }
    times = {k: [] for k in variants}
    for _ in range(args.rounds):
        for k, (fn, on) in variants.items():
            check.set_enabled(on)
            comm.Barrier()
            t0 = time.perf_counter()
            for _ in range(args.calls):
                fn()
            times[k].append(comm.allreduce((time.perf_counter() - t0) / args.calls * 1e6, op=MPI.MAX))
    check.set_enabled(True)
    if comm.rank == 0:
        raw = statistics.median(times["raw comm.Allreduce"])
        print(f"{x.nbytes} B float32, op Sum, np={comm.size}: median over {args.rounds} rounds of {args.calls} calls")
        for k, v in times.items():
            print(f"  {k:24s} {statistics.median(v):8.1f} us  {statistics.median(v) / raw:5.2f}x raw")
    if args.breakdown:
        pieces = breakdown(x)
        if comm.rank == 0:
            print("the short path's pieces (this rank alone, best of 5 x 20000 calls):")
            for k, v in pieces.items():
                print(f"  {k:44s} {v:6.2f} us")
    mpidp.shutdown()


def breakdown(x):
    """Per-call microseconds of the pieces of a planned allreduce of ``x`` (op Sum, check on), timed
    one by one in this process: the MPI call itself is the floor's; the rest is mpidp's."""
    from mpidp.comm import collectives, engine, runtime
    mpidp.allreduce(x, op=mpidp.Sum, name="pieces")  # the plan
    eng = engine.engine_for(runtime.get_comm())
    comm = eng.comm
    plan = eng.plans[collectives._plan_key(comm, x, mpidp.Sum, "pieces", 1.0, 1.0, False)]
    carrier, datatype, out = plan[5], plan[2], numpy.empty_like(x)
    seq = eng.progress.seq

    def best(fn):
        return min(timeit.repeat(fn, number=20000, repeat=5)) / 20000 * 1e6
    empty = best(lambda: None)
    pieces = {
        "plan key and lookup": best(lambda: eng.plans.get(collectives._plan_key(comm, x, mpidp.Sum, "pieces", 1.0,
                                                                                 1.0, False))),
        "collective number and name": best(lambda: f"allreduce.{eng.started()}"),
        "result array": best(lambda: numpy.empty(x.shape, x.dtype)),
        "engine claim + unclaim (order, SIGINT hold, stall)": best(lambda: eng.unclaim(eng.claim("pieces", seq))),
        "payload into the check's row": best(lambda: carrier.mine.__setitem__(Ellipsis, x)),
        "fingerprint stamp": best(lambda: check.stamp(plan[1], seq)),
        "reduction of the rows (MPI op, rank order)": best(lambda: carrier.reduce(out, MPI.SUM, datatype)),
    }
    pieces = {k: max(0.0, v - empty) for k, v in pieces.items()}
    pieces["sum of the pieces"] = sum(pieces.values())
    eng.progress.seq = seq  # (started() above numbered collectives no rank ran)
    return pieces


if __name__ == "__main__":
    main()
