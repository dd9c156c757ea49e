"""Data sets the loader reads: in-memory and memory-mapped arrays, bundled digits and text, synthetic data, user .npz.

The loaders return ``XY(x, y)``, a named pair of arrays (``x, y = load_digits()``
works); the loader takes such a pair or any data set with ``len()`` and
``take(indices) -> (x, y)``. Malformed input is a ``ValueError`` naming the
file and what is wrong with it.
"""
import os
from pathlib import Path
from typing import Any, NamedTuple

import numpy

_HERE = Path(__file__).resolve().parent
DIGITS_PATH = _HERE / "digits.npz"
TEXT_PATH = _HERE / "text.txt"


def _check_arrays(x, y, source):
    """Raise a ValueError naming ``source`` unless x (N, ...) is numeric and y (N, ...) holds class indices."""
    for key, a in (("x", x), ("y", y)):
        if a.dtype.kind not in "biuf" and a.dtype.name != "bfloat16":
            raise ValueError(f"{source}: '{key}' has dtype {a.dtype} which is not numeric; "
                             f"store numbers (e.g. {key}.astype('float32'))")
    if x.ndim < 2:
        raise ValueError(f"{source}: 'x' has shape {x.shape} but needs (samples, features...); "
                         f"reshape a single feature to (N, 1)")
    if y.ndim < 1:
        raise ValueError(f"{source}: 'y' is a scalar but needs one label per sample, shape (N,)")
    if y.dtype.kind not in "iu":
        raise ValueError(f"{source}: 'y' has dtype {y.dtype} but labels must be integers (class indices); "
                         f"convert with y.astype('int64')")
    if len(x) != len(y):
        raise ValueError(f"{source}: 'x' has {len(x)} samples but 'y' has {len(y)}; "
                         f"they must have the same first dimension")
    if len(y) == 0:
        raise ValueError(f"{source}: the data set is empty (0 samples)")
    if y.dtype.kind == "i" and int(y.min()) < 0:
        raise ValueError(f"{source}: 'y' has negative labels (min {int(y.min())}); labels are class indices >= 0")


class XY(NamedTuple):
    """A data set as two arrays: ``x`` (N, features...) and ``y`` (N, ...) class indices."""
    x: Any
    y: Any


class ArrayDataset:
    """Samples ``x[i], y[i]`` of two arrays (or memory maps) with the same first dimension."""

    def __init__(self, x, y, source="ArrayDataset"):
        self.x, self.y, self.source = x, y, source
        _check_arrays(x, y, source)

    def __len__(self):
        return len(self.x)

    def take(self, indices):
        """(x, y) of the given sample indices, as new host arrays."""
        x, y = numpy.take(self.x, indices, axis=0), numpy.take(self.y, indices, axis=0)
        return numpy.asarray(x), numpy.asarray(y)  # plain arrays even when read from a memmap

    @property
    def sample_shape(self):
        """Shape of one sample of x."""
        return tuple(self.x.shape[1:])

    @property
    def num_classes(self):
        """1 + the largest label."""
        return int(self.y.max()) + 1

    def __repr__(self):
        return f"{type(self).__name__}({len(self)} samples of {self.sample_shape} {self.x.dtype}, {self.source})"


class NpyDataset(ArrayDataset):
    """``x`` and ``y`` from two ``.npy`` files, memory-mapped read-only: only the batches read are in memory.

    Every batch checks that the files are still the ones opened (a file
    deleted, replaced or truncated mid-run is an error naming it, not a crash
    or a silent read of stale data).
    """

    def __init__(self, x_path, y_path):
        self.paths = (str(x_path), str(y_path))
        arrays = [_open_npy(p) for p in self.paths]
        self._stats = [_identity(p) for p in self.paths]
        super().__init__(arrays[0], arrays[1], source=f"{self.paths[0]}, {self.paths[1]}")

    def take(self, indices):
        for path, seen in zip(self.paths, self._stats):
            now = _identity(path, missing_ok=True)
            if now is None:
                raise FileNotFoundError(f"data file {path} disappeared during the run; "
                                        f"restore it (or resume from the last checkpoint once it is back)")
            if now != seen:
                raise ValueError(f"data file {path} changed during the run (size/inode/mtime {seen} -> {now}); "
                                 f"do not overwrite a data set a job is reading")
        return super().take(indices)


def _identity(path, missing_ok=False):
    try:
        st = os.stat(path)
    except FileNotFoundError:
        if missing_ok:
            return None
        raise FileNotFoundError(f"data file {path} does not exist") from None
    return (st.st_size, st.st_ino, st.st_mtime_ns)


def _open_npy(path):
    if not os.path.exists(path):
        raise FileNotFoundError(f"data file {path} does not exist")
    try:
        return numpy.load(path, mmap_mode="r", allow_pickle=False)
    except ValueError as exc:
        raise ValueError(f"{path}: cannot memory-map it as a numeric .npy array ({exc})") from None
    except OSError as exc:
        raise ValueError(f"{path}: not a readable .npy file ({exc})") from None


def load_npz(path):
    """XY(x, y) from the user's ``.npz`` holding ``x`` (N, features...) and ``y`` (N,) of class indices."""
    path = str(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"data file {path} does not exist")
    try:
        archive = numpy.load(path, allow_pickle=False)
    except (ValueError, OSError) as exc:
        raise ValueError(f"{path}: not a readable .npz file ({exc}); "
                         f"write one with numpy.savez(path, x=x, y=y)") from None
    if not hasattr(archive, "files"):
        raise ValueError(f"{path}: holds a single array, not an .npz archive with 'x' and 'y'; "
                         f"write one with numpy.savez(path, x=x, y=y)")
    with archive:
        arrays = {}
        for key in ("x", "y"):
            if key not in archive.files:
                raise ValueError(f"{path}: has no array '{key}' (it has {sorted(archive.files)}); "
                                 f"write it with numpy.savez(path, x=x, y=y)")
            try:
                arrays[key] = archive[key]
            except ValueError:
                raise ValueError(f"{path}: '{key}' holds Python objects, not numbers; "
                                 f"store a numeric array") from None
            except Exception as exc:
                raise ValueError(f"{path}: '{key}' cannot be read ({exc}); the file is damaged") from None
    x, y = arrays["x"], arrays["y"]
    _check_arrays(x, y, path)
    if x.dtype.kind == "f":
        bad = int(x.size - numpy.count_nonzero(numpy.isfinite(x)))
        if bad:
            raise ValueError(f"{path}: 'x' has {bad} NaN or infinite values; clean the data first")
    return XY(x, y)


def _stratified_split(y, test_fraction, seed):
    """Test and train indices: ``test_fraction`` of each class, chosen by ``seed`` (deterministic)."""
    rng = numpy.random.default_rng(seed)
    test = []
    for label in range(int(y.max()) + 1):
        members = numpy.flatnonzero(y == label)
        rng.shuffle(members)
        test.append(members[:int(round(len(members) * test_fraction))])
    test = numpy.sort(numpy.concatenate(test))
    train = numpy.setdiff1d(numpy.arange(len(y)), test)
    return train, test


def load_digits(split="train", test_fraction=0.2, seed=0, normalize=True, as_images=False):
    """XY of the bundled 8x8 digits (1797 samples, 10 classes): x float32 (N, 64) or (N, 1, 8, 8), y int64 (N,).

    The split is stratified and depends only on ``seed`` and ``test_fraction``,
    so every rank (and every run) sees the same train and test sets.
    """
    if split not in ("train", "test", "all"):
        raise ValueError(f"split must be 'train', 'test' or 'all', got {split!r}")
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be between 0 and 1, got {test_fraction}")
    with numpy.load(DIGITS_PATH, allow_pickle=False) as archive:
        x, y = archive["x"], archive["y"]
    if split != "all":
        train, test = _stratified_split(y, test_fraction, seed)
        keep = train if split == "train" else test
        x, y = x[keep], y[keep]
    x = x.astype(numpy.float32) / numpy.float32(16.0) if normalize else x.astype(numpy.float32)
    if as_images:
        x = x.reshape(len(x), 1, 8, 8)
    return XY(x, y.astype(numpy.int64))


def synthetic(n, shape=(64,), num_classes=10, seed=0, dtype="float32"):
    """XY of ``n`` learnable samples for benchmarks: class centres plus noise, x (n, *shape), y int64 (n,)."""
    shape = (shape,) if isinstance(shape, int) else tuple(shape)
    rng = numpy.random.default_rng(seed)
    centres = rng.standard_normal((num_classes,) + shape).astype(dtype)
    y = rng.integers(0, num_classes, size=n, dtype=numpy.int64)
    x = centres[y] + rng.standard_normal((n,) + shape).astype(dtype)
    return XY(x.astype(dtype, copy=False), y)


def load_text(path=None, vocab=None):
    """Character-level tokens of a UTF-8 text (default: the bundled ``text.txt``): (tokens int64 (N,), vocab str).

    ``vocab`` is the sorted set of characters; token ``t`` is ``vocab[t]``.
    Pass the training vocabulary to encode other text the same way.
    """
    path = TEXT_PATH if path is None else Path(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"text file {path} does not exist")
    text = Path(path).read_text(encoding="utf-8")
    if not text:
        raise ValueError(f"{path}: the text is empty")
    if vocab is None:
        vocab = "".join(sorted(set(text)))
    lookup = {ch: i for i, ch in enumerate(vocab)}
    unknown = sorted(set(text) - set(lookup))
    if unknown:
        raise ValueError(f"{path}: characters {''.join(unknown)!r} are not in the given vocabulary")
    return numpy.fromiter((lookup[ch] for ch in text), dtype=numpy.int64, count=len(text)), vocab


def text_windows(tokens, seq_len, stride=None):
    """XY of next-token windows of a token stream: x and y int64 (N, seq_len), y shifted by one."""
    tokens = numpy.asarray(tokens, dtype=numpy.int64)
    stride = seq_len if stride is None else int(stride)
    if seq_len < 1 or stride < 1:
        raise ValueError(f"seq_len and stride must be >= 1, got {seq_len} and {stride}")
    if len(tokens) < seq_len + 1:
        raise ValueError(f"{len(tokens)} tokens are too few for windows of {seq_len} (+1 for the target)")
    starts = numpy.arange(0, len(tokens) - seq_len, stride)
    offsets = numpy.arange(seq_len)
    x = tokens[starts[:, None] + offsets]
    return XY(x, tokens[starts[:, None] + offsets + 1])
