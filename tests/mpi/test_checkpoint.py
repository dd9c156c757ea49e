"""Checkpoints at any rank count: bit-identical round trips, keep-K, and every failure raised on every rank."""
import os
import shutil
import tempfile
import zipfile

import numpy
import pytest

import mpidp
from mpidp import checkpoint
from mpidp.backend import bfloat16
from mpidp.data import DistributedSampler


@pytest.fixture
def ckdir(rank):
    """One directory every rank names (rank 0 creates it; the ranks share this machine's file system)."""
    path = mpidp.broadcast_object(tempfile.mkdtemp(prefix="mpidp-ckpt-") if rank == 0 else None)
    yield path
    mpidp.barrier()
    if rank == 0:
        shutil.rmtree(path, ignore_errors=True)


class Model:
    """Stand-in with the nn.Module checkpoint protocol; arrays and dropout stream differ per rank."""

    def __init__(self, seed, hidden=5):
        rng = numpy.random.default_rng(seed)
        self.params = {"0.weight": rng.standard_normal((4, hidden)).astype(numpy.float32),
                       "0.bias": rng.standard_normal(hidden).astype(numpy.float64),
                       "1.scale": rng.standard_normal((2, 3)).astype(numpy.float16),
                       "1.count": rng.integers(0, 9, size=(3,)),
                       "empty": numpy.zeros((0, 3), dtype=numpy.float32)}
        if bfloat16 is not None:
            self.params["2.weight"] = rng.standard_normal(6).astype(bfloat16)
        self.dropout = numpy.random.default_rng([seed, 99])

    def state_dict(self):
        return dict(self.params)

    def load_state_dict(self, state):
        if set(state) != set(self.params):
            raise KeyError(f"keys differ: {sorted(set(state) ^ set(self.params))}")
        for k, v in state.items():
            self.params[k][...] = v

    def rng_state(self):
        return {"2": self.dropout.bit_generator.state}

    def set_rng_state(self, states):
        self.dropout.bit_generator.state = states["2"]


class Optimizer:
    """Stand-in with the optim.Optimizer state_dict layout: int-keyed state, ints and arrays, param groups."""

    def __init__(self, seed):
        rng = numpy.random.default_rng(seed + 1000)
        self.state = {0: {"step": seed + 3, "exp_avg": rng.standard_normal((4, 5)).astype(numpy.float32),
                          "exp_avg_sq": rng.random((4, 5)).astype(numpy.float32)},
                      2: {"step": seed + 3, "momentum_buffer": rng.standard_normal((2, 3)).astype(numpy.float16)}}
        self.param_groups = [{"params": [0, 1], "lr": 0.1 * (seed + 1), "betas": (0.9, 0.999), "eps": 1e-8,
                              "amsgrad": False, "name": None},
                             {"params": [2], "lr": 1.0 / 3.0, "weight_decay": float(seed)}]

    def state_dict(self):
        return {"state": self.state, "param_groups": self.param_groups}

    def load_state_dict(self, state):
        self.state = {i: {k: (v.copy() if hasattr(v, "copy") and not isinstance(v, int) else v)
                          for k, v in entry.items()} for i, entry in state["state"].items()}
        self.param_groups = state["param_groups"]


class Scaler:
    def __init__(self, scale):
        self.scale, self.growth_tracker, self.found_inf = float(scale), int(scale) % 7, scale > 3

    def state_dict(self):
        return {"scale": self.scale, "growth_tracker": self.growth_tracker, "found_inf": self.found_inf}

    def load_state_dict(self, state):
        self.scale, self.growth_tracker, self.found_inf = state["scale"], state["growth_tracker"], state["found_inf"]


def everything(seed, rank, size):
    sampler = DistributedSampler(53, seed=7, rank=rank, size=size)
    sampler.set_epoch(seed % 5)
    sampler.advance(seed % 9)
    return dict(model=Model(seed), optimizer=Optimizer(seed), sampler=sampler, scaler=Scaler(seed + 0.5),
                rng=numpy.random.default_rng([seed, rank]))


def same(a, b):
    """Exactly equal nested values, with the same types and dtypes (NaN-free inputs)."""
    if isinstance(a, dict):
        return isinstance(b, dict) and list(a) == list(b) and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    if hasattr(a, "dtype"):
        return hasattr(b, "dtype") and a.dtype == b.dtype and a.shape == b.shape and \
            a.tobytes() == b.tobytes()
    return type(a) is type(b) and a == b


def test_round_trip_is_bit_identical_on_every_rank(ckdir, rank, size):
    saved = everything(seed=rank, rank=rank, size=size)  # per-rank values: rank 0's are the ones saved
    numpy.random.seed(100 + rank)
    numpy.random.random(3)
    legacy = numpy.random.get_state()
    extra = {"scheduler": {"last_step": 12, "base_lrs": [0.1, 0.2]}, "note": "hello", "ids": numpy.arange(4),
             7: (1, 2.5)}
    path = checkpoint.save(ckdir, saved["model"], saved["optimizer"], step=12, extra=extra,
                           sampler=saved["sampler"], scaler=saved["scaler"], rng=saved["rng"])
    assert path == os.path.join(ckdir, "ckpt-00000012.npz")
    rank0 = everything(seed=0, rank=rank, size=size)  # what rank 0 held at save time
    rng_then = saved["rng"].bit_generator.state
    dropout_then = saved["model"].dropout.bit_generator.state

    numpy.random.random(5)
    saved["rng"].random(10)
    saved["model"].dropout.random(10)
    fresh = everything(seed=50 + rank, rank=rank, size=size)
    fresh["rng"] = saved["rng"]
    fresh["model"].dropout = saved["model"].dropout
    info = checkpoint.load(ckdir, **fresh)

    assert info["step"] == 12 and info["path"] == path and info["size"] == size
    assert same(info["extra"], extra)
    assert same(fresh["model"].state_dict(), rank0["model"].state_dict())
    assert same(fresh["optimizer"].state_dict(), rank0["optimizer"].state_dict())
    assert type(fresh["optimizer"].state_dict()["state"][0]["step"]) is int
    assert fresh["sampler"].state_dict() == rank0["sampler"].state_dict()
    assert fresh["scaler"].state_dict() == rank0["scaler"].state_dict()
    # random streams are per rank: each rank gets back its own
    assert fresh["rng"].bit_generator.state == rng_then
    assert fresh["model"].dropout.bit_generator.state == dropout_then
    assert same(numpy.random.get_state(), legacy)
    # and every rank holds the same values
    digest = [fresh["model"].params[k].tobytes() for k in sorted(fresh["model"].params)]
    assert all(d == digest for d in mpidp.allgather_object(digest))


def test_file_is_one_npz_that_loads_without_pickle(ckdir, rank):
    model = Model(1)
    path = checkpoint.save(ckdir, model, Optimizer(1), step=3)
    if rank == 0:
        with numpy.load(path, allow_pickle=False) as f:
            names = set(f.files)
            assert {"meta", "meta.crc32", "model/0.weight", "optim/state/0/exp_avg"} <= names
            assert (f["model/0.weight"] == model.params["0.weight"]).all()
        assert not [n for n in os.listdir(ckdir) if n.endswith(".tmp")]


def test_the_file_gets_the_permissions_of_any_new_file(ckdir, rank):
    # the umask decides, as for numpy.savez: a temporary file made by mkstemp stayed 0600 after
    # the rename, so a group that shares the folder could not read the checkpoints
    umask = os.umask(0o022)
    os.umask(umask)
    path = checkpoint.save(ckdir, Model(0), step=1)
    if rank == 0:
        assert os.stat(path).st_mode & 0o777 == 0o666 & ~umask


def test_keep_the_last_k_and_pick_a_step(ckdir, rank):
    model = Model(rank)
    for step in (1, 2, 3, 10, 11):
        checkpoint.save(ckdir, model, step=step, keep=2, extra={"step": step})
    assert checkpoint.latest_step(ckdir) == 11
    assert checkpoint.latest(ckdir) == checkpoint.checkpoint_path(ckdir, 11)
    assert [s for s, _ in checkpoint.list_checkpoints(ckdir)] == [10, 11]
    assert checkpoint.load(ckdir, Model(9), step=10)["extra"] == {"step": 10}
    assert checkpoint.load(checkpoint.checkpoint_path(ckdir, 11), Model(9))["step"] == 11
    checkpoint.save(ckdir, model, step=12, keep=None)
    checkpoint.save(ckdir, model, step=13, keep=0)
    assert [s for s, _ in checkpoint.list_checkpoints(ckdir)] == [10, 11, 12, 13]
    assert checkpoint.latest(os.path.join(ckdir, "nowhere")) is None


def test_going_on_from_an_older_step_sets_the_abandoned_steps_aside(ckdir, rank):
    # a run rewound to step 2 (it diverged later) and went on: keep= pruned the new steps 3, 4 while
    # the abandoned 5 stayed the latest, so a --resume would continue the run that diverged
    for step in range(1, 6):
        checkpoint.save(ckdir, Model(0), step=step, keep=3, extra={"branch": "old"})
    checkpoint.load(ckdir, Model(9), step=3)
    for step in (3, 4):
        checkpoint.save(ckdir, Model(1), step=step, keep=3, extra={"branch": "new"})
    assert checkpoint.latest_step(ckdir) == 4
    assert [(s, checkpoint.load(path, Model(9))["extra"]["branch"]) for s, path in
            checkpoint.list_checkpoints(ckdir)] == [(3, "new"), (4, "new")]
    assert checkpoint.load(ckdir, Model(9))["extra"] == {"branch": "new"}
    if rank == 0:  # nothing lost: the abandoned steps 4 and 5 are set aside under names no listing takes
        aside = sorted(n for n in os.listdir(ckdir) if "abandoned" in n)
        assert [n[:len("ckpt-00000004.abandoned-")] for n in aside] == \
            ["ckpt-00000004.abandoned-", "ckpt-00000005.abandoned-"], aside


def test_the_folders_a_save_makes_are_synced_in_their_parents(ckdir, rank, monkeypatch):
    # a power loss right after the first checkpoint could lose the new folder (and the checkpoint in it)
    synced = []
    real = checkpoint._fsync_dir
    monkeypatch.setattr(checkpoint, "_fsync_dir", lambda d: (synced.append(os.path.abspath(d)), real(d)))
    target = os.path.join(ckdir, "runs", "a")
    checkpoint.save(target, Model(0), step=1)
    if rank == 0:
        for folder in (ckdir, os.path.join(ckdir, "runs"), target):
            assert os.path.abspath(folder) in synced, (folder, synced)


def test_load_onto_a_model_and_optimizer_that_have_never_stepped(ckdir):
    saved = Model(0)
    checkpoint.save(ckdir, saved, Optimizer(0), step=1)
    model, opt = Model(5), Optimizer(5)
    opt.state = {}
    checkpoint.load(ckdir, model, opt)
    assert same(opt.state_dict()["state"], Optimizer(0).state_dict()["state"])


# --- failures: decided on rank 0, raised on every rank ----------------------------------------------

def _damage(path, how):
    data = bytearray(open(path, "rb").read())
    if how == "truncated":
        data = data[: len(data) // 2]
    elif how == "corrupt":  # flip bytes inside the stored weights, not in any header
        with zipfile.ZipFile(path) as z:
            info = z.getinfo("model/0.weight.npy")
        start = info.header_offset + 30 + len(info.filename) + len(info.extra) + 128
        for i in range(start, start + 8):
            data[i] ^= 0xFF
    elif how == "empty":
        data = b""
    with open(path, "wb") as f:
        f.write(data)


@pytest.mark.parametrize("how, match", [
    ("truncated", "is truncated or not a checkpoint|is corrupt or truncated"),
    ("corrupt", r"is corrupt: field 'model/0\.weight' fails its crc32 check|is corrupt or truncated"),
    ("empty", "is truncated or not a checkpoint"),
])
def test_damaged_files_fail_on_every_rank_and_the_previous_one_still_loads(ckdir, rank, how, match):
    model = Model(0)
    checkpoint.save(ckdir, model, step=1)
    path = checkpoint.save(ckdir, Model(1), step=2)
    if rank == 0:
        _damage(path, how)
    mpidp.barrier()
    with pytest.raises(mpidp.CheckpointError, match=match) as info:
        checkpoint.load(ckdir, Model(3))
    assert path in str(info.value)
    fresh = Model(3)
    checkpoint.load(ckdir, fresh, step=1)
    assert same(fresh.state_dict(), model.state_dict())


def test_not_a_checkpoint(ckdir, rank):
    path = os.path.join(ckdir, "ckpt-00000004.npz")
    if rank == 0:
        numpy.savez(path, weights=numpy.zeros(3))
    mpidp.barrier()
    with pytest.raises(mpidp.CheckpointError, match="has no 'meta' entry"):
        checkpoint.load(ckdir, Model(0))


def test_missing_checkpoints(ckdir):
    with pytest.raises(mpidp.CheckpointError, match=r"no checkpoint \(ckpt-\*\.npz\) in " + ckdir):
        checkpoint.load(ckdir, Model(0))
    missing = os.path.join(ckdir, "gone", "ckpt-00000001.npz")
    with pytest.raises(mpidp.CheckpointError, match=f"checkpoint {missing} does not exist"):
        checkpoint.load(missing, Model(0))
    checkpoint.save(ckdir, Model(0), step=5)
    with pytest.raises(mpidp.CheckpointError, match="ckpt-00000004.npz does not exist"):
        checkpoint.load(ckdir, Model(0), step=4)


@pytest.mark.parametrize("change, match", [
    (lambda m: m.params.__setitem__("0.weight", numpy.zeros((4, 6), numpy.float32)),
     r"parameter '0\.weight' is \(4, 5\) float32 in the checkpoint but \(4, 6\) float32 in the model"),
    (lambda m: m.params.__setitem__("0.bias", m.params["0.bias"].astype(numpy.float32)),
     r"parameter '0\.bias' is \(5,\) float64 in the checkpoint but \(5,\) float32"),
    (lambda m: m.params.__setitem__("3.new", numpy.zeros(2)), r"it has no parameter '3\.new'"),
    (lambda m: m.params.pop("1.scale"), r"it has parameters \['1\.scale'\] the model does not have"),
])
def test_a_checkpoint_of_another_model_names_the_parameter(ckdir, change, match):
    path = checkpoint.save(ckdir, Model(0), step=1)
    other = Model(0)
    change(other)
    before = {k: v.copy() for k, v in other.params.items()}
    with pytest.raises(mpidp.CheckpointError, match=match) as info:
        checkpoint.load(ckdir, other)
    assert path in str(info.value)
    assert same(other.params, before), "a refused checkpoint must leave the model untouched"


def test_asking_for_state_the_checkpoint_lacks(ckdir, rank, size):
    checkpoint.save(ckdir, Model(0), step=1)
    with pytest.raises(mpidp.CheckpointError, match="has no optim state"):
        checkpoint.load(ckdir, Model(0), Optimizer(0))
    with pytest.raises(mpidp.CheckpointError, match="has no sampler state"):
        checkpoint.load(ckdir, Model(0), sampler=DistributedSampler(10, rank=rank, size=size))


def test_optimizer_state_that_does_not_fit_fails_everywhere(ckdir):
    class Strict(Optimizer):
        def load_state_dict(self, state):
            if len(state["param_groups"]) != 3:
                raise ValueError(f"the state has {len(state['param_groups'])} param groups but this optimizer has 3")

    checkpoint.save(ckdir, Model(0), Optimizer(0), step=1)
    with pytest.raises(mpidp.CheckpointError, match="has 2 param groups but this optimizer has 3"):
        checkpoint.load(ckdir, Model(0), Strict(0))


def test_a_failed_save_raises_on_every_rank_and_keeps_the_previous(ckdir, rank):
    checkpoint.save(ckdir, Model(0), step=1)
    with pytest.raises(mpidp.CheckpointError, match="cannot store a set at 'extra/bad'") as info:
        checkpoint.save(ckdir, Model(1), step=2, extra={"bad": {1, 2}})
    assert "the previous checkpoint is unchanged" in str(info.value)
    blocked = os.path.join(ckdir, "file")
    if rank == 0:
        open(blocked, "w").close()
    mpidp.barrier()
    with pytest.raises(mpidp.CheckpointError, match=f"could not save checkpoint step 3 in {blocked}"):
        checkpoint.save(blocked, Model(1), step=3)
    assert checkpoint.latest_step(ckdir) == 1
    assert not [n for n in os.listdir(ckdir) if n.endswith(".tmp")]
    fresh = Model(5)
    checkpoint.load(ckdir, fresh)
    assert same(fresh.state_dict(), Model(0).state_dict())


def test_a_resumed_sampler_continues_mid_epoch(ckdir, rank, size):
    full = DistributedSampler(37, seed=3, rank=rank, size=size)
    full.set_epoch(2)
    order = list(full)
    s = DistributedSampler(37, seed=3, rank=rank, size=size)
    s.set_epoch(2)
    head = [i for _, i in zip(range(4), s)]  # range first: zip must not pull a fifth index
    checkpoint.save(ckdir, Model(0), step=4, sampler=s)
    resumed = DistributedSampler(37, seed=3, rank=rank, size=size)
    checkpoint.load(ckdir, Model(0), sampler=resumed)
    resumed.set_epoch(2)
    assert head + list(resumed) == order


# --- the real nn / optim / DistributedOptimizer -------------------------------------------------------

def _train(model, opt, steps, rank, seed):
    from mpidp import nn
    crit = nn.CrossEntropyLoss()
    rng = numpy.random.default_rng([seed, rank])
    for _ in range(steps):
        x = rng.standard_normal((6, 8)).astype(numpy.float32)
        y = rng.integers(0, 3, 6)
        opt.zero_grad()
        crit(model(x), y)
        model.backward(crit.backward())
        opt.step()
    return rng


@pytest.mark.parametrize("wrapper", ["DistributedOptimizer", "ShardedOptimizer"])
def test_interrupted_and_resumed_training_is_bit_identical(ckdir, rank, wrapper):
    nn = pytest.importorskip("mpidp.nn")
    optim = pytest.importorskip("mpidp.optim")
    if not hasattr(mpidp, wrapper):
        pytest.skip(f"mpidp.{wrapper} is not in this tree")

    def build():
        nn.manual_seed(11)
        model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Dropout(0.3), nn.Linear(16, 3))
        opt = getattr(mpidp, wrapper)(optim.Adam(model.parameters(), lr=1e-2), model=model)
        mpidp.broadcast_parameters(model, root_rank=0)
        return model, opt

    model, opt = build()
    rng = _train(model, opt, 3, rank, seed=1)
    checkpoint.save(ckdir, model, opt, step=3, rng=rng)
    _train(model, opt, 4, rank, seed=2)
    straight = {k: v.copy() for k, v in model.state_dict().items()}

    model, opt = build()  # a new process: fresh model, optimizer without state, fresh streams
    rng = numpy.random.default_rng(0)
    assert checkpoint.load(ckdir, model, opt, rng=rng)["step"] == 3
    _train(model, opt, 4, rank, seed=2)
    resumed = model.state_dict()
    for name, value in straight.items():
        assert value.tobytes() == resumed[name].tobytes(), f"{name} differs after resume"


def test_device_arrays_round_trip(ckdir, xp):
    """Model and optimizer state on the array module of the run (CuPy on a GPU) save and load exactly."""
    class DeviceModel(Model):
        def __init__(self, seed):
            super().__init__(seed)
            self.params = {k: xp.asarray(v) for k, v in self.params.items() if v.dtype != bfloat16}

    class DeviceOptimizer(Optimizer):
        def load_state_dict(self, state):
            super().load_state_dict(state)
            self.state = {i: {k: (xp.asarray(v) if hasattr(v, "dtype") else v) for k, v in e.items()}
                          for i, e in self.state.items()}

    saved, opt = DeviceModel(0), DeviceOptimizer(0)
    opt.state[0]["exp_avg"] = xp.asarray(opt.state[0]["exp_avg"])
    checkpoint.save(ckdir, saved, opt, step=1)
    fresh, fresh_opt = DeviceModel(4), DeviceOptimizer(4)
    checkpoint.load(ckdir, fresh, fresh_opt)
    for k, v in saved.params.items():
        assert type(fresh.params[k]) is type(v) and fresh.params[k].dtype == v.dtype
        assert (fresh.params[k] == v).all()
    assert type(fresh_opt.state[0]["exp_avg"]) is type(opt.state[0]["exp_avg"])
    assert (fresh_opt.state[0]["exp_avg"] == opt.state[0]["exp_avg"]).all()
