"""Data for data-parallel training: per-rank sampling, prefetching loaders and bundled data sets."""
from . import datasets
from .datasets import (ArrayDataset, NpyDataset, load_digits, load_npz, load_text, synthetic,
                       text_windows)
from .loader import Loader, loader
from .sampler import DistributedSampler

__all__ = ["ArrayDataset", "DistributedSampler", "Loader", "NpyDataset", "datasets", "load_digits",
           "load_npz", "load_text", "loader", "synthetic", "text_windows"]
