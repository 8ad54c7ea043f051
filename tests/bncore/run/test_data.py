"""Datasets: made locally, split by a fixed seed, read from files the tests write."""

from __future__ import annotations

import gzip
import pickle
import struct

import numpy as np
import pytest
import torch

from bncore.run.config import DataConfig
from bncore.run.data import DatasetError, dataset_folder, load_dataset, read_cifar_batch, read_idx
from tests.helpers import Touch, write_cifar


@pytest.mark.parametrize(
    "name,shape,classes",
    [
        ("blobs", (2,), 4),
        ("spirals", (2,), 4),
        ("gaussian", (256,), 4),
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


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_cifar10_python_batches_load_through_the_safe_reader(tmp_path, protocol):
    write_cifar(tmp_path, (("data_batch_1", 12), ("data_batch_2", 12), ("test_batch", 5)), protocol)
    d = load_dataset(DataConfig(name="cifar10", path=str(tmp_path)))
    assert d.input_shape == (3, 32, 32) and len(d.x_train) == 24 and len(d.x_test) == 5
    with (tmp_path / "test_batch").open("rb") as f:
        expected = pickle.load(f, encoding="bytes")  # the tests' own file: trusted here
    x, y = read_cifar_batch(tmp_path / "test_batch")
    assert np.array_equal(x.reshape(5, 3072), expected[b"data"])
    assert y.tolist() == expected[b"labels"]


def test_cifar10_binary_version(tmp_path):
    rng = np.random.default_rng(2)
    for name, n in (("data_batch_1.bin", 10), ("test_batch.bin", 4)):
        rec = rng.integers(0, 255, (n, 3073), dtype=np.uint8)
        rec[:, 0] %= 10
        rec.tofile(tmp_path / name)
    d = load_dataset(DataConfig(name="cifar10", path=str(tmp_path)))
    assert d.input_shape == (3, 32, 32) and len(d.x_train) == 10 and len(d.x_test) == 4
    (tmp_path / "test_batch.bin").write_bytes(b"\0" * 3074)
    with pytest.raises(DatasetError, match="not a CIFAR-10 binary batch"):
        load_dataset(DataConfig(name="cifar10", path=str(tmp_path)))


def _evil_batches(marker):
    labels = [0, 1]
    data = np.zeros((2, 3072), np.uint8)
    return {
        "whole file": Touch(marker),
        "inside the dict": {b"data": data, b"labels": labels, b"x": Touch(marker)},
        "as the labels": {b"data": data, b"labels": Touch(marker)},
        "protocol 2": pickle.dumps({b"data": data, b"labels": [Touch(marker)] * 2}, protocol=2),
        "numpy object array": {b"data": np.array([Touch(marker)] * 3072, dtype=object)},
    }


@pytest.mark.parametrize("case", list(_evil_batches(None)))
def test_a_crafted_cifar_pickle_is_refused_and_runs_nothing(tmp_path, case):
    marker = tmp_path / "pwned"
    folder = write_cifar(tmp_path / "cifar")
    evil = _evil_batches(marker)[case]
    (folder / "data_batch_1").write_bytes(evil if isinstance(evil, bytes) else pickle.dumps(evil))
    with pytest.raises(DatasetError, match="not a CIFAR-10 python batch: refused"):
        load_dataset(DataConfig(name="cifar10", path=str(folder)))
    assert not marker.exists()
    pickle.loads((folder / "data_batch_1").read_bytes())  # what plain pickle would have done
    assert marker.exists()


def test_the_safe_reader_refuses_what_cifar_batches_never_hold(tmp_path):
    path = tmp_path / "b"
    for payload, words in [
        (b"cos\nsystem\n(S'true'\ntR.", "refused os.system"),
        (b"cbuiltins\neval\n(S'1'\ntR.", "refused builtins.eval"),
        (b"cnumpy\nload\n(S'x'\ntR.", "refused numpy.load"),
        (b"cnumpy\nndarray\n(I3\ntR.", "refused"),  # numpy's class, called directly
        (pickle.dumps({b"data": np.zeros((1, 3), "u1,u1")}), "refused"),  # structured dtype
        (pickle.dumps({b"data": np.zeros((2, 3072)), b"labels": [0, 1]}), "integer pixels"),
        (pickle.dumps({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, 99]}), "0..9"),
        (pickle.dumps([1, 2]), "not a dict"),
        (b"garbage", "not a CIFAR-10 python batch"),
    ]:
        path.write_bytes(payload)
        with pytest.raises(DatasetError, match=words):
            read_cifar_batch(path)


def test_dataset_folder_under_a_root(tmp_path):
    root, outside = tmp_path / "datasets", tmp_path / "elsewhere"
    write_cifar(root / "cifar10")
    write_cifar(outside)
    assert dataset_folder("cifar10", root) == (root / "cifar10").resolve()
    assert dataset_folder(str(root / "cifar10"), root) == (root / "cifar10").resolve()
    (root / "alias").symlink_to(root / "cifar10")  # a link that stays inside is fine
    assert dataset_folder("alias", root) == (root / "cifar10").resolve()
    (root / "escape").symlink_to(outside)
    refused = [str(outside), "../elsewhere", "cifar10/../../elsewhere", "escape", "missing",
               str(root / "missing"), "", None, "cifar10/data_batch_1", "bad\0name"]  # fmt: skip
    messages = set()
    for path in refused:
        with pytest.raises(DatasetError, match="not a dataset directory under") as exc:
            dataset_folder(path, root)
        messages.add(str(exc.value).replace(repr(path), "PATH"))
    assert len(messages) == 1, messages  # missing and forbidden: one answer
    assert str(root) in messages.pop()  # says where datasets go
    with pytest.raises(DatasetError, match="not a dataset directory under"):
        load_dataset(DataConfig(name="cifar10", path=str(outside)), root)
    # without a root (bnscope train on the user's own machine) any directory is read
    assert len(load_dataset(DataConfig(name="cifar10", path=str(outside))).x_train) == 20
