"""Datasets, all made or read locally, as tensors ready to batch.

- ``mnist1d``: Greydanus' MNIST-1D (4000 train / 1000 test, 40 features), made from templates by
  the ``mnist1d`` package and cached in ``~/.cache/bncore/datasets``.
- ``digits``: scikit-learn's 8x8 digits (1797 images, shipped with the package).
- ``blobs``, ``spirals``: synthetic 2-d classification, made from ``data.split_seed``.
- ``gaussian``: N(0, I) inputs of ``data.features`` dimensions, labelled by a random linear
  teacher; its batches are full-rank, as mean field theory's are (digits' 64 features are not,
  for batches or widths beyond 64).
- ``mnist``, ``fashion_mnist``: IDX files (``train-images-idx3-ubyte`` etc., optionally gzipped)
  and ``cifar10``: the python batches (``data_batch_1..5``, ``test_batch``) or the binary
  version (``data_batch_1..5.bin``, ``test_batch.bin``) read from ``data.path``. The python
  batches are pickles, but they are never unpickled as such: a restricted reader rebuilds only
  what the format holds (dicts, lists, bytes, numbers and plain numeric numpy arrays) and refuses
  anything else a file names, so a crafted file cannot run code. A server reads ``data.path``
  only under its data root (:func:`dataset_folder`).

Features are standardized with the training set's statistics. Where a dataset has no split of its
own, a fixed share is held out, chosen by ``data.split_seed``.
"""

from __future__ import annotations

import gzip
import hashlib
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from bncore.cache import cache_dirs
from bncore.run.config import DataConfig

__all__ = ["Dataset", "DatasetError", "dataset_folder", "load_dataset", "read_cifar_batch"]


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


def _gaussian(cfg: DataConfig):
    rng = np.random.default_rng(cfg.split_seed)
    x = rng.standard_normal((cfg.samples, cfg.features))
    teacher = rng.standard_normal((cfg.features, cfg.classes))
    return x, np.argmax(x @ teacher, 1)


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


class _DType:
    """``numpy.dtype`` as a pickle names it: only recorded, then built as a plain numeric dtype."""

    def __init__(self, spec: Any, align: Any = False, copy: Any = False) -> None:
        self.spec, self.order = _text(spec), "|"

    def __setstate__(self, state: Any) -> None:
        # (version, byteorder, subarray, names, fields, elsize, alignment, flags[, metadata])
        if not isinstance(state, tuple) or len(state) < 5 or any(v is not None for v in state[2:5]):
            raise pickle.UnpicklingError("refused a structured or sub-array dtype")
        self.order = _text(state[1])

    def build(self) -> np.dtype:
        try:
            dtype = np.dtype(self.spec)
        except TypeError as exc:
            raise pickle.UnpicklingError(f"refused dtype {self.spec!r}") from exc
        if dtype.kind not in "buif" or dtype.fields is not None or dtype.subdtype is not None:
            raise pickle.UnpicklingError(f"refused dtype {self.spec!r}: not a plain number")
        if self.order == "<":
            return dtype.newbyteorder("<")
        return dtype.newbyteorder(">") if self.order == ">" else dtype


class _Ndarray:
    """``numpy.ndarray`` as a pickle names it: a marker for ``_reconstruct``, never called."""

    def __new__(cls, *args: Any, **kwargs: Any) -> _Ndarray:
        raise pickle.UnpicklingError("refused calling numpy.ndarray")


class _Array:
    """What ``numpy.core.multiarray._reconstruct`` makes; its state is read with frombuffer."""

    array: np.ndarray | None = None

    def __setstate__(self, state: Any) -> None:
        if not isinstance(state, tuple) or len(state) not in (4, 5):
            raise pickle.UnpicklingError("refused an array state of unknown shape")
        shape, dtype, fortran, data = state[-4:]
        self.array = _from_bytes(data, dtype, shape, "F" if fortran else "C")


def _text(v: Any) -> str:
    return v.decode("latin1") if isinstance(v, bytes) else str(v)


def _from_bytes(data: Any, dtype: Any, shape: Any, order: Any) -> np.ndarray:
    if not isinstance(dtype, _DType) or not isinstance(data, (bytes, bytearray)):
        raise pickle.UnpicklingError("refused an array that is not plain bytes of numbers")
    if not isinstance(shape, tuple) or not all(type(n) is int and n >= 0 for n in shape):
        raise pickle.UnpicklingError(f"refused array shape {shape!r}")
    if _text(order) not in ("C", "F"):
        raise pickle.UnpicklingError(f"refused array order {order!r}")
    flat = np.frombuffer(bytes(data), dtype=dtype.build())
    return flat.reshape(shape, order=_text(order))  # type: ignore[call-overload]


def _reconstruct(cls: Any, shape: Any, typecode: Any) -> _Array:
    if cls is not _Ndarray:
        raise pickle.UnpicklingError("refused to reconstruct anything but a numpy array")
    return _Array()


def _latin1(text: Any, encoding: Any = "utf-8") -> bytes:
    """``_codecs.encode``, which protocol-2 pickles use for bytes: latin-1 of a str only."""
    if not isinstance(text, str) or _text(encoding).lower() not in ("latin1", "latin-1"):
        raise pickle.UnpicklingError("refused _codecs.encode other than latin-1 of a string")
    return text.encode("latin1")


_CIFAR_GLOBALS: dict[tuple[str, str], Any] = {
    ("numpy", "dtype"): _DType,
    ("numpy", "ndarray"): _Ndarray,
    ("numpy.core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy.core.numeric", "_frombuffer"): _from_bytes,
    ("numpy._core.numeric", "_frombuffer"): _from_bytes,
    ("_codecs", "encode"): _latin1,
}


class _CifarUnpickler(pickle.Unpickler):
    """Dicts, lists, bytes, strings, numbers, and numpy arrays of plain numbers: what a CIFAR-10
    python batch holds. Every other class or function a file names is refused (plain
    ``pickle.load`` would call it: code execution), and the names it does allow are stand-ins
    that rebuild arrays with ``numpy.frombuffer``, not numpy's own unpickling code."""

    def find_class(self, module: str, name: str) -> Any:
        try:
            return _CIFAR_GLOBALS[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(
                f"refused {module}.{name}: a CIFAR-10 batch holds only arrays, lists and numbers"
            ) from None

    def persistent_load(self, pid: Any) -> Any:
        raise pickle.UnpicklingError("refused a persistent id")


def _arrays(obj: Any) -> Any:
    """The loaded object with each reconstructed array in place of its stand-in."""
    if isinstance(obj, _Array):
        if obj.array is None:
            raise pickle.UnpicklingError("an array without its data")
        return obj.array
    if isinstance(obj, dict):
        return {k: _arrays(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_arrays(v) for v in obj]
    if isinstance(obj, (_DType, _Ndarray)) or callable(obj):
        raise pickle.UnpicklingError("refused a dtype, class or function as a value")
    return obj


def _cifar_arrays(path: Path, data: Any, labels: Any) -> tuple[np.ndarray, np.ndarray]:
    x, y = np.asarray(data), np.asarray(labels)
    if x.dtype.kind not in "ui" or x.ndim != 2 or x.shape[1] != 3072:
        raise DatasetError(f"{path}: data must be integer pixels of shape (N, 3072), not "
                           f"{x.dtype} {x.shape}")  # fmt: skip
    if (
        y.dtype.kind not in "ui"
        or y.shape != (len(x),)
        or (y.size and not 0 <= y.min() <= y.max() < 10)
    ):
        raise DatasetError(f"{path}: labels must be {len(x)} integers in 0..9")
    return x.astype(np.float64).reshape(-1, 3, 32, 32), y.astype(np.int64)


def read_cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Images (N, 3, 32, 32) and labels of one CIFAR-10 batch file: the python version (a
    pickle, read by a restricted unpickler that refuses anything but the format's arrays and
    lists) or, for a ``.bin`` file, the binary version (a label byte, then 3072 pixel bytes)."""
    try:
        if path.suffix == ".bin":
            raw = np.fromfile(path, dtype=np.uint8)
            if raw.size == 0 or raw.size % 3073:
                raise DatasetError(f"{path} is not a CIFAR-10 binary batch: {raw.size} bytes "
                                   "is not a whole number of 3073-byte records")  # fmt: skip
            rec = raw.reshape(-1, 3073)
            return _cifar_arrays(path, rec[:, 1:], rec[:, 0])
        with path.open("rb") as f:
            d = _arrays(_CifarUnpickler(f, encoding="bytes").load())
        if not isinstance(d, dict):
            raise DatasetError(f"{path} is not a CIFAR-10 python batch: not a dict")
        return _cifar_arrays(path, d[b"data"], d[b"labels"])
    except DatasetError:
        raise
    except (OSError, KeyError, ValueError, TypeError, EOFError, RecursionError,
            pickle.UnpicklingError) as exc:  # fmt: skip
        kind = "binary" if path.suffix == ".bin" else "python"
        raise DatasetError(f"{path} is not a CIFAR-10 {kind} batch: {exc}") from None


def _cifar10(folder: Path):
    for ext in ("", ".bin"):
        train = [p for i in range(1, 6) if (p := folder / f"data_batch_{i}{ext}").exists()]
        if train and (folder / f"test_batch{ext}").exists():
            break
    else:
        raise DatasetError(
            f"{folder} must hold data_batch_1..5 and test_batch (CIFAR-10 python version) "
            "or data_batch_1..5.bin and test_batch.bin (binary version)"
        )
    parts = [read_cifar_batch(p) for p in train]
    xt, yt = read_cifar_batch(folder / f"test_batch{ext}")
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]), xt, yt


def dataset_folder(path: str | None, root: str | Path | None = None) -> Path:
    """The directory ``data.path`` names, with symlinks and ``..`` resolved.

    With a ``root`` (a server's data root) only a directory under it is accepted, a relative path
    being taken from the root; a missing directory and one outside the root get the same error,
    so the answer tells nothing about what exists elsewhere. Without one (``bnscope train``, the
    user's own machine) any directory is.
    """
    try:
        if root is None:
            folder = Path(path or "").expanduser().resolve()
            if path and folder.is_dir():
                return folder
        else:
            base = Path(root).expanduser().resolve()
            folder = (base / (path or "")).resolve()
            if path and folder.is_relative_to(base) and folder.is_dir():
                return folder
    except (OSError, RuntimeError, ValueError):  # a symlink loop, a NUL in the name
        pass
    if root is None:
        raise DatasetError(f"data.path={path!r} is not a directory")
    raise DatasetError(
        f"data.path={path!r} is not a dataset directory under this server's data root: "
        f"put each dataset in its own directory under {root} and give its name, e.g. "
        "data.path='cifar10'"
    )


def load_dataset(cfg: DataConfig, root: str | Path | None = None) -> Dataset:
    """Make or read the dataset ``cfg`` names, standardized, as float32 tensors on the CPU.
    ``root``: read ``data.path`` only under this directory (a server's data root)."""
    made = {
        "blobs": lambda: _blobs(cfg),
        "spirals": lambda: _spirals(cfg),
        "gaussian": lambda: _gaussian(cfg),
        "digits": _digits,
    }
    if cfg.name in made:
        x, y = made[cfg.name]()
        xs, ys, xt, yt = _split(x, y, cfg.test_fraction, cfg.split_seed)
    elif cfg.name == "mnist1d":
        xs, ys, xt, yt = _mnist1d(cfg)
        xs, xt = xs[:, None, :], xt[:, None, :]  # one channel, 40 positions
    else:
        folder = dataset_folder(cfg.path, root)
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
