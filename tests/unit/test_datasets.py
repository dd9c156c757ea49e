"""Bundled data sets, user data validation and the prefetching loader (single process)."""
import os
import threading

import numpy
import pytest

from mpidp.backend import cupy_module
from mpidp.data import (ArrayDataset, DistributedSampler, NpyDataset, datasets, load_digits, load_npz,
                        load_text, loader, synthetic, text_windows)


# --- bundled digits ------------------------------------------------------------------------------

def test_bundled_digits_file_is_the_uci_test_set():
    with numpy.load(datasets.DIGITS_PATH, allow_pickle=False) as f:
        x, y = f["x"], f["y"]
    assert x.shape == (1797, 64) and x.dtype == numpy.uint8 and x.max() == 16
    assert y.shape == (1797,) and y.dtype == numpy.int64
    assert numpy.bincount(y).tolist() == [178, 182, 177, 183, 181, 182, 181, 179, 174, 180]
    assert (datasets.DIGITS_PATH.parent / "DIGITS_LICENSE.txt").exists()


def test_digits_split_is_deterministic_stratified_and_disjoint():
    train, test = load_digits("train"), load_digits("test")
    assert len(train.y) + len(test.y) == 1797 and len(test.y) == pytest.approx(0.2 * 1797, abs=10)
    assert train.x.dtype == numpy.float32 and 0.0 <= train.x.min() and train.x.max() == 1.0
    assert train.y.dtype == numpy.int64 and train.y.max() == 9 and train.x.shape[1:] == (64,)
    x, y = train  # XY unpacks like (x, y)
    assert x is train.x and y is train[1]
    for label in range(10):  # every class is in the test set in proportion
        assert abs((test.y == label).mean() - 0.1) < 0.02
    train_idx, test_idx = datasets._stratified_split(load_digits("all").y, 0.2, 0)
    assert not set(train_idx) & set(test_idx) and len(train_idx) + len(test_idx) == 1797
    every = load_digits("all")
    assert (every.x[test_idx] == test.x).all() and (every.y[train_idx] == train.y).all()
    again = load_digits("train")
    assert (again.x == train.x).all() and (again.y == train.y).all()
    assert not numpy.array_equal(load_digits("test", seed=1).y, test.y)
    raw = load_digits("test", normalize=False)
    assert raw.x.dtype == numpy.float32 and raw.x.max() == 16.0
    images = load_digits("test", as_images=True)
    assert images.x.shape == (len(test.y), 1, 8, 8) and (images.x.reshape(-1, 64) == test.x).all()


@pytest.mark.parametrize("kw, match", [(dict(split="val"), "split"), (dict(test_fraction=1.0), "test_fraction")])
def test_digits_bad_arguments(kw, match):
    with pytest.raises(ValueError, match=match):
        load_digits(**kw)


def test_synthetic_is_deterministic_and_learnable_shaped():
    a, b = synthetic(100, (1, 8, 8), 5, seed=3), synthetic(100, (1, 8, 8), 5, seed=3)
    assert a.x.shape == (100, 1, 8, 8) and a.x.dtype == numpy.float32 and a.y.dtype == numpy.int64
    assert (a.x == b.x).all() and (a.y == b.y).all() and a.y.max() < 5
    assert not (synthetic(100, (1, 8, 8), 5, seed=4).x == a.x).all()


# --- the user's .npz -----------------------------------------------------------------------------

def write_npz(tmp_path, name="data.npz", **arrays):
    path = tmp_path / name
    numpy.savez(path, **arrays)
    return path


def test_load_npz_accepts_good_data(tmp_path):
    x = numpy.random.default_rng(0).standard_normal((20, 3)).astype(numpy.float32)
    y = numpy.arange(20) % 4
    ds = load_npz(write_npz(tmp_path, x=x, y=y))
    assert (ds.x == x).all() and (ds.y == y).all()


@pytest.mark.parametrize("arrays, match", [
    (dict(x=numpy.zeros((4, 2))), r"has no array 'y' \(it has \['x'\]\)"),
    (dict(features=numpy.zeros((4, 2)), y=numpy.zeros(4, int)), r"has no array 'x'"),
    (dict(x=numpy.zeros((4, 2)), y=numpy.zeros(3, int)), "'x' has 4 samples but 'y' has 3"),
    (dict(x=numpy.array([["a", "b"]] * 2), y=numpy.zeros(2, int)), "'x' has dtype <U1 which is not numeric"),
    (dict(x=numpy.zeros((4, 2)), y=numpy.zeros(4)), "'y' has dtype float64 but labels must be integers"),
    (dict(x=numpy.zeros(4), y=numpy.zeros(4, int)), r"'x' has shape \(4,\)"),
    (dict(x=numpy.zeros((0, 2)), y=numpy.zeros(0, int)), "empty"),
    (dict(x=numpy.zeros((2, 2)), y=numpy.array([0, -1])), "negative labels"),
    (dict(x=numpy.array([[0.0, numpy.nan]]), y=numpy.zeros(1, int)), "1 NaN or infinite"),
])
def test_load_npz_names_the_file_and_the_problem(tmp_path, arrays, match):
    path = write_npz(tmp_path, **arrays)
    with pytest.raises(ValueError, match=match) as info:
        load_npz(path)
    assert str(path) in str(info.value)


def test_load_npz_object_arrays_missing_and_damaged_files(tmp_path):
    path = write_npz(tmp_path, x=numpy.array([[1, "a"]], dtype=object), y=numpy.zeros(1, int))
    with pytest.raises(ValueError, match="'x' holds Python objects"):
        load_npz(path)
    with pytest.raises(FileNotFoundError, match="nowhere.npz does not exist"):
        load_npz(tmp_path / "nowhere.npz")
    junk = tmp_path / "junk.npz"
    junk.write_bytes(b"not a zip at all")
    with pytest.raises(ValueError, match=f"{junk}: not a readable .npz"):
        load_npz(junk)
    single = tmp_path / "one.npy"
    numpy.save(single, numpy.zeros(3))
    with pytest.raises(ValueError, match="single array"):
        load_npz(single)


# --- memory-mapped .npy --------------------------------------------------------------------------

def npy_pair(tmp_path, n=30):
    x = numpy.arange(n * 4, dtype=numpy.float32).reshape(n, 4)
    y = numpy.arange(n, dtype=numpy.int64) % 3
    numpy.save(tmp_path / "x.npy", x)
    numpy.save(tmp_path / "y.npy", y)
    return tmp_path / "x.npy", tmp_path / "y.npy", x, y


def test_npy_dataset_is_memory_mapped(tmp_path):
    xp_, yp_, x, y = npy_pair(tmp_path)
    ds = NpyDataset(xp_, yp_)
    assert isinstance(ds.x, numpy.memmap) and len(ds) == 30 and ds.num_classes == 3 and ds.sample_shape == (4,)
    bx, by = ds.take(numpy.array([5, 2, 29]))
    assert (bx == x[[5, 2, 29]]).all() and (by == y[[5, 2, 29]]).all() and not isinstance(bx, numpy.memmap)


def test_npy_dataset_validation(tmp_path):
    numpy.save(tmp_path / "x.npy", numpy.zeros((5, 2)))
    numpy.save(tmp_path / "y.npy", numpy.zeros(4, dtype=numpy.int64))
    with pytest.raises(ValueError, match="'x' has 5 samples but 'y' has 4"):
        NpyDataset(tmp_path / "x.npy", tmp_path / "y.npy")
    with pytest.raises(FileNotFoundError, match="missing.npy does not exist"):
        NpyDataset(tmp_path / "x.npy", tmp_path / "missing.npy")


def test_a_data_file_that_disappears_mid_run_is_an_error_naming_it(tmp_path):
    xp_, yp_, x, y = npy_pair(tmp_path, n=40)
    ds = NpyDataset(xp_, yp_)
    sampler = DistributedSampler(len(ds), rank=0, size=1)
    batches = iter(loader(ds, sampler, batch_size=4, prefetch=1))
    next(batches)
    os.remove(xp_)
    with pytest.raises(FileNotFoundError, match=f"data file {xp_} disappeared during the run"):
        for _ in batches:
            pass
    numpy.save(xp_, x[:10])  # replaced by another (shorter) file: reading on would be stale or SIGBUS
    with pytest.raises(ValueError, match=f"data file {xp_} changed during the run"):
        ds.take(numpy.array([0]))


# --- text ----------------------------------------------------------------------------------------

def test_load_text_character_tokens(tmp_path):
    path = tmp_path / "t.txt"
    path.write_text("hello world\n", encoding="utf-8")
    tokens, vocab = load_text(path)
    assert vocab == "\n dehlorw" and tokens.dtype == numpy.int64
    assert "".join(vocab[t] for t in tokens) == "hello world\n"
    with pytest.raises(ValueError, match="not in the given vocabulary"):
        load_text(path, vocab="helo")
    windows = text_windows(tokens, 4)
    assert windows.x.shape == (2, 4) and (windows.y[:, :-1] == windows.x[:, 1:]).all()
    assert windows.y[0, -1] == tokens[4]


@pytest.mark.skipif(not datasets.TEXT_PATH.exists(), reason="the bundled text.txt is not in this tree yet")
def test_bundled_text_loads():
    tokens, vocab = load_text()
    assert len(tokens) > 1000 and tokens.max() < len(vocab)


# --- loader --------------------------------------------------------------------------------------

@pytest.fixture
def small():
    rng = numpy.random.default_rng(0)
    return ArrayDataset(rng.standard_normal((23, 3)).astype(numpy.float32), rng.integers(0, 5, 23))


@pytest.mark.parametrize("prefetch", [0, 1, 3])
@pytest.mark.parametrize("size", [1, 2, 3])
def test_loader_yields_the_sampler_order_with_a_short_last_batch(small, prefetch, size):
    for rank in range(size):
        sampler = DistributedSampler(len(small), seed=1, rank=rank, size=size)
        order = sampler.indices().copy()
        batches = list(loader(small, sampler, batch_size=5, prefetch=prefetch))
        sizes = [len(x) for x, _ in batches]
        assert sizes == [5] * (len(order) // 5) + ([len(order) % 5] if len(order) % 5 else [])
        xs = numpy.concatenate([x for x, _ in batches])
        ys = numpy.concatenate([y for _, y in batches])
        assert (xs == small.x[order]).all() and (ys == small.y[order]).all()
        assert sampler.position == len(sampler)


def test_loader_drop_last_and_len(small):
    sampler = DistributedSampler(len(small), rank=0, size=1)
    ld = loader(small, sampler, batch_size=5, drop_last=True)
    assert len(ld) == 4 and len(loader(small, sampler, batch_size=5)) == 5
    assert [len(x) for x, _ in ld] == [5] * 4
    assert sampler.position == len(sampler)  # the dropped tail counts as seen: the next epoch is next


def test_loader_position_moves_as_batches_are_handed_out_not_prefetched(small):
    sampler = DistributedSampler(len(small), seed=4, rank=0, size=1)
    everything = [y for _, y in loader(small, sampler, batch_size=4, prefetch=3)]
    sampler = DistributedSampler(len(small), seed=4, rank=0, size=1)
    ld = loader(small, sampler, batch_size=4, prefetch=3)
    head = []
    for _, y in ld:
        head.append(y)
        if len(head) == 2:
            state = sampler.state_dict()  # what a checkpoint inside the loop records
            break
    assert state["position"] == 8
    resumed = DistributedSampler(len(small), seed=4, rank=0, size=1)
    resumed.load_state_dict(state)
    assert len(loader(small, resumed, batch_size=4)) == 4
    tail = [y for _, y in loader(small, resumed, batch_size=4)]
    assert all((a == b).all() for a, b in zip(head + tail, everything)) and len(head + tail) == len(everything)


def test_leaving_the_loop_early_stops_the_prefetch_thread(small):
    before = {t for t in threading.enumerate() if t.name == "mpidp-loader"}
    for _ in range(3):
        for _x, _y in loader(small, DistributedSampler(len(small), rank=0, size=1), batch_size=2, prefetch=2):
            break
    left = {t for t in threading.enumerate() if t.name == "mpidp-loader"} - before
    assert not any(t.is_alive() for t in left)


def test_errors_in_the_prefetch_thread_reach_the_training_loop(small):
    class Broken(ArrayDataset):
        def take(self, indices):
            if 7 in indices:
                raise RuntimeError("sample 7 is unreadable")
            return super().take(indices)

    ds = Broken(small.x, small.y)
    with pytest.raises(RuntimeError, match="sample 7"):
        for _ in loader(ds, DistributedSampler(len(ds), shuffle=False, rank=0, size=1), batch_size=2, prefetch=2):
            pass


def test_loader_transform_tuple_input_and_argument_checks(small):
    ld = loader((small.x, small.y), None, batch_size=10, transform=lambda x, y: (x * 2, y + 1))
    x, y = next(iter(ld))
    assert (x == small.x[:10] * 2).all() and (y == small.y[:10] + 1).all()
    with pytest.raises(ValueError, match="covers 5 samples but the data set has 23"):
        loader(small, DistributedSampler(5, rank=0, size=1))
    with pytest.raises(ValueError, match="batch_size"):
        loader(small, None, batch_size=0)
    with pytest.raises(TypeError, match="len\\(\\) and take"):
        loader(object(), None)


@pytest.mark.gpu
def test_loader_prefetches_to_the_device(small):
    cp = cupy_module()
    sampler = DistributedSampler(len(small), seed=2, rank=0, size=1)
    order = sampler.indices().copy()
    batches = list(loader(small, sampler, batch_size=4, prefetch=2, device="gpu"))
    assert all(isinstance(x, cp.ndarray) and isinstance(y, cp.ndarray) for x, y in batches)
    assert (cp.asnumpy(cp.concatenate([x for x, _ in batches])) == small.x[order]).all()


def test_next_on_the_loader_and_dropping_it_unfinished_stops_its_thread(small):
    import gc
    gc.disable()  # the thread must stop by reference counting alone, as in a training loop
    try:
        sampler = DistributedSampler(len(small), rank=0, size=1)
        for _ in range(3):
            batches = loader(small, sampler, batch_size=2, prefetch=2)  # train.py's pattern: next(batches)
            x, y = next(batches)
            assert (x == small.x[sampler.indices()[sampler.position - 2:sampler.position]]).all()
        del batches
        deadline = __import__("time").monotonic() + 5
        while any(t.name == "mpidp-loader" and t.is_alive() for t in threading.enumerate()):
            assert __import__("time").monotonic() < deadline, "prefetch threads outlived their loaders"
    finally:
        gc.enable()
