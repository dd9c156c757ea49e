"""Misuses of issue 17: the one table tests/process/test_misuse.py asserts and
scripts/gen_misuse_table.py writes into docs/reliability.md, so the two never drift.

Each case is a small user script run under real ``mpiexec``. Every rank prints what it sees as
``[rank r] ...``: its result, or the exception it caught (then it exits 1); an uncaught one goes
to mpidp's abort hook (``[rank r/n] ...``). The stall inspector's lines carry ``[rank r]`` too.
Hangs are bounded by a short stall bound (below) so the table can say how long the job took.
"""
import re
import sys
import textwrap
import time
from dataclasses import dataclass, field
from pathlib import Path

# every case runs with these: the default abort bound is 300 s, shortened here so hangs end quickly
ENV = {"MPIDP_STALL_WARNING_S": "1", "MPIDP_STALL_ABORT_S": "5", "MPIDP_EXIT_TIMEOUT_S": "10"}

HEAD = """\
import os, sys, time
import numpy
{pre}import mpidp
from mpidp import nn, optim
r = int(os.environ.get("PMI_RANK", "0"))


def say(text):
    print(f"[rank {{r}}] {{text}}", flush=True)


def step(model, opt, passes=1):
    x = numpy.ones((2, 4), dtype=numpy.float32)
    for _ in range(passes):
        model.backward(model(x))
    opt.step()


def in_flight(count=6):
    return [mpidp.allreduce_async(numpy.full(1 << 20, float(i)), op=mpidp.Sum, name=f"g{{i}}")
            for i in range(count)]


try:
    mpidp.init()
    n = mpidp.size()
{body}
except Exception as exc:
    say(f"{{type(exc).__name__}}: {{exc}}")
    sys.exit(1)
say("finished")
"""


@dataclass(frozen=True)
class Misuse:
    name: str
    title: str
    body: str
    rc: object                 # 0, or "nonzero"
    message: str               # regex every rank in ``ranks`` must print
    np: int = 2
    ranks: object = "all"      # "all" or a tuple of ranks that must print the message
    pre: str = ""              # lines before ``import mpidp``
    env: dict = field(default_factory=dict)
    bound_s: float = 20.0      # the job ends within this (start-up included)
    xfail: str = ""
    note: str = ""


def _dist(setting):
    return (f"model = nn.Linear(4, 3)\n"
            f"opt = mpidp.DistributedOptimizer(optim.SGD(model.parameters(), lr=0.1), model=model, {setting})\n")


CASES = [
    Misuse("op_differs", "DistributedOptimizer op Average on rank 0, Sum on the others",
           _dist("op=mpidp.Average if r == 0 else mpidp.Sum") + "step(model, opt)\n",
           rc="nonzero", message=r"MismatchError: .*op differs"),
    Misuse("predivide_differs", "gradient_predivide_factor 1 on rank 0, 2 on the others",
           _dist("gradient_predivide_factor=1.0 if r == 0 else 2.0") + "step(model, opt)\n",
           rc="nonzero", message=r"MismatchError: .*gradient_predivide_factor differs"),
    Misuse("passes_differ", "backward_passes_per_step 1 on rank 0, 2 on the others",
           _dist("backward_passes_per_step=1 if r == 0 else 2") + "step(model, opt, 1 if r == 0 else 2)\n",
           rc="nonzero", message=r"MismatchError: .*backward_passes_per_step differs"),
    Misuse("pass_too_many", "a second backward before step() (buckets already in flight)",
           _dist("fusion_threshold_bytes=1 << 20") +
           "x = numpy.ones((2, 4), dtype=numpy.float32)\nmodel.backward(model(x))\nmodel.backward(model(x))\n",
           rc="nonzero", message=r"MpidpError: gradient of '\w+' was computed again"),
    Misuse("kind_differs", "allreduce on rank 0, reducescatter on the others",
           "x = numpy.ones(4)\ny = mpidp.allreduce(x) if r == 0 else mpidp.reducescatter(x)\nsay(f'got {y}')\n",
           rc="nonzero", message=r"MismatchError"),
    Misuse("allgather_vs_allreduce", "allgather on rank 0, allreduce on the others",
           "x = numpy.ones(4)\ny = mpidp.allgather(x) if r == 0 else mpidp.allreduce(x)\nsay(f'got {y}')\n",
           rc="nonzero", message=r"MismatchError"),
    Misuse("piece_bytes_differ", "set_piece_bytes differs per rank (a ring allreduce)",
           "from mpidp.comm import _buffers\n_buffers.set_piece_bytes(1 << 16 if r == 0 else 1 << 18)\n"
           "y = mpidp.allreduce(numpy.ones(1 << 20), op=mpidp.Sum)\nsay(f'sum {y[:2]}')\n",
           rc="nonzero", message=r"MismatchError"),
    Misuse("names_swapped", "two same-shape tensors reduced in swapped order",
           "a, b = numpy.full(4, 1.0), numpy.full(4, 10.0)\n"
           "if r == 0:\n    ya, yb = mpidp.allreduce(a, name='a'), mpidp.allreduce(b, name='b')\n"
           "else:\n    yb, ya = mpidp.allreduce(b, name='b'), mpidp.allreduce(a, name='a')\n"
           "say(f'a -> {ya[0]}, b -> {yb[0]}')\n",
           rc="nonzero", message=r"MismatchError: .*name"),
    Misuse("read_only_output", "read-only output array on rank 1",
           "x = numpy.ones(8)\nx.flags.writeable = r != 1\nmpidp.allreduce_(x)\nsay(f'got {x[:2]}')\n",
           rc="nonzero", message=r"(ValueError|BufferError|TypeError)", ranks=(1,)),
    Misuse("complex_max", "Max of complex64", "mpidp.allreduce(numpy.ones(4, numpy.complex64), op=mpidp.Max)\n",
           rc="nonzero", message=r"TypeError: .*complex .*Min/Max|TypeError: .*complex.*order"),
    Misuse("bool_sum", "Sum of bool (rank 0 true)",
           "y = mpidp.allreduce(numpy.array([r == 0, False]), op=mpidp.Sum)\nsay(f'bool Sum = {y}')\n",
           rc=0, message=r"bool Sum = \[ True False\]"),
    Misuse("nan_max", "Max of a small float32 with a NaN on rank 1",
           "x = numpy.arange(5, dtype=numpy.float32)\nif r == 1:\n    x[2] = numpy.nan\n"
           "say(f'Max = {mpidp.allreduce(x, op=mpidp.Max)}')\n",
           np=3, rc=0, message=r"Max = \[ *0\. +1\. +nan +3\. +4\.\]"),
    Misuse("funneled", "mpi4py.rc.thread_level = 'funneled'", "pass\n",
           pre="import mpi4py\nmpi4py.rc.thread_level = 'funneled'\n",
           rc="nonzero", message=r"MpidpError: MPI was initialised with thread level funneled"),
    Misuse("shutdown_in_flight", "shutdown() with async allreduces in flight",
           "handles = in_flight()\nmpidp.shutdown()\nsay(f'results after shutdown: {[float(h.wait()[0]) for h in handles]}')\n",
           rc=0, message=r"results after shutdown: \[0\.0, 2\.0, 4\.0, 6\.0, 8\.0, 10\.0\]"),
    Misuse("exit_in_flight", "exit without shutdown() with async allreduces in flight",
           "handles = in_flight()\n", rc=0, message=r"finished"),
    Misuse("fork_child_exits", "a child forked with os.fork() exits normally",
           "pid = os.fork()\nif pid == 0:\n    sys.exit(0)\nos.waitpid(pid, 0)\n"
           "say(f'allreduce after the fork: {mpidp.allreduce(numpy.ones(1), op=mpidp.Sum)[0]}')\n",
           rc=0, message=r"allreduce after the fork: 2\.0", bound_s=9),
    Misuse("reinit_then_exception", "init(); shutdown(); init(), then an exception on rank 1",
           "class Planted(BaseException):  # not caught by the script: mpidp's hook sees it\n    pass\n\n\n"
           "mpidp.shutdown()\nmpidp.init()\nif r == 1:\n    time.sleep(0.3)\n    raise Planted('after re-init')\n"
           "mpidp.barrier()\n",
           rc="nonzero", message=r"Planted: after re-init", ranks=(1,), bound_s=15),
    Misuse("skipped_last_collective", "rank 1 leaves the loop one step early",
           "if r != 1:\n    mpidp.allreduce(numpy.ones(4), name='loss')\nelse:\n    time.sleep(60)\n",
           np=3, rc="nonzero", message=r"stall: waiting \d+ s in loss .*ranks not in it: 1", ranks=(0, 2),
           bound_s=15, note="MPIDP_STALL_ABORT_S=5 here; by default the job ends after 300 s"),
    Misuse("leave_early_shutdown", "rank 1 leaves the loop one step early and calls shutdown()",
           "for step in range(3 if r == 1 else 4):\n    mpidp.allreduce(numpy.ones(4), name='loss')\nmpidp.shutdown()\n",
           np=3, rc="nonzero", message=r"MismatchError: .*'loss'.*collective differs .*'shutdown'",
           note="default stall and exit bounds would apply here: the check of shutdown() ends it"),
    Misuse("overlapping_sets", "process sets [0,1], [1,2], [0,2] used in different orders",
           "sets = [mpidp.ProcessSet(s) for s in ([0, 1], [1, 2], [0, 2])]\n"
           "mine = [s for s in sets if s.included()]\n"
           "for s in (mine if r != 1 else mine[::-1]):\n    mpidp.allreduce(numpy.ones(4), process_set=s)\n",
           np=3, rc=0, message=r"finished"),
    Misuse("check_env_differs", "MPIDP_CHECK=0 on rank 1 only (the check on the others)",
           "mpidp.allreduce(numpy.ones(4), op=mpidp.Sum, name='loss')\n",
           pre="import os\nif os.environ.get('PMI_RANK') == '1':\n    os.environ['MPIDP_CHECK'] = '0'\n",
           rc="nonzero", message=r"MismatchError: .*MPIDP_CHECK.* differs"),
    Misuse("set_check_differs", "set_check(False) on rank 1 only",
           "mpidp.comm.set_check(r != 1)\nmpidp.allreduce(numpy.ones(4), op=mpidp.Sum, name='loss')\n",
           rc="nonzero", message=r"MismatchError: .*set_check.*enabled differs"),
]


def by_name(name):
    return next(c for c in CASES if c.name == name)


@dataclass
class Result:
    rc: object
    seconds: float
    output: str
    lines: dict   # rank -> the line shown for it

    def missing(self, case):
        """Ranks that should have printed the case's message but did not."""
        ranks = range(case.np) if case.ranks == "all" else case.ranks
        return [r for r in ranks if not re.search(case.message, self.lines.get(r, ""))]


def script(case):
    return HEAD.format(pre=case.pre, body=textwrap.indent(case.body, "    "))


def run_case(case, workdir, run):
    """Run ``case`` in ``workdir`` with ``run`` (tests/_mpirun.run); returns a Result."""
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    path = workdir / f"{case.name}.py"
    path.write_text(script(case))
    start = time.monotonic()
    rc, out, _ = run([sys.executable, path], np=case.np, timeout=60, env={**ENV, **case.env})
    seconds = time.monotonic() - start
    # hydra may splice two ranks' lines: split the output where any rank's prefix starts
    pieces = [p.split("\n", 1)[0].strip() for p in re.split(r"(?=\[rank \d+[]/])", out)]
    lines = {}
    for r in range(case.np):
        mine = [p for p in pieces if re.match(rf"\[rank {r}[]/]", p)]
        hit = [ln for ln in mine if re.search(case.message, ln)]
        lines[r] = (hit or mine or [""])[0 if hit else -1]
    return Result(rc, seconds, out, lines)


def problems(case, res):
    """What the case's result got wrong (empty: as expected)."""
    wrong = []
    if res.rc is None:
        wrong.append("hung (killed by the 60 s timeout)")
    elif (case.rc == 0) != (res.rc == 0):
        wrong.append(f"exit code {res.rc}, expected {case.rc}")
    if res.seconds > case.bound_s:
        wrong.append(f"took {res.seconds:.1f} s, bound {case.bound_s:g} s")
    missing = res.missing(case)
    if missing:
        wrong.append(f"ranks {missing} did not print /{case.message}/")
    return wrong
