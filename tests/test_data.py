"""Datasets: made locally, split by a fixed seed, read from files the tests write."""

from __future__ import annotations

import gzip
import pickle
import struct

import numpy as np
import pytest
import torch

from bncore.config import DataConfig
from bncore.data import DatasetError, load_dataset, read_idx


@pytest.mark.parametrize(
    "name,shape,classes",
    [
        ("blobs", (2,), 4),
        ("spirals", (2,), 4),
        ("digits", (1, 8, 8), 10),
    ],
)
def test_made_datasets(name, shape, classes):
    d = load_dataset(DataConfig(name=name, samples=500))
    assert d.input_shape == shape and d.num_classes == classes
    assert d.x_train.dtype == torch.float32 and d.y_train.dtype == torch.int64
    assert len(d.x_test) > 0 and len(d.x_train) > len(d.x_test)
    # standardized with the training set's statistics
    assert d.x_train.mean().abs() < 1e-4 and (d.x_train.std() - 1).abs() < 0.05


def test_split_is_fixed_by_split_seed():
    a = load_dataset(DataConfig(name="digits"))
    b = load_dataset(DataConfig(name="digits"))
    c = load_dataset(DataConfig(name="digits", split_seed=1))
    assert torch.equal(a.x_test, b.x_test) and not torch.equal(a.x_test, c.x_test)
    assert len(a.x_train) + len(a.x_test) == 1797


def test_mnist1d_is_made_offline_and_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("BNCORE_CACHE_DIR", str(tmp_path))
    d = load_dataset(DataConfig(name="mnist1d", max_train=1000))
    assert d.input_shape == (1, 40) and len(d.x_train) == 1000 and len(d.x_test) == 1000
    assert list(tmp_path.glob("datasets/mnist1d-*.npz"))
    again = load_dataset(DataConfig(name="mnist1d", max_train=1000))
    assert torch.equal(d.x_test, again.x_test)


def _write_idx(path, array: np.ndarray, zipped: bool) -> None:
    code = {np.uint8: 0x08}[array.dtype.type]
    header = bytes([0, 0, code, array.ndim]) + b"".join(struct.pack(">I", n) for n in array.shape)
    data = header + array.tobytes()
    if zipped:
        with gzip.open(str(path) + ".gz", "wb") as f:
            f.write(data)
    else:
        path.write_bytes(data)


@pytest.mark.parametrize("zipped", [False, True])
def test_mnist_idx_files(tmp_path, zipped):
    rng = np.random.default_rng(0)
    for split, n in (("train", 30), ("t10k", 10)):
        _write_idx(
            tmp_path / f"{split}-images-idx3-ubyte",
            rng.integers(0, 255, (n, 28, 28), dtype=np.uint8),
            zipped,
        )
        _write_idx(
            tmp_path / f"{split}-labels-idx1-ubyte", rng.integers(0, 10, n, dtype=np.uint8), zipped
        )
    for name in ("mnist", "fashion_mnist"):
        d = load_dataset(DataConfig(name=name, path=str(tmp_path)))
        assert d.input_shape == (1, 28, 28) and len(d.x_train) == 30 and len(d.x_test) == 10


def test_idx_errors(tmp_path):
    (tmp_path / "bad").write_bytes(b"\x01\x02\x03\x04rest")
    with pytest.raises(DatasetError, match="not an IDX file"):
        read_idx(tmp_path / "bad")
    (tmp_path / "short").write_bytes(bytes([0, 0, 8, 1]) + struct.pack(">I", 10) + b"abc")
    with pytest.raises(DatasetError, match="header says"):
        read_idx(tmp_path / "short")
    with pytest.raises(DatasetError, match="missing train-images-idx3-ubyte"):
        load_dataset(DataConfig(name="mnist", path=str(tmp_path)))
    with pytest.raises(DatasetError, match="is not a directory"):
        load_dataset(DataConfig(name="mnist", path=str(tmp_path / "nowhere")))


def test_cifar10_batches(tmp_path):
    rng = np.random.default_rng(1)
    for name, n in [("data_batch_1", 20), ("data_batch_2", 20), ("test_batch", 8)]:
        batch = {
            b"data": rng.integers(0, 255, (n, 3072), dtype=np.uint8),
            b"labels": rng.integers(0, 10, n).tolist(),
        }
        (tmp_path / name).write_bytes(pickle.dumps(batch))
    d = load_dataset(DataConfig(name="cifar10", path=str(tmp_path)))
    assert d.input_shape == (3, 32, 32) and len(d.x_train) == 40 and len(d.x_test) == 8
    (tmp_path / "test_batch").write_bytes(b"not a pickle")
    with pytest.raises(DatasetError, match="not a CIFAR-10 python batch"):
        load_dataset(DataConfig(name="cifar10", path=str(tmp_path)))
