"""Datasets, all made or read locally, as tensors ready to batch.

- ``mnist1d``: Greydanus' MNIST-1D (4000 train / 1000 test, 40 features), made from templates by
  the ``mnist1d`` package and cached in ``~/.cache/bncore/datasets``.
- ``digits``: scikit-learn's 8x8 digits (1797 images, shipped with the package).
- ``blobs``, ``spirals``: synthetic 2-d classification, made from ``data.split_seed``.
- ``mnist``, ``fashion_mnist``: IDX files (``train-images-idx3-ubyte`` etc., optionally gzipped)
  and ``cifar10``: the python batches (``data_batch_1..5``, ``test_batch``) read from
  ``data.path``.

Features are standardized with the training set's statistics. Where a dataset has no split of its
own, a fixed share is held out, chosen by ``data.split_seed``.
"""

from __future__ import annotations

import gzip
import hashlib
import pickle
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from bncore.cache import cache_dirs
from bncore.config import DataConfig

__all__ = ["Dataset", "DatasetError", "load_dataset"]


class DatasetError(ValueError):
    """The data cannot be made or read (missing or malformed files)."""


@dataclass
class Dataset:
    """Train and test tensors; ``input_shape`` is one example's shape, e.g. (1, 8, 8)."""

    name: str
    x_train: Tensor
    y_train: Tensor
    x_test: Tensor
    y_test: Tensor
    num_classes: int

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.x_train.shape[1:])

    def to(self, device: torch.device) -> Dataset:
        return Dataset(
            self.name,
            self.x_train.to(device),
            self.y_train.to(device),
            self.x_test.to(device),
            self.y_test.to(device),
            self.num_classes,
        )


def _split(x: np.ndarray, y: np.ndarray, fraction: float, seed: int):
    order = np.random.default_rng(seed).permutation(len(x))
    n_test = max(1, round(len(x) * fraction))
    test, train = order[:n_test], order[n_test:]
    return x[train], y[train], x[test], y[test]


def _blobs(cfg: DataConfig):
    rng = np.random.default_rng(cfg.split_seed)
    centers = rng.uniform(-4, 4, size=(cfg.classes, 2))
    y = rng.integers(0, cfg.classes, cfg.samples)
    x = centers[y] + rng.normal(0, 1 + 4 * cfg.noise, size=(cfg.samples, 2))
    return x, y


def _spirals(cfg: DataConfig):
    """Interleaved arms, one per class (the classic hard-for-linear-models problem)."""
    rng = np.random.default_rng(cfg.split_seed)
    y = rng.integers(0, cfg.classes, cfg.samples)
    r = rng.uniform(0.05, 1.0, cfg.samples)
    theta = 3.5 * np.pi * r + 2 * np.pi * y / cfg.classes
    x = np.stack([r * np.cos(theta), r * np.sin(theta)], 1)
    return x + rng.normal(0, 0.1 * cfg.noise, size=x.shape), y


def _digits():
    from sklearn.datasets import load_digits

    d = load_digits()
    return d.images[:, None, :, :].astype(np.float64), d.target


def _mnist1d(cfg: DataConfig):
    """Made once from the package's templates (seeded), then cached as .npz."""
    from mnist1d.data import get_dataset_args, make_dataset

    args = get_dataset_args()
    key = hashlib.sha256(repr(sorted(vars(args).items())).encode()).hexdigest()[:12]
    for folder in cache_dirs():
        cached = folder / "datasets" / f"mnist1d-{key}.npz"
        if cached.exists():
            with np.load(cached) as f:
                return f["x"], f["y"], f["x_test"], f["y_test"]
    d = make_dataset(args)
    out = (d["x"], d["y"], d["x_test"], d["y_test"])
    for folder in cache_dirs():
        try:
            (folder / "datasets").mkdir(parents=True, exist_ok=True)
            tmp = folder / "datasets" / f".mnist1d-{key}.tmp.npz"
            np.savez(tmp, x=out[0], y=out[1], x_test=out[2], y_test=out[3])
            tmp.replace(folder / "datasets" / f"mnist1d-{key}.npz")
            break
        except OSError:
            continue
    return out


def _open(path: Path):
    return gzip.open(path, "rb") if path.suffix == ".gz" else path.open("rb")


def _find(folder: Path, stem: str) -> Path:
    dotted = stem.replace("-idx", ".idx")  # some mirrors name them train-images.idx3-ubyte
    for name in (stem, stem + ".gz", dotted, dotted + ".gz"):
        if (folder / name).exists():
            return folder / name
    raise DatasetError(f"missing {stem}[.gz] in {folder}")


def read_idx(path: Path) -> np.ndarray:
    """An IDX array (the MNIST file format): magic, dims, then big-endian data."""
    dtypes = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
    with _open(path) as f:
        header = f.read(4)
        if len(header) != 4 or header[0] != 0 or header[1] != 0 or header[2] not in dtypes:
            raise DatasetError(f"{path} is not an IDX file")
        ndim = header[3]
        shape = tuple(int.from_bytes(f.read(4), "big") for _ in range(ndim))
        data = np.frombuffer(f.read(), dtype=dtypes[header[2]])
    if data.size != int(np.prod(shape)):
        raise DatasetError(f"{path}: header says {shape}, file holds {data.size} values")
    return data.reshape(shape)


def _mnist_files(folder: Path):
    xs = read_idx(_find(folder, "train-images-idx3-ubyte"))
    ys = read_idx(_find(folder, "train-labels-idx1-ubyte"))
    xt = read_idx(_find(folder, "t10k-images-idx3-ubyte"))
    yt = read_idx(_find(folder, "t10k-labels-idx1-ubyte"))
    if xs.ndim != 3 or len(xs) != len(ys) or len(xt) != len(yt):
        raise DatasetError(f"{folder}: images and labels do not match")
    return (
        xs[:, None].astype(np.float64),
        ys.astype(np.int64),
        xt[:, None].astype(np.float64),
        yt.astype(np.int64),
    )


def _cifar_batch(path: Path):
    try:
        with path.open("rb") as f:
            d = pickle.load(f, encoding="bytes")
        x = np.asarray(d[b"data"], dtype=np.float64).reshape(-1, 3, 32, 32)
        return x, np.asarray(d[b"labels"], dtype=np.int64)
    except (OSError, KeyError, ValueError, pickle.UnpicklingError) as exc:
        raise DatasetError(f"{path} is not a CIFAR-10 python batch: {exc}") from None


def _cifar10(folder: Path):
    train = [p for i in range(1, 6) if (p := folder / f"data_batch_{i}").exists()]
    if not train or not (folder / "test_batch").exists():
        raise DatasetError(f"{folder} must hold data_batch_1..5 and test_batch (CIFAR-10 python)")
    parts = [_cifar_batch(p) for p in train]
    xt, yt = _cifar_batch(folder / "test_batch")
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]), xt, yt


def load_dataset(cfg: DataConfig) -> Dataset:
    """Make or read the dataset ``cfg`` names, standardized, as float32 tensors on the CPU."""
    if cfg.name in ("blobs", "spirals", "digits"):
        x, y = {"blobs": lambda: _blobs(cfg), "spirals": lambda: _spirals(cfg), "digits": _digits}[
            cfg.name
        ]()
        xs, ys, xt, yt = _split(x, y, cfg.test_fraction, cfg.split_seed)
    elif cfg.name == "mnist1d":
        xs, ys, xt, yt = _mnist1d(cfg)
        xs, xt = xs[:, None, :], xt[:, None, :]  # one channel, 40 positions
    else:
        folder = Path(cfg.path or "")
        if not folder.is_dir():
            raise DatasetError(f"data.path={cfg.path!r} is not a directory")
        xs, ys, xt, yt = _cifar10(folder) if cfg.name == "cifar10" else _mnist_files(folder)
    if cfg.max_train is not None:
        xs, ys = xs[: cfg.max_train], ys[: cfg.max_train]
    # standardize per input channel with training statistics
    axes = (0,) if xs.ndim == 2 else tuple(d for d in range(xs.ndim) if d != 1)
    mean, std = xs.mean(axis=axes, keepdims=True), xs.std(axis=axes, keepdims=True) + 1e-8
    num_classes = int(max(ys.max(), yt.max())) + 1
    f = lambda a: torch.from_numpy(((a - mean) / std).astype(np.float32))  # noqa: E731
    lab = lambda a: torch.from_numpy(np.asarray(a, dtype=np.int64))  # noqa: E731
    return Dataset(cfg.name, f(xs), lab(ys), f(xt), lab(yt), num_classes)
