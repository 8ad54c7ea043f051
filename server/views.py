"""How a run and a records table look from the outside: the API's answers and its export files
(presentation only: no store, no service)."""

from __future__ import annotations

import io
from typing import Any

import numpy as np

from bncore.record.sinks import to_arrow
from bncore.record.tables import padded

RUN_FIELDS = ("id", "name", "status", "source", "sweep_id", "config", "meta", "final", "message",
              "steps_done", "created_at", "started_at", "finished_at", "pid")  # fmt: skip


def run_out(
    run: dict[str, Any], queue_position: int | None, queued_for: str | None = None
) -> dict[str, Any]:
    """A stored run as the API shows it (server.schemas.RunOut)."""
    base = f"/api/runs/{run['id']}"
    config = run.get("config") or {}
    meta = run.get("meta") or {}
    return {
        **{k: run[k] for k in RUN_FIELDS},
        "steps_total": config.get("steps") or meta.get("steps_total"),
        "queue_position": queue_position,
        "queued_for": queued_for,
        "links": {
            "self": base,
            **{
                name: f"{base}/{name}"
                for name in ("layers", "metrics", "channels", "stream", "export", "cancel")
            },
        },
    }


#: What makes a spreadsheet read a cell as a formula (OWASP's CSV injection).
FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def spreadsheet_safe(text: str) -> str:
    """A text cell a spreadsheet shows as text: one that would start a formula (a layer named
    ``=HYPERLINK(...)``) gets a leading ``'``, as OWASP recommends."""
    return "'" + text if text.startswith(FORMULA_START) else text


def export_file(data: dict[str, np.ndarray], format: str) -> tuple[bytes, str]:
    """One records table as a file and its media type: CSV (per-channel arrays as one column
    per channel, empty past a narrower layer's last channel) or Parquet (arrays as lists)."""
    import pyarrow as pa
    import pyarrow.csv
    import pyarrow.parquet

    empty = pa.table({"step": pa.array([], pa.int64())})
    buf = io.BytesIO()
    if format == "csv":
        cols: dict[str, Any] = {}
        for k, v in data.items():
            if v.ndim == 2 or v.dtype == object:
                grid = padded(v)
                cols.update({f"{k}[{i}]": grid[:, i] for i in range(grid.shape[1])})
            elif v.dtype.kind in "UO":
                cols[k] = [spreadsheet_safe(str(x)) for x in v]
            else:
                cols[k] = v
        pyarrow.csv.write_csv(pa.table(cols) if cols else empty, buf)
        return buf.getvalue(), "text/csv"
    pyarrow.parquet.write_table(to_arrow(data) if data else empty, buf)
    return buf.getvalue(), "application/vnd.apache.parquet"
