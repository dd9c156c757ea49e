"""Fault-injection cases of issue 8: the one table that tests/process/test_faults.py asserts and
scripts/gen_fault_table.py turns into docs/fault-injection.md, so the two never drift.

Run as a script this file is also the job every case launches::

    mpiexec -n 2 python tests/process/fault_cases.py train --dir WORK --steps 6 --ckpt-every 2
    python tests/process/fault_cases.py verify WORK/ckpt          # which checkpoints still load
    mpiexec -n 2 python tests/process/fault_cases.py mpidp-train -- --model mlp ...  # mpidp.train

``train`` is a small data-parallel training loop written the way a user writes one (model,
DistributedOptimizer, loader, periodic checkpoints). The fault comes in from outside through
``FAULT`` / ``FAULT_RANK`` / ``FAULT_STEP``: hooks, wrappers and patches set up here, in user
code; mpidp itself has no test hooks. The failing rank writes ``fault.<rank>`` (the time of the
fault) and every rank that raises writes ``rank<r>.exc`` (its exception) before the error
propagates, so a case can tell which ranks saw the error and how long the job took to end.
"""
import json
import os
import re
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve()
IN_FEATURES, CLASSES, SAMPLES, HIDDEN, BATCH = 16, 4, 512, 32, 16
BURST_ELEMENTS = 1 << 21  # the SIGKILL/SIGTERM cases die inside a loop of 8 MiB allreduces


# --- the cases --------------------------------------------------------------------------------

@dataclass(frozen=True)
class Case:
    """One fault: how to inject it, what must happen, and the row of the table."""

    name: str                  # test id
    title: str                 # the table's first column
    fault: str                 # FAULT for the job ("" = none)
    rc: object                 # expected exit code: an int, or "nonzero"
    message: str               # regex of the line the user sees
    np: int = 2
    rank: int = 1              # the rank that fails
    step: int = 3              # the step at which it fails
    steps: int = 6
    ckpt_every: int = 2
    args: tuple = ()           # more driver arguments
    env: dict = field(default_factory=dict)
    prepare: str = ""          # "checkpoints": start from seed checkpoints (steps 2, 4); "npy": data files
    mutate: str = ""           # "corrupt" | "truncate": damage the newest seed checkpoint
    job: str = "train"         # "train" (the driver) or "mpidp-train" (python -m mpidp.train)
    every_rank: bool = False   # the message must come from every rank
    reporter: object = None    # who prints it: None = the failing rank, a rank, "any", "mpiexec" or "mpidprun"
    good_step: object = None   # this checkpoint must load after the job (None: no checkpoint involved)
    bound_s: float = 10.0      # seconds from the fault to the end of the job
    timeout: float = 40.0
    xfail: str = ""            # a known mpidp bug: strict xfail with this reason
    note: str = ""             # one clause for the table
    layout: str = ""           # run on simulated nodes (mpidprun --simulate-nodes LAYOUT), e.g. "2x2"
    needs_netns: bool = False  # the fault needs the job's own network namespace (see simcluster)


DEATH = r"YOUR APPLICATION TERMINATED WITH THE EXIT STRING: \w+ \(signal \d+\)"

CASES = [
    Case("exception_before_init", "exception on one rank before `mpidp.init()`", "init_before",
         rc="nonzero", message=r"RuntimeError: injected failure before mpidp.init", np=3,
         timeout=10, bound_s=7, env={"MPIDP_INIT_TIMEOUT_S": "3"},  # 3 s, then exit: 5.0 s on a slow VM
         note="the other ranks leave MPI_Init after MPIDP_INIT_TIMEOUT_S (default 300 s)"),
    Case("exception_at_init", "exception on one rank right after `mpidp.init()`", "init",
         # 1 from MPI_Abort, or 9 when hydra's SIGKILL of a peer is reported first
         rc="nonzero", message=r"\[rank 1/3\] RuntimeError: injected failure right after mpidp.init", np=3),
    Case("exception_in_forward", "exception in forward (layer hook) on one rank", "forward",
         rc=1, message=r"\[rank 1/2\] RuntimeError: injected failure in forward"),
    Case("exception_in_backward", "exception inside backward, gradient buckets in flight", "backward",
         rc=1, message=r"\[rank 1/3\] RuntimeError: injected failure inside backward \([1-9]",
         np=3, env={"MPIDP_FUSION_THRESHOLD": "512"}),
    Case("exception_in_step", "exception in `optimizer.step()` on one rank", "step",
         rc=1, message=r"\[rank 1/2\] RuntimeError: injected failure in optimizer.step"),
    Case("exception_in_save", "exception on rank 1 while a checkpoint is saved", "save_exception",
         rc=1, message=r"\[rank 1/2\] RuntimeError: injected failure while saving", step=4,
         good_step=2),
    Case("io_error_in_save", "I/O error on rank 0 while writing a checkpoint", "save_io", rank=0,
         step=4, rc=1, every_rank=True, good_step=2,
         message=r"CheckpointError: could not save checkpoint step 4 .*injected I/O error"
                 r".*previous checkpoint is unchanged"),
    Case("sigkill_in_save", "SIGKILL of rank 0 in the middle of a checkpoint write", "save_kill",
         rank=0, step=4, rc=9, message=DEATH, good_step=2, reporter="mpiexec",
         note="the partial file stays as `.ckpt-*.npz.tmp` until the next save removes it"),
    Case("disk_full", "full disk during save (`RLIMIT_FSIZE`, SIGXFSZ ignored)", "disk_full", rank=0,
         step=4, rc=1, every_rank=True, good_step=2,
         message=r"CheckpointError: could not save checkpoint step 4 .*File too large"
                 r".*previous checkpoint is unchanged"),
    Case("sigkill_mid_allreduce", "SIGKILL of one rank inside an 8 MiB allreduce loop", "sigkill",
         np=3, rc=9, message=DEATH, good_step=2, reporter="mpiexec"),
    Case("sigterm_one_rank", "SIGTERM of one rank (no handler)", "sigterm", np=3, rc=15,
         message=DEATH, good_step=2, reporter="mpiexec"),
    Case("sigterm_checkpoint", "SIGTERM on rank 0, `mpidp.train --checkpoint-on-signal`",
         "sigterm_ckpt", rank=0, step=5, job="mpidp-train", rc=143, good_step=5, reporter=0,
         message=r"checkpoint \S*ckpt-00000005\.npz \(signal\)",
         note="agreed stop at the next step boundary, final checkpoint, every rank exits 143"),
    Case("exit_without_shutdown", "one rank returns mid-training without `shutdown()`", "exit",
         rc="nonzero", message=r"mismatched \w+ of tensor .*; rank 1 has 'exit'", np=3, good_step=2, reporter="any",
         note="default bounds: the check of its exit meets the others' gradient allreduce, which raises "
              "MismatchError (exit code 1, or 9 when hydra reports a peer's SIGKILL first)"),
    Case("mismatched_models", "mismatched models (rank 1 has a wider hidden layer)", "mismatch",
         rc=1, every_rank=True, np=3,
         message=r"MismatchError: mismatched broadcast of tensor '0\.weight': shape differs"),
    Case("mismatched_models_unbroadcast", "mismatched models, no `broadcast_parameters`",
         "mismatch", args=("--no-broadcast",), rc=1, every_rank=True,
         message=r"MismatchError: mismatched DistributedOptimizer of tensor 'gradients': parameter '\w",
         note="caught at the first gradient bucket, inside backward"),
    Case("nan_gradients", "NaN input on one rank (NaN gradients)", "nan", rc=0, good_step=2, reporter=0,
         message=r"final: step 6, loss nan, finite parameters: no, check_replicas: identical",
         note="no error: the average spreads NaN to every replica identically; the job runs on"),
    Case("inf_gradients", "Inf input on one rank (Inf/NaN gradients)", "inf", rc=0, good_step=2, reporter=0,
         message=r"final: step 6, loss nan, finite parameters: no, check_replicas: identical",
         note="as NaN"),
    Case("nan_gradients_amp", "NaN input on one rank, float16 with `mpidp.amp` loss scaling", "nan",
         args=("--amp",), rc=0, good_step=2, reporter=0,
         message=r"final: step 6, loss \d\S*, finite parameters: yes, check_replicas: identical, "
                 r"amp skipped 1 step\(s\), loss scale 512",
         note="the step is skipped on every rank and the loss scale halves; training goes on"),
    Case("skipped_collective", "one rank skips a collective and goes on", "skip", np=3, rc=1,
         every_rank=True, message=r"MismatchError: mismatched allreduce of tensor .*'loss'.*differs",
         note="the next collective's agreement check catches the skew"),
    Case("skipped_collective_exit", "one rank skips the last collective and calls `shutdown()`", "skip_exit",
         np=3, rc="nonzero", step=6, bound_s=12, good_step=4, reporter="any",
         message=r"MismatchError: mismatched \w+ of tensor .*'loss'.*collective differs .*'shutdown'",
         note="the check of its shutdown() meets the others' allreduce: MismatchError at once (default bounds)"),
    Case("skipped_collective_stall", "as above, with the agreement check off (`MPIDP_CHECK=0`)", "skip_exit",
         np=3, rc="nonzero", step=6, bound_s=12, good_step=4, reporter="any",
         env={"MPIDP_CHECK": "0", "MPIDP_STALL_WARNING_S": "1", "MPIDP_STALL_ABORT_S": "3"},
         message=r"\[rank \d\] stall: waiting \d+ s in loss \(collective #\d+\); ranks not in it: 1 .*aborting",
         note="MPIDP_STALL_WARNING_S=1, MPIDP_STALL_ABORT_S=3; without the abort setting it hangs, "
              "warning once"),
    Case("checkpoint_corrupt", "corrupt checkpoint (bytes flipped), `--resume`", "", prepare="checkpoints",
         mutate="corrupt", args=("--resume",), rc=1, every_rank=True, good_step=2,
         message=r"CheckpointError: checkpoint \S*ckpt-00000004\.npz is corrupt"),
    Case("checkpoint_truncated", "truncated checkpoint, `--resume`", "", prepare="checkpoints",
         mutate="truncate", args=("--resume",), rc=1, every_rank=True, good_step=2,
         message=r"CheckpointError: checkpoint \S*ckpt-00000004\.npz is (truncated|corrupt)"),
    Case("checkpoint_wrong_model", "checkpoint of another model, `--resume`", "", prepare="checkpoints",
         args=("--resume", "--hidden", str(HIDDEN + 8)), rc=1, every_rank=True, good_step=4,
         message=r"CheckpointError: checkpoint \S*ckpt-00000004\.npz does not fit the model: parameter '0\.weight'"),
    Case("data_file_deleted", "memory-mapped `.npy` data file deleted mid-run", "data_gone", rank=0,
         prepare="npy", args=("--npy",), rc=1, good_step=2, reporter="any",
         message=r"FileNotFoundError: data file \S*x\.npy disappeared during the run",
         note="every rank reads the file; the first to miss it ends the job"),
    # issue 18: a cluster of simulated nodes (mpidprun --simulate-nodes, see docs/cluster.md)
    Case("node_lost", "a whole node lost: both ranks of node 1 SIGKILLed, simulated 2x2", "node_kill",
         layout="2x2", np=4, rank=2, rc="nonzero", reporter="mpidprun", good_step=2,
         message=r"mpidprun: host 127\.0\.0\.3 \(simulated node 1: ranks 2,3\) failed",
         note="`mpidprun --restarts 1` then restarts from the last checkpoint (test_simcluster.py)"),
    Case("link_cut", "link between the two nodes cut (TCP blackholed), simulated 2x2", "link_cut",
         layout="2x2", np=4, rank=0, rc="nonzero", reporter="any", good_step=2, needs_netns=True,
         bound_s=12, env={"MPIDP_STALL_WARNING_S": "1", "MPIDP_STALL_ABORT_S": "3"},
         message=r"\[rank [01]\] stall: waiting \d+ s in .*; ranks not in it: 2 .*3 .*aborting",
         note="MPIDP_STALL_WARNING_S=1, MPIDP_STALL_ABORT_S=3: each side names the other node's ranks; "
              "MPI_Abort waits behind the blocked MPI call, so SIGALRM ends each rank 3 s later"),
]


def netns_available():
    """(True, '') where a simulated-cluster job gets its own network namespace; else (False, why)."""
    from mpidp.launch import simcluster
    return simcluster.shaping_available()


def by_name(name):
    return next(c for c in CASES if c.name == name)


# --- running a case ---------------------------------------------------------------------------

@dataclass
class Result:
    rc: object
    seconds: float             # the whole mpiexec job
    after_fault: object        # seconds from the fault to the end of the job (None: no fault time)
    line: str                  # the first output line matching the case's message ("" if none)
    ranks: list                # ranks that reported it
    checkpoints: dict          # step -> "ok" or the load error
    leftovers: list            # temporary checkpoint files left behind
    output: str

    def who(self, case):
        """Short answer for the table: which ranks the user sees the message from."""
        if not self.line:
            return "-"
        if case.reporter == "mpiexec":
            return f"mpiexec (rank {case.rank} died)"
        if case.reporter == "mpidprun":
            return "mpidprun"
        if case.every_rank and self.ranks == list(range(case.np)):
            return f"every rank (0-{case.np - 1})"
        return ", ".join(map(str, self.ranks)) or "?"

    def checkpoint_intact(self, case):
        """Short answer for the table: does the last good checkpoint load?"""
        if case.good_step is None:
            return "n/a"
        state = self.checkpoints.get(case.good_step, "missing")
        return f"yes (step {case.good_step} loads)" if state == "ok" else f"NO (step {case.good_step}: {state})"


def problems(case, r):
    """What ``r`` gets wrong against ``case``'s expectations ([] when the case passes)."""
    out = []
    if r.rc is None:
        return [f"the job hung and was killed after {case.timeout:g} s"]
    # when every rank aborts at once, hydra may report a peer's SIGKILL (9) before the abort (1)
    accepted = {case.rc, 9} if case.every_rank and case.rc == 1 else {case.rc}
    if (r.rc == 0) if case.rc == "nonzero" else (r.rc not in accepted):
        out.append(f"exit code {r.rc}, expected {case.rc}")
    if not r.line:
        out.append(f"no output line matches {case.message!r}")
    elif case.every_rank and r.ranks != list(range(case.np)):
        out.append(f"the error must be raised on every rank, seen from {r.ranks}")
    elif case.reporter is None and case.rank not in r.ranks:
        out.append(f"rank {case.rank} must report its failure, seen from {r.ranks}")
    elif isinstance(case.reporter, int) and r.ranks != [case.reporter]:
        out.append(f"rank {case.reporter} must print it, seen from {r.ranks}")
    if r.after_fault is not None and r.after_fault >= case.bound_s:
        out.append(f"the job ended {r.after_fault} s after the fault, bound {case.bound_s:g} s")
    if case.good_step is not None:
        if not r.checkpoints.get(case.good_step, "").startswith("ok"):
            out.append(f"the last good checkpoint (step {case.good_step}) does not load: "
                       f"{r.checkpoints.get(case.good_step, 'missing')}")
        for step, state in sorted(r.checkpoints.items()):
            if step > case.good_step and not state.startswith("ok") and not case.mutate:
                out.append(f"checkpoint {step} was left unloadable by the fault: {state}")
    if r.leftovers and case.fault != "save_kill":  # a killed writer leaves its temporary file to the next save
        out.append(f"temporary files left: {r.leftovers}")
    return out


def seed_checkpoints(directory, runner):
    """Checkpoints at steps 2 and 4 of a clean 2-rank run, for the checkpoint-loading cases."""
    directory = Path(directory)
    if not (directory / "ckpt" / "ckpt-00000004.npz").exists():
        directory.mkdir(parents=True, exist_ok=True)
        rc, out, _ = runner(driver_argv("train", "--dir", directory, "--steps", 4, "--ckpt-every", 2),
                            np=2, timeout=60, env={"FAULT": ""})
        if rc != 0:
            raise RuntimeError(f"the seed run for the checkpoint cases failed (rc {rc}):\n{out[-3000:]}")
    return directory / "ckpt"


def driver_argv(*args):
    return [sys.executable, str(HERE), *map(str, args)]


def _mutate(ckpt_dir, how):
    path = Path(ckpt_dir) / "ckpt-00000004.npz"
    blob = bytearray(path.read_bytes())
    if how == "corrupt":  # flip bytes in the middle: the zip members' crc or ours catch it
        middle = len(blob) // 2
        blob[middle:middle + 64] = bytes(b ^ 0xFF for b in blob[middle:middle + 64])
    elif how == "truncate":
        blob = blob[:len(blob) // 2]
    path.write_bytes(bytes(blob))


def write_npy_data(directory):
    import numpy
    x, y = make_data()
    numpy.save(Path(directory) / "x.npy", x)
    numpy.save(Path(directory) / "y.npy", y)


def run_case(case, workdir, seed_dir, runner):
    """Run ``case`` in ``workdir`` with ``runner`` (tests/_mpirun.run); returns a Result."""
    workdir = Path(workdir)
    if workdir.exists():
        shutil.rmtree(workdir)
    workdir.mkdir(parents=True)
    if case.prepare == "checkpoints":
        shutil.copytree(seed_dir, workdir / "ckpt")
    elif case.prepare == "npy":
        write_npy_data(workdir)
    if case.mutate:
        _mutate(workdir / "ckpt", case.mutate)
    env = {"FAULT": case.fault, "FAULT_RANK": str(case.rank), "FAULT_STEP": str(case.step),
           "FAULT_DIR": str(workdir), **case.env}
    if case.job == "mpidp-train":
        argv = driver_argv("mpidp-train", "--", "--model", "mlp", "--epochs", 1, "--batch-size", BATCH,
                           "--checkpoint-dir", workdir / "ckpt", "--checkpoint-every", case.ckpt_every,
                           "--checkpoint-on-signal", "--progress", "log", "--log-every", 1, *case.args)
    else:
        argv = driver_argv("train", "--dir", workdir, "--steps", case.steps, "--ckpt-every", case.ckpt_every,
                           *case.args)
    np = case.np
    if case.layout:  # the same job on simulated nodes, started as a user would
        argv = [sys.executable, "-m", "mpidp.run", "--simulate-nodes", case.layout, "--link-rate", "2gbit",
                *argv]
        np = None
    start_wall = time.time()
    rc, out, seconds = runner(argv, np=np, timeout=case.timeout, env=env)
    end_wall = start_wall + seconds
    faults = [float(p.read_text()) for p in workdir.glob("fault.*")]
    after = round(end_wall - min(faults), 2) if faults else None
    line, ranks = _find_message(case, out, workdir)
    checkpoints, leftovers = {}, []
    if case.good_step is not None:  # the checkpoints as the model that wrote them sees them
        checkpoints, leftovers = verify_checkpoints(workdir / "ckpt", runner, mlp_train=case.job == "mpidp-train",
                                                    amp="--amp" in case.args)
    return Result(rc, round(seconds, 2), after, line, ranks, checkpoints, leftovers, out)


def _find_message(case, out, workdir):
    """(first output line matching the case's message, sorted ranks that reported it)."""
    pattern = re.compile(case.message)
    lines = [ln for ln in out.splitlines() if pattern.search(ln)]
    ranks = set()
    for ln in lines:
        m = re.match(r"\[rank (\d+)", ln)
        if m:
            ranks.add(int(m.group(1)))
    for record in workdir.glob("rank*.exc"):
        if pattern.search(record.read_text()):
            ranks.add(int(record.stem[4:]))
    if lines and not ranks and isinstance(case.reporter, int):
        ranks.add(case.reporter)  # printed by rank 0 only, without a rank prefix
    return (lines[0].strip() if lines else ""), sorted(ranks)


def verify_checkpoints(ckpt_dir, runner, hidden=HIDDEN, mlp_train=False, amp=False):
    """({step: 'ok' | error}, [temporary files left]) from a 1-rank job that loads every checkpoint."""
    argv = driver_argv("verify", ckpt_dir, "--hidden", hidden, *(["--mlp-train"] if mlp_train else []),
                       *(["--amp"] if amp else []))
    rc, out, _ = runner(argv, np=None, timeout=60, env={"FAULT": ""})
    for ln in out.splitlines():
        if ln.startswith("{"):
            report = json.loads(ln)
            return {int(k): v for k, v in report["checkpoints"].items()}, report["leftovers"]
    return {"verify": f"the verify job failed (rc {rc}): {out[-500:]}"}, []


# --- the job ----------------------------------------------------------------------------------

def make_data():
    """A learnable synthetic problem: (x float32 (SAMPLES, IN_FEATURES), y int64 (SAMPLES,))."""
    import numpy
    rng = numpy.random.default_rng(0)
    centres = rng.standard_normal((CLASSES, IN_FEATURES)).astype(numpy.float32)
    y = rng.integers(0, CLASSES, SAMPLES)
    x = centres[y] + 0.5 * rng.standard_normal((SAMPLES, IN_FEATURES)).astype(numpy.float32)
    return x.astype(numpy.float32), y.astype(numpy.int64)


def _launched_rank():
    for var in ("PMI_RANK", "OMPI_COMM_WORLD_RANK", "PMIX_RANK"):
        if var in os.environ:
            return int(os.environ[var])
    return 0


class Fault:
    """What FAULT* asks this rank to do, and the record of when it did it."""

    def __init__(self, workdir):
        self.kind = os.environ.get("FAULT", "")
        self.rank = int(os.environ.get("FAULT_RANK", "1"))
        self.step = int(os.environ.get("FAULT_STEP", "3"))
        self.dir = Path(workdir)
        self.me = _launched_rank()

    def here(self, kind, step=None):
        """True on the failing rank when ``kind`` is the fault (at ``step``, if given)."""
        return self.kind == kind and self.me == self.rank and (step is None or step == self.step)

    def mark(self):
        (self.dir / f"fault.{self.me}").write_text(repr(time.time()))


def _launched_size():
    for var in ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE"):
        if var in os.environ:
            return int(os.environ[var])
    return 1


def _record(workdir, exc, linger_s=1.0):
    """Write this rank's exception before it propagates (the first rank's abort kills the others).

    An mpidp error decided collectively is raised on every rank at once; to see that, this rank
    waits (at most ``linger_s``, in practice milliseconds) until every rank has written its record.
    """
    text = f"{type(exc).__name__}: {exc}".splitlines()[0]
    try:
        (Path(workdir) / f"rank{_launched_rank()}.exc").write_text(text)
    except OSError:
        return
    mpidp = sys.modules.get("mpidp")
    if mpidp is not None and isinstance(exc, mpidp.MpidpError):
        deadline = time.monotonic() + linger_s
        while len(list(Path(workdir).glob("rank*.exc"))) < _launched_size() and time.monotonic() < deadline:
            time.sleep(0.002)


def build(hidden, seed=0):
    from mpidp import models
    return models.mlp(in_features=IN_FEATURES, hidden=(hidden,), num_classes=CLASSES, seed=seed)


def train(argv):
    import argparse
    p = argparse.ArgumentParser(prog="fault_cases.py train")
    p.add_argument("--dir", required=True)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--ckpt-every", type=int, default=2)
    p.add_argument("--hidden", type=int, default=HIDDEN)
    p.add_argument("--resume", action="store_true")
    p.add_argument("--npy", action="store_true", help="read memory-mapped x.npy / y.npy from --dir")
    p.add_argument("--no-broadcast", action="store_true")
    p.add_argument("--amp", action="store_true", help="float16 compute, dynamic loss scale (mpidp.amp)")
    args = p.parse_args(argv)
    try:
        _train(args, Fault(args.dir))
    except SystemExit:
        raise
    except BaseException as exc:
        _record(args.dir, exc)
        raise


def _train(args, fault):
    import signal

    import numpy

    if fault.here("init_before"):
        fault.mark()
        raise RuntimeError("injected failure before mpidp.init()")
    import mpidp
    from mpidp import amp, checkpoint, data, nn, optim
    mpidp.init()
    rank = mpidp.rank()
    if fault.here("init"):
        fault.mark()
        raise RuntimeError("injected failure right after mpidp.init()")
    workdir, ckpt_dir = Path(args.dir), Path(args.dir) / "ckpt"
    if args.npy:
        dataset = data.NpyDataset(workdir / "x.npy", workdir / "y.npy")
    else:
        dataset = data.ArrayDataset(*make_data())
    hidden = args.hidden
    if fault.here("mismatch"):
        fault.mark()
        hidden += 1
    model = build(hidden)
    if not args.no_broadcast:
        mpidp.broadcast_parameters(model, root_rank=0)
    inner = optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    mp = amp.MixedPrecision(model, inner, dtype="float16", init_scale=1024.0) if args.amp else None
    opt = mpidp.DistributedOptimizer(mp or inner, model=model)
    sampler = data.DistributedSampler(len(dataset), shuffle=True, seed=0)
    crit = nn.CrossEntropyLoss()
    step = 0
    if args.resume:
        step = int(checkpoint.load(ckpt_dir, model, opt, sampler=sampler)["step"])
    if not args.no_broadcast:
        mpidp.broadcast_optimizer_state(opt, root_rank=0)
    current = [0]  # the step being computed, seen by the hooks below

    def forward_fault(module, x, y):
        if fault.here("forward", current[0]):
            fault.mark()
            raise RuntimeError(f"injected failure in forward of the last layer at step {current[0]}")

    def backward_fault(module, dy):
        if fault.here("backward", current[0]):
            started = sum(b.handle is not None for b in opt.buckets)
            fault.mark()
            raise RuntimeError(f"injected failure inside backward ({started} of {len(opt.buckets)} "
                               f"gradient buckets in flight) at step {current[0]}")

    model[-1].register_forward_hook(forward_fault)
    model[0].register_backward_pre_hook(backward_fault)
    inner_step = inner.step

    def step_fault():
        if fault.here("step", current[0]):
            fault.mark()
            raise RuntimeError(f"injected failure in optimizer.step at step {current[0]}")
        return inner_step()

    inner.step = step_fault
    loss = float("nan")
    while step < args.steps:
        sampler.set_epoch(step * BATCH // max(1, len(sampler)))  # a resumed run keeps its position
        for x, y in data.loader(dataset, sampler, BATCH, drop_last=True):
            current[0] = s = step + 1
            _before_step(fault, s)
            if fault.kind in ("nan", "inf") and fault.here(fault.kind, s):
                fault.mark()
                x = numpy.full_like(x, numpy.nan if fault.kind == "nan" else numpy.inf)
            if fault.here("exit", s):
                fault.mark()
                return  # this rank leaves without shutdown(); the others wait in the next collective
            opt.zero_grad()
            if mp is not None:
                x = x.astype(mp.dtype)
            loss = crit(model(x), y)
            model.backward(crit.backward(mp.loss_scale if mp else 1.0))
            opt.step()
            step = s
            if fault.here("skip", s) or fault.here("skip_exit", s):
                fault.mark()
                if fault.kind == "skip_exit":
                    mpidp.shutdown()  # "done": never joins the others' last collective
                    return
            else:
                loss = float(mpidp.allreduce(numpy.array([loss]), name="loss")[0])
            if rank == 0:
                print(f"step {step} loss {loss:.4f}", flush=True)
            if args.ckpt_every and step % args.ckpt_every == 0:
                _before_save(fault, step, model, signal)
                checkpoint.save(ckpt_dir, model, opt, step=step, sampler=sampler, keep=0)
            if step >= args.steps:
                break
    finite = all(bool(numpy.isfinite(p.data.astype(numpy.float32)).all()) for p in model.parameters())
    finite = bool(mpidp.allreduce(numpy.array([int(finite)]), op=mpidp.Min, name="finite")[0])
    mpidp.check_replicas(model)
    if rank == 0:
        print(f"final: step {step}, loss {loss:.4f}, finite parameters: {'yes' if finite else 'no'}, "
              f"check_replicas: identical"
              + (f", amp skipped {mp.skipped_steps} step(s), loss scale {mp.loss_scale:g}" if mp else ""),
              flush=True)
    mpidp.shutdown()


def _before_step(fault, s):
    """Delete the data file; or (SIGKILL / SIGTERM) every rank runs a burst of large allreduces and the
    failing rank dies inside it."""
    import signal
    import threading

    import numpy

    import mpidp
    if fault.here("data_gone", s):
        fault.mark()
        os.remove(fault.dir / "x.npy")  # the loader reads the next batches from this memory map
    if fault.kind not in ("sigkill", "sigterm", "node_kill", "link_cut") or s != fault.step:
        return
    if fault.kind == "node_kill":  # every rank of the failing rank's node, at once
        if (fault.dir / f"fault.{fault.rank}").exists():
            return  # once: a job restarted by mpidprun --restarts runs on
        node = os.environ.get("MPIDP_SIM_NODE")
        pids = [pid for n, pid in mpidp.allgather_object((node, os.getpid())) if n == node]
        if fault.me == fault.rank:
            def kill_node():
                fault.mark()
                for pid in sorted(pids, key=lambda p: p == os.getpid()):
                    os.kill(pid, signal.SIGKILL)

            threading.Timer(0.3, kill_node).start()
    elif fault.kind == "link_cut":  # every connection between the two nodes blackholed
        mpidp.allreduce(numpy.ones(BURST_ELEMENTS, numpy.float32), name="connect")
        mpidp.barrier()
        if fault.me == fault.rank:
            from mpidp.launch import simcluster
            fault.mark()
            ports = simcluster.cut_link(os.environ["MPIDP_SIM_JOB"], 0, 1)
            print(f"[rank {fault.me}] cut the link between node 0 and node 1 (TCP ports {ports})", flush=True)
    elif fault.me == fault.rank:
        sig = signal.SIGKILL if fault.kind == "sigkill" else signal.SIGTERM

        def die():
            fault.mark()
            os.kill(os.getpid(), sig)

        threading.Timer(0.3, die).start()
    big = numpy.ones(BURST_ELEMENTS, numpy.float32)
    deadline = time.monotonic() + 20  # the failing rank dies 0.3 s in, while all ranks are in this loop
    while time.monotonic() < deadline:
        mpidp.allreduce_(big, op=mpidp.Sum, name="burst")
        big.fill(1.0)


def _before_save(fault, step, model, signal):
    import errno
    if fault.here("save_exception", step):
        def broken():
            raise RuntimeError(f"injected failure while saving the checkpoint of step {step}")
        fault.mark()
        model.rng_state = broken  # called by checkpoint.save on every rank
    elif fault.here("save_io", step) or fault.here("save_kill", step):
        def failing_fsync(fd):
            fault.mark()
            if fault.kind == "save_kill":
                os.kill(os.getpid(), signal.SIGKILL)
            raise OSError(errno.EIO, "injected I/O error")

        os.fsync = failing_fsync  # the data is in the temporary file; its fsync fails
    elif fault.here("disk_full", step):
        import resource
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG
        fault.mark()
        resource.setrlimit(resource.RLIMIT_FSIZE, (4096, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))


def verify(argv):
    """Load every checkpoint of a directory in a fresh 1-rank model; print a JSON report."""
    import argparse
    p = argparse.ArgumentParser(prog="fault_cases.py verify")
    p.add_argument("directory")
    p.add_argument("--hidden", type=int, default=HIDDEN)
    p.add_argument("--mlp-train", action="store_true", help="checkpoints of python -m mpidp.train --model mlp")
    p.add_argument("--amp", action="store_true", help="checkpoints of a float16 MixedPrecision run")
    args = p.parse_args(argv)
    import numpy

    import mpidp
    from mpidp import amp, checkpoint, data, models, optim
    mpidp.init()
    report = {}
    for step, path in checkpoint.list_checkpoints(args.directory):
        if args.mlp_train:
            model = models.mlp(in_features=64, num_classes=10)
        else:
            model = build(args.hidden)
        opt = optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        if args.amp:
            opt = amp.MixedPrecision(model, opt, dtype="float16")
        sampler = data.DistributedSampler(SAMPLES, rank=0, size=1)
        try:
            checkpoint.load(path, model, opt, sampler=None if args.mlp_train else sampler)
            finite = all(bool(numpy.isfinite(p.data.astype(numpy.float32)).all()) for p in model.parameters())
            report[step] = "ok" if finite else "ok (non-finite parameters)"
        except mpidp.CheckpointError as exc:
            report[step] = f"CheckpointError: {exc}"
    leftovers = sorted(n for n in os.listdir(args.directory) if n.endswith(".tmp")) \
        if os.path.isdir(args.directory) else []
    print(json.dumps({"checkpoints": report, "leftovers": leftovers}), flush=True)
    mpidp.shutdown()


def mpidp_train(argv):
    """``python -m mpidp.train`` with SIGTERM sent to FAULT_RANK by itself at FAULT_STEP (sigterm_ckpt)."""
    import signal

    from mpidp import train as job
    fault = Fault(os.environ.get("FAULT_DIR", "."))
    progress_step = job.Progress.step

    def step(self, step, *rest):
        if fault.here("sigterm_ckpt", step):
            fault.mark()
            os.kill(os.getpid(), signal.SIGTERM)  # as a scheduler does before the time limit
        return progress_step(self, step, *rest)

    job.Progress.step = step
    try:
        job.main(argv)
    except SystemExit:
        raise
    except BaseException as exc:
        _record(fault.dir, exc)
        raise


if __name__ == "__main__":
    command, rest = sys.argv[1], sys.argv[2:]
    if rest[:1] == ["--"]:
        rest = rest[1:]
    {"train": train, "verify": verify, "mpidp-train": mpidp_train}[command](rest)
