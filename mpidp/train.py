"""The main job: data-parallel training of a model from mpidp.models on a bundled data set.

    mpidprun -np 2 python scripts/train.py                  # CNN on the digits, ~97% test accuracy
    mpiexec -n 4 python -m mpidp.train --model transformer  # character LM on the bundled text

Every rank trains on its shard; gradients are averaged by the DistributedOptimizer
in overlapped buckets; rank 0 reports. ``--checkpoint-dir`` + ``--resume`` continue
a run so that it ends bit-identical to an uninterrupted one.
"""
import argparse
import json
import os
import signal
import sys
import time
from pathlib import Path

import numpy
from tqdm import tqdm

import mpidp
from mpidp import checkpoint, data, models, nn, optim, timeline
from mpidp.errors import CheckpointError
from mpidp.optim import lr_scheduler


class RunRefused(CheckpointError):
    """The checkpoint folder or the resume does not fit this run's arguments: a usage error (a failed save
    mid-run is a plain CheckpointError, a failure to restart from)."""


REFUSED = 2  # (mpidp.launch.cli.REFUSED)
"""The exit status of a run that refuses its arguments (a checkpoint folder or a resume that does not
fit): the status of a usage error, which ``mpidprun --restarts`` does not restart (the same command
would be refused again; a restart's added ``--resume`` could even continue another run)."""


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="train.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", choices=["mlp", "cnn", "transformer"], default="cnn")
    p.add_argument("--hidden", metavar="W,W,...", type=_widths, default=None,
                   help="mlp hidden layer widths (default 128): e.g. 1024,1024,1024 for a model whose "
                        "backward takes about as long as its gradient exchange on a slow link")
    p.add_argument("--data", metavar="PATH.npz", help="your own data: arrays x and y (default: bundled)")
    p.add_argument("--epochs", type=int, default=15)
    p.add_argument("--batch-size", type=int, default=32, help="per rank")
    p.add_argument("--lr", type=float, default=None,
                   help="learning rate for one rank; scaled by the number of ranks (default per optimizer)")
    p.add_argument("--warmup-epochs", type=float, default=1.0, help="linear warm-up to the scaled lr")
    p.add_argument("--optimizer", choices=["sgd", "adam", "adamw"], default="sgd")
    p.add_argument("--momentum", type=float, default=0.9)
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--compression", choices=["none", "fp16", "bf16"], default="none")
    p.add_argument("--accumulate", type=int, default=1, help="backward passes per optimizer step")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--seq-len", type=int, default=32, help="transformer context length")
    p.add_argument("--checkpoint-dir", metavar="DIR")
    p.add_argument("--checkpoint-every", type=int, default=0, metavar="STEPS",
                   help="also save every N steps (0: at the end of each epoch only)")
    p.add_argument("--keep", type=int, default=3, help="checkpoints kept")
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --checkpoint-dir")
    p.add_argument("--checkpoint-on-signal", action="store_true",
                   help="on SIGTERM/SIGUSR1 (a scheduler's warning) save a checkpoint and exit 143")
    p.add_argument("--max-steps", type=int, default=0, help="stop after this many steps (0: all epochs)")
    p.add_argument("--timeline", metavar="PATH", help="write a Chrome-trace timeline of every rank")
    p.add_argument("--device", choices=["cpu", "gpu"], default="cpu")
    p.add_argument("--progress", choices=["auto", "bar", "log", "none"], default="auto")
    p.add_argument("--log-every", type=int, default=20, metavar="STEPS")
    p.add_argument("--target-accuracy", type=float, default=0.0,
                   help="exit 1 if the final test accuracy is below this")
    p.add_argument("--summary-json", metavar="PATH", help="rank 0 writes the final metrics here")
    args = p.parse_args(argv)
    for name in ("epochs", "batch_size", "accumulate", "keep"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.hidden and args.model != "mlp":
        p.error(f"--hidden is for --model mlp, not {args.model}")
    if args.resume and not args.checkpoint_dir:
        p.error("--resume needs --checkpoint-dir")
    return args


def _widths(text):
    """'1024,1024' -> (1024, 1024); every width a positive integer."""
    try:
        widths = tuple(int(w) for w in text.split(","))
    except ValueError:
        widths = ()
    if not widths or min(widths) < 1:
        raise argparse.ArgumentTypeError(f"expected positive widths separated by commas, got {text!r}")
    return widths


# -- data and model ---------------------------------------------------------------------------------

def load_data(args):
    """(train (x, y), test (x, y), model kwargs) for the chosen model and data set."""
    if args.model == "transformer":
        tokens, vocab = data.datasets.load_text()
        windows = _windows(tokens, args.seq_len)
        cut = int(len(windows[0]) * 0.9)
        train = (windows[0][:cut], windows[1][:cut])
        test = (windows[0][cut:], windows[1][cut:])
        return train, test, {"vocab_size": len(vocab), "seq_len": args.seq_len}
    images = args.model == "cnn"
    if args.data:
        x, y = data.datasets.load_npz(args.data)
        x = x.astype(numpy.float32)
        if images and x.ndim == 2:
            side = int(round(x.shape[1] ** 0.5))
            if side * side != x.shape[1]:
                raise ValueError(f"{args.data}: --model cnn needs square images, x has {x.shape[1]} features")
            x = x.reshape(len(x), 1, side, side)
        n_test = max(1, len(x) // 5)
        train, test = (x[n_test:], y[n_test:]), (x[:n_test], y[:n_test])
    else:
        train = data.datasets.load_digits("train", as_images=images)
        test = data.datasets.load_digits("test", as_images=images)
    x = train[0]
    classes = int(max(train[1].max(), test[1].max())) + 1
    if images:
        return train, test, {"in_channels": x.shape[1], "image_size": x.shape[-1], "num_classes": classes}
    kw = {"hidden": args.hidden} if args.hidden else {}
    return train, test, {"in_features": int(numpy.prod(x.shape[1:])), "num_classes": classes, **kw}


def _windows(tokens, seq_len):
    """Non-overlapping (input, next-token target) windows of the token stream."""
    n = (len(tokens) - 1) // seq_len
    x = tokens[:n * seq_len].reshape(n, seq_len).astype(numpy.int64)
    y = tokens[1:n * seq_len + 1].reshape(n, seq_len).astype(numpy.int64)
    return x, y


def build_optimizer(args, model):
    size = mpidp.size()
    base = args.lr if args.lr is not None else {"sgd": 0.05, "adam": 2e-3, "adamw": 2e-3}[args.optimizer]
    lr = base * size  # linear scaling rule, with warm-up from the one-rank lr
    if args.optimizer == "sgd":
        inner = optim.SGD(model.parameters(), lr=lr, momentum=args.momentum, weight_decay=args.weight_decay)
    else:
        cls = optim.Adam if args.optimizer == "adam" else optim.AdamW
        inner = cls(model.parameters(), lr=lr, weight_decay=args.weight_decay)
    opt = mpidp.DistributedOptimizer(inner, model=model,
                                     compression=mpidp.Compression.by_name(args.compression),
                                     backward_passes_per_step=args.accumulate)
    return opt


# -- the loop ---------------------------------------------------------------------------------------

class Progress:
    """Rank 0's report: a tqdm bar on a terminal (``--progress bar``), plain log lines otherwise."""

    def __init__(self, mode, total_steps, log_every):
        self.on = mpidp.rank() == 0 and mode != "none"
        self.use_bar = mode == "bar" or (mode == "auto" and sys.stdout.isatty())
        self.total, self.every = total_steps, log_every
        self.bar = None  # made at the first step, so a resumed run's bar starts where it resumed

    def step(self, step, epoch, loss, samples_per_s):
        if not self.on:
            return
        if self.use_bar:
            if self.bar is None:
                self.bar = tqdm(total=self.total, initial=step - 1, unit="step", file=sys.stdout,
                                dynamic_ncols=True)
            self.bar.set_postfix_str(f"epoch {epoch} loss {loss:.4f} {samples_per_s:,.0f} samples/s",
                                     refresh=False)
            self.bar.update(step - self.bar.n)
        elif step % self.every == 0 or step == self.total:
            print(f"step {step}/{self.total} epoch {epoch} loss {loss:.4f} {samples_per_s:,.0f} samples/s",
                  flush=True)

    def line(self, text):
        if self.on:
            if self.bar is not None:
                self.bar.write(text, file=sys.stdout)  # above the bar, which is redrawn below
            else:
                print(text, flush=True)

    def close(self):
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def evaluate(model, dataset, batch_size, xp):
    """(mean loss, accuracy) over the whole ``dataset``, each rank a shard, averaged over ranks."""
    model.eval()
    # every sample once: a DistributedSampler pads the shards with other ranks' samples
    mine = numpy.arange(mpidp.rank(), len(dataset[1]), mpidp.size())
    crit = nn.CrossEntropyLoss()
    totals = numpy.zeros(3)
    with nn.no_grad():
        for idx in _batches(mine, batch_size):
            x, y = xp.asarray(dataset[0][idx]), xp.asarray(dataset[1][idx])
            logits = model(x)
            totals += [crit(logits, y) * y.size, float((logits.argmax(-1) == y).sum()), y.size]
    model.train()
    totals = mpidp.allreduce(totals, op=mpidp.Sum, name="eval")
    return totals[0] / totals[2], totals[1] / totals[2]


def _batches(indices, batch_size):
    for i in range(0, len(indices), batch_size):
        yield list(indices[i:i + batch_size])


class StopFlag:
    """SIGTERM/SIGUSR1 set a flag; every rank checks it together at step boundaries."""

    def __init__(self, enabled):
        self.enabled, self.raised = enabled, False
        if enabled:
            for sig in (signal.SIGTERM, signal.SIGUSR1):
                signal.signal(sig, self._set)

    def _set(self, signum, frame):
        self.raised = True

    def agreed(self):
        if not self.enabled:
            return False
        return bool(mpidp.allreduce(numpy.array([int(self.raised)]), op=mpidp.Max, name="stop flag")[0])


def train(args):
    mpidp.init()
    rank, size = mpidp.rank(), mpidp.size()
    xp = mpidp.backend.resolve_module(args.device)
    if args.timeline:
        timeline.start(args.timeline)
    train_set, test_set, model_kw = load_data(args)
    model = models.build(args.model, seed=args.seed, device=args.device, **model_kw)
    mpidp.broadcast_parameters(model, root_rank=0)
    opt = build_optimizer(args, model)
    sampler = data.DistributedSampler(len(train_set[1]), shuffle=True, seed=args.seed)
    micro = args.batch_size
    steps_per_epoch = max(1, len(sampler) // (micro * args.accumulate))
    total_steps = steps_per_epoch * args.epochs
    warmup = int(args.warmup_epochs * steps_per_epoch)
    sched = lr_scheduler.LinearWarmup(opt.optimizer, warmup, start_factor=1.0 / size) if warmup else None
    crit = nn.CrossEntropyLoss()
    step = 0
    found = checkpoint.latest(args.checkpoint_dir) if args.checkpoint_dir and rank == 0 else None
    if args.checkpoint_dir and size > 1:  # rank 0 reads the file: its folder decides, not each rank's view of it
        found = mpidp.broadcast_object(found, root_rank=0, name="train.checkpoints")
    if found and not args.resume:  # its checkpoints would outlive ours (keep=) and a --resume would take them
        raise RunRefused(f"--checkpoint-dir {args.checkpoint_dir} already holds checkpoints of another run "
                              f"(the newest: {found}): pass --resume to continue it, or start over in an empty "
                              f"folder")
    if found:
        info = checkpoint.load(found, model, opt, sampler=sampler)
        if info["size"] != size:  # known on every rank: load broadcast it
            raise RunRefused(f"checkpoint {info['path']} was saved by a job of {info['size']} ranks but this "
                                  f"job has {size}; its steps, epochs and learning rate count that job's global "
                                  f"batch: resume with -np {info['size']}")
        for key, now in (("batch_size", micro), ("accumulate", args.accumulate)):
            was = info["extra"].get("batch", {}).get(key, now)
            if was != now:
                flag = "--" + key.replace("_", "-")
                raise RunRefused(f"checkpoint {info['path']} was saved with {flag} {was} but this run has "
                                      f"{now}; its steps and epochs count batches of that size: resume with "
                                      f"{flag} {was}")
        step = int(info["step"])
        if sched is not None:
            sched.load_state_dict(info["extra"]["scheduler"])
        if rank == 0:
            print(f"resumed from step {step} (epoch {sampler.epoch}, position {sampler.position})", flush=True)
    mpidp.broadcast_optimizer_state(opt, root_rank=0)
    progress = Progress(args.progress, total_steps, args.log_every)
    stop = StopFlag(args.checkpoint_on_signal)
    if rank == 0:
        print(f"mpidp {mpidp.__version__}: {args.model} with {model.num_parameters():,} parameters on "
              f"{size} rank(s) x batch {micro}{f' x {args.accumulate} passes' if args.accumulate > 1 else ''}, "
              f"{len(train_set[1])} training samples, {opt!r}", flush=True)

    def save(reason):
        if args.checkpoint_dir:
            path = checkpoint.save(args.checkpoint_dir, model, opt, step=step, sampler=sampler, keep=args.keep,
                                   extra={"scheduler": sched.state_dict() if sched else {}, "reason": reason,
                                          "batch": {"batch_size": micro, "accumulate": args.accumulate}})
            progress.line(f"checkpoint {path} ({reason})")

    start, samples, interrupted = time.perf_counter(), 0, False
    while step < total_steps and not interrupted:
        epoch = step // steps_per_epoch
        sampler.set_epoch(epoch)
        batches = data.loader(train_set, sampler, micro, drop_last=True, device=args.device)
        for _ in range(steps_per_epoch - step % steps_per_epoch):
            opt.zero_grad()
            loss = 0.0
            for _ in range(args.accumulate):
                x, y = next(batches)
                with timeline.span("forward", "compute"):
                    loss += crit(model(x), y) / args.accumulate
                with timeline.span("backward", "compute"):
                    model.backward(crit.backward() / args.accumulate)
            opt.step()
            if sched is not None:
                sched.step()
            step += 1
            samples += micro * args.accumulate * size
            progress.step(step, epoch, loss, samples / (time.perf_counter() - start))
            if args.checkpoint_every and step % args.checkpoint_every == 0:
                save(f"every {args.checkpoint_every} steps")
            if stop.agreed():
                save("signal")
                interrupted = True
                break
            if args.max_steps and step >= args.max_steps:
                interrupted = True
                break
        if not interrupted and step % steps_per_epoch == 0:
            test_loss, test_acc = evaluate(model, test_set, 256, xp)
            progress.line(f"epoch {epoch + 1}/{args.epochs}: test loss {test_loss:.4f}, "
                          f"test accuracy {test_acc:.4f}")
            if not args.checkpoint_every:
                save(f"end of epoch {epoch + 1}")
    elapsed = time.perf_counter() - start
    progress.close()
    if not interrupted or args.max_steps:
        save("final" if not interrupted else f"--max-steps {args.max_steps}")
    test_loss, test_acc = evaluate(model, test_set, 256, xp)
    mpidp.check_replicas(model)
    summary = {"model": args.model, "ranks": size, "steps": step, "test_loss": float(test_loss),
               "test_accuracy": float(test_acc), "samples_per_s": samples / elapsed if elapsed else 0.0,
               "hidden_communication": opt.hidden_fraction(), "interrupted": interrupted}
    summary["scaling_efficiency"] = _efficiency(args, summary)
    if rank == 0:
        eff = summary["scaling_efficiency"]
        print(f"done: {step} steps in {elapsed:.1f} s, test accuracy {test_acc:.4f}, test loss {test_loss:.4f}, "
              f"{summary['samples_per_s']:,.0f} samples/s on {size} rank(s)"
              + (f", scaling efficiency {eff:.0%} vs 1 rank" if eff else "")
              + f", {summary['hidden_communication']:.0%} of communication hidden behind backward", flush=True)
        if args.summary_json:
            Path(args.summary_json).write_text(json.dumps(summary, indent=2))
    return summary


def _efficiency(args, summary):
    """samples/s vs size x the 1-rank figure of the same setting, remembered from earlier runs."""
    if mpidp.rank() != 0 or summary["interrupted"]:
        return None
    path = Path(os.path.expanduser("~/.cache/mpidp/throughput.json"))
    model = args.model + (f"-{'x'.join(map(str, args.hidden))}" if args.hidden else "")
    key = f"{model}/b{args.batch_size}/a{args.accumulate}/{args.device}/{args.compression}"
    try:
        known = json.loads(path.read_text())
    except (OSError, ValueError):
        known = {}
    if summary["ranks"] == 1:
        known[key] = summary["samples_per_s"]
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(known))
        return None
    one = known.get(key)
    return summary["samples_per_s"] / (summary["ranks"] * one) if one else None


def main(argv=None):
    args = parse_args(argv)
    try:
        summary = train(args)
    except RunRefused as exc:  # raised on every rank alike, from what rank 0 read
        if mpidp.rank() == 0:
            print(f"error: {exc}", file=sys.stderr, flush=True)
        mpidp.shutdown()
        sys.exit(REFUSED)
    rank = mpidp.rank()
    mpidp.shutdown()
    if summary["interrupted"] and args.checkpoint_on_signal and not args.max_steps:
        sys.exit(143)
    if args.target_accuracy and summary["test_accuracy"] < args.target_accuracy and not summary["interrupted"]:
        if rank == 0:
            print(f"test accuracy {summary['test_accuracy']:.4f} is below --target-accuracy "
                  f"{args.target_accuracy}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
