"""How runs, series and tables look from the outside (the routes' shared presentation)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from bncore.records import (
    CHANNEL_COLUMNS,
    EVAL_COLUMNS,
    OPTIONAL_EVAL_COLUMNS,
    STEP_COLUMNS,
    channel_column,
)

if TYPE_CHECKING:
    from server.services import Services


def run_out(run: dict[str, Any], svc: Services) -> dict[str, Any]:
    base = f"/api/runs/{run['id']}"
    config = run.get("config") or {}
    meta = run.get("meta") or {}
    return {
        **{
            k: run[k]
            for k in (
                "id",
                "name",
                "status",
                "source",
                "sweep_id",
                "config",
                "meta",
                "final",
                "message",
                "steps_done",
                "created_at",
                "started_at",
                "finished_at",
                "pid",
            )
        },
        "steps_total": config.get("steps") or meta.get("steps_total"),
        "queue_position": svc.scheduler.position(run["id"]),
        "links": {
            "self": base,
            "layers": f"{base}/layers",
            "metrics": f"{base}/metrics",
            "channels": f"{base}/channels",
            "stream": f"{base}/stream",
            "export": f"{base}/export",
            "cancel": f"{base}/cancel",
        },
    }


def table(svc: Services, run_id: str, name: str) -> dict[str, np.ndarray]:
    """One records table (bncore.records) rebuilt from the stored series."""
    store = svc.store
    if name == "channels":
        rows = [r for s in store.channel_steps(run_id) for r in store.read_channels(run_id, s)]
        out: dict[str, Any] = {
            "step": np.array([r["step"] for r in rows], np.int64),
            "layer": np.array([r["layer"] for r in rows]),
        }
        for col in CHANNEL_COLUMNS:  # ragged where layers differ in width
            out[col] = channel_column([r[col] for r in rows]) if rows else np.empty((0, 0))
        return out
    names = store.series_names(run_id)
    if name in ("steps", "evals"):
        wanted = STEP_COLUMNS if name == "steps" else (*EVAL_COLUMNS, *OPTIONAL_EVAL_COLUMNS)
        return _aligned(store, run_id, [("", s) for s in wanted if ("", s) in names])
    parts = []
    for layer in dict.fromkeys(layer for layer, _ in names if layer):
        cols = _aligned(store, run_id, [(lay, s) for lay, s in names if lay == layer])
        parts.append({"layer": np.full(len(cols.get("step", ())), layer), **cols})
    if not parts:
        return {}
    keys = list(parts[0])
    merged = {
        k: np.concatenate([p.get(k, np.full(len(p["step"]), np.nan)) for p in parts]) for k in keys
    }
    order = np.lexsort((np.arange(len(merged["step"])), merged["step"]))
    return {
        "step": merged["step"][order],
        "layer": merged["layer"][order],
        **{k: v[order] for k, v in merged.items() if k not in ("step", "layer")},
    }


def _aligned(store, run_id: str, keys: list[tuple[str, str]]) -> dict[str, np.ndarray]:
    if not keys:
        return {}
    first_steps, _ = store.read_series(run_id, *keys[0])
    out: dict[str, np.ndarray] = {"step": first_steps}
    for layer, stat in keys:
        steps, vals = store.read_series(run_id, layer, stat)
        col = np.full(len(first_steps), np.nan, np.float32)
        pos = np.searchsorted(first_steps, steps)
        ok = (pos < len(first_steps)) & (
            first_steps[np.minimum(pos, len(first_steps) - 1)] == steps
        )
        col[pos[ok]] = vals[ok]
        out[stat] = col
    return out
