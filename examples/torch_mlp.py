"""A PyTorch model trained data-parallel with mpidp: gradients averaged over the ranks.

    mpiexec -n 2 python examples/torch_mlp.py --check

mpidp's collectives take PyTorch CPU tensors as they are (through DLPack, no copy): the
parameters are broadcast from rank 0 and, after each backward pass, every gradient is
averaged in place in one fused exchange. ``--check`` has rank 0 retrain the model in one
process on the whole global batch and compare: N ranks x batch B must give the same
parameters as one process x batch N*B.
"""
import argparse
import sys

try:
    import torch
except ImportError:  # an optional extra: say so instead of a traceback on every rank
    sys.exit("examples/torch_mlp.py needs PyTorch: pip install torch (a CPU build will do)")

import mpidp


def build(seed):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.Tanh(), torch.nn.Linear(64, 4)).double()


def batches(steps, rows):
    g = torch.Generator().manual_seed(1234)
    w = torch.randn(16, 4, generator=g, dtype=torch.float64)
    for _ in range(steps):
        x = torch.randn(rows, 16, generator=g, dtype=torch.float64)
        yield x, (x @ w).argmax(1)


def train(model, steps, batch, rank=0, size=1, distributed=False):
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    loss_fn = torch.nn.CrossEntropyLoss()
    for x, y in batches(steps, batch * size):
        mine = slice(rank * batch, (rank + 1) * batch) if distributed else slice(None)
        opt.zero_grad()
        loss = loss_fn(model(x[mine]), y[mine])
        loss.backward()
        if distributed:  # the one line data parallelism adds: average the gradients in place
            mpidp.grouped_allreduce_([p.grad for p in model.parameters()], op=mpidp.Average)
        opt.step()
    return loss.item()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch", type=int, default=16, help="rows per rank and step")
    parser.add_argument("--check", action="store_true", help="compare with one process on the global batch")
    args = parser.parse_args()
    mpidp.init()
    rank, size = mpidp.rank(), mpidp.size()
    model = build(seed=rank)  # every rank starts elsewhere: the broadcast makes them one
    mpidp.broadcast_parameters(model.state_dict(), root_rank=0)
    loss = train(model, args.steps, args.batch, rank, size, distributed=True)
    mpidp.check_replicas(model.state_dict())  # bit-identical on every rank, or MismatchError
    if rank == 0:
        print(f"{size} ranks, {args.steps} steps: loss {loss:.4f}; replicas identical")
        if args.check:
            ref = build(seed=0)
            train(ref, args.steps, args.batch, size=size)
            gap = max((p - q).abs().max().item() for p, q in zip(model.parameters(), ref.parameters()))
            print(f"largest difference from one process on the global batch: {gap:.2e}")
            if gap > 1e-10:
                raise SystemExit(f"data-parallel training differs from the one-process reference by {gap:.2e}")
    mpidp.shutdown()


if __name__ == "__main__":
    main()
