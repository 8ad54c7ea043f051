"""How records are kept as bytes and rows: a batch as one ``pending`` body, a series as
(layer, stat, steps, values), per-channel arrays as one row per (layer, step), and a chunk's
coarse copy.

The pending body is a JSON index (text columns inline) followed by the raw numeric arrays, so a
batch of hundreds of columns is one INSERT, stored atomically, and decodes without copies.
(Arrow IPC was weighed for it: a batch holds five tables of different lengths, one of them with
ragged per-channel rows, which Arrow would keep as five framed streams of its own.)
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np
import orjson

from bncore.downsample import bin_means
from bncore.record.tables import CHANNEL_COLUMNS, Batch, channel_column
from server.store.schema import CHUNK, COARSE


def coarse_bins(steps: np.ndarray, vals: np.ndarray, chunk: int) -> np.ndarray:
    """Means of the chunk's COARSE-step bins (NaN where a bin has no finite value)."""
    edges = chunk * CHUNK + np.arange(CHUNK // COARSE + 1) * COARSE
    return bin_means(steps, vals, edges).astype(np.float32)


def series_of(batch: Batch) -> Iterable[tuple[str, str, np.ndarray, np.ndarray]]:
    """(layer, stat, steps, values) for every series in a batch."""
    for table in ("steps", "evals"):
        t = batch.get(table) or {}
        if not len(t.get("step", ())):
            continue
        steps = np.asarray(t["step"], np.int64)
        for stat, vals in t.items():
            if stat != "step":
                yield "", stat, steps, np.asarray(vals, np.float32)
    for table in ("layers", "layer_evals"):
        t = batch.get(table) or {}
        if not len(t.get("step", ())):
            continue
        steps, names = np.asarray(t["step"], np.int64), np.asarray(t["layer"])
        for layer in dict.fromkeys(names.tolist()):
            sel = names == layer
            for stat, vals in t.items():
                if stat not in ("step", "layer"):
                    yield str(layer), stat, steps[sel], np.asarray(vals, np.float32)[sel]


def pack(batch: Batch) -> bytes:
    """A batch as bytes: a JSON index (text columns inline), then the raw numeric arrays."""
    index: list[list[Any]] = []
    blobs: list[bytes] = []
    offset = 0
    for table, cols in batch.items():
        for col, arr in cols.items():
            if arr.dtype == object and len(arr) and isinstance(arr[0], np.ndarray):
                lengths = [len(r) for r in arr]  # ragged per-channel rows: flat, with lengths
                a = np.concatenate(arr).astype(np.float32)
                index.append([table, col, "ragged", lengths, offset])
                blobs.append(a.tobytes())
                offset += a.nbytes
                continue
            if arr.dtype.kind in "UO":
                index.append([table, col, "text", arr.tolist()])
                continue
            a = np.ascontiguousarray(arr)
            index.append([table, col, a.dtype.str, list(a.shape), offset])
            blobs.append(a.tobytes())
            offset += a.nbytes
    head = orjson.dumps(index)
    return len(head).to_bytes(4, "little") + head + b"".join(blobs)


def unpack(data: bytes) -> Batch:
    n = int.from_bytes(data[:4], "little")
    body = memoryview(data)[4 + n :]
    batch: Batch = {}
    for table, col, dtype, *rest in orjson.loads(data[4 : 4 + n]):
        if dtype == "text":
            arr = np.asarray(rest[0], dtype=str)
        elif dtype == "ragged":
            lengths, offset = rest
            flat = np.frombuffer(body, np.float32, int(sum(lengths)), offset)
            arr = channel_column(np.split(flat, np.cumsum(lengths)[:-1]))
        else:
            shape, offset = rest
            arr = np.frombuffer(body, np.dtype(dtype), int(np.prod(shape)), offset).reshape(shape)
        batch.setdefault(table, {})[col] = arr
    return batch


def channel_rows(run_id: str, table: dict[str, np.ndarray]) -> Iterable[dict[str, Any]]:
    if not len(table.get("step", ())):
        return
    for i, (step, layer) in enumerate(zip(table["step"], table["layer"], strict=True)):
        arr = np.stack([np.asarray(table[c][i], np.float32) for c in CHANNEL_COLUMNS])
        yield {
            "run_id": run_id,
            "layer": str(layer),
            "step": int(step),
            "c": arr.shape[1],
            "vals": arr.tobytes(),
        }
