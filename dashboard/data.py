"""What the dashboard shows, read through the service (server.service: runs, records): plain dicts
of numpy arrays, sized for a browser (downsampled or binned by bncore.downsample), with no plotting
in here."""

from __future__ import annotations

import re
import time
from collections.abc import Collection
from typing import Any

import numpy as np

from bncore.downsample import bin_means, minmax
from bncore.status import FINISHED, RunStatus
from server.errors import NotFound
from server.service import Service

HEAT_COLUMNS = 400  # step bins of a layer x step heatmap
LINE_POINTS = 1000  # points per line
HEAT_STATS = ("pre_mean", "pre_var", "grad_in_norm", "act_saturated")
LAYER_STATS = ("pre_mean", "running_mean", "pre_var", "running_var", "running_mean_gap",
               "running_var_gap", "gamma", "beta", "gamma_grad_norm", "beta_grad_norm",
               "weight_grad_norm", "weight_norm", "eff_lr", "angular_update", "act_dead",
               "act_saturated")  # fmt: skip
EVAL_STATS = ("train_loss", "train_acc", "test_loss", "test_acc", "mode_gap", "test_acc_precise",
              "test_acc_batch")  # fmt: skip
#: A tracked unit's percentile (p15_3) or a replica's batch variance (r1_pre_var).
_PER_UNIT = re.compile(r"p(15|50|85)_\d+|r\d+_pre_var")
#: A distributed run's view of its replicas (bncore.run.replicas).
REPLICA_STATS = ("global_pre_var", "replica_mean_spread", "replica_var_spread")
#: Per-block values measured at evaluations (bncore.run.population, bncore.run.propagation).
BLOCK_EVAL_STATS = ("ema_mean_gap", "ema_var_gap", "signal_sq_mean", "signal_var", "branch_var")


def runs(svc: Service, limit: int = 200, unfolded: Collection[str] = ()) -> list[dict[str, Any]]:
    """Rows for the runs table, newest first: what each is, how far it got, when it ends; a
    sweep's runs (an experiment's too) as one row, with its runs under it if ``unfolded``."""
    now = time.time()
    return by_sweep([_row(r, now) for r in svc.runs.newest(limit)], unfolded)


def by_sweep(rows: list[dict[str, Any]], unfolded: Collection[str]) -> list[dict[str, Any]]:
    """Each sweep of two runs or more as one row at its newest run's place (``runs``: its run
    ids, newest first; its name, the part of its runs' names before ": "), followed by its
    runs if its id is in ``unfolded``."""
    members: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        if row["sweep"]:
            members.setdefault(row["sweep"], []).append(row)
    out: list[dict[str, Any]] = []
    for row in rows:
        group = members.get(row["sweep"] or "", [])
        if len(group) < 2:
            out.append(row)
        elif row is group[0]:
            out.append(_sweep_row(row["sweep"], group, row["sweep"] in unfolded))
            if row["sweep"] in unfolded:
                out += [{**r, "name": "└ " + (r["name"].partition(": ")[2] or r["name"])}
                        for r in group]  # fmt: skip
    return out


def _sweep_row(sweep: str, group: list[dict[str, Any]], unfolded: bool) -> dict[str, Any]:
    """A sweep's row of the runs table: how many of its runs are in each status."""
    counts: dict[str, int] = {}
    for r in group:
        counts[r["status"]] = counts.get(r["status"], 0) + 1
    title = group[-1]["name"].partition(": ")[0] or "sweep"
    return {
        "id": sweep,
        "name": f"{'▾' if unfolded else '▸'} {title} ({len(group)} runs)",
        "status": ", ".join(f"{n} {status}" for status, n in counts.items()),
        "progress": f"{sum(r['status'] in FINISHED for r in group)}/{len(group)} runs ended",
        "created": group[-1]["created"],
        "model": models.pop() if len(models := {r["model"] for r in group}) == 1 else "",
        "sweep": sweep,
        "runs": ",".join(r["id"] for r in group),
    }


def _row(r: dict[str, Any], now: float) -> dict[str, Any]:
    """One run (as the service shows it) as a row of the runs table, at time ``now``."""
    config = r.get("config") or {}
    total = r["steps_total"]
    final = r.get("final") or {}
    norm = (config.get("norm") or {}).get("kind", "")
    done = r["steps_done"]
    started, ended = r.get("started_at"), r.get("finished_at")
    elapsed = ((ended or now) - started) if started else None
    if r["status"] == RunStatus.QUEUED.value:
        position = r["queue_position"]
        when = f"queued, #{position + 1}" if position is not None else "queued"
    elif r["status"] == RunStatus.RUNNING.value and total and done and elapsed:
        when = f"about {_duration(elapsed * (total - done) / done)} left"
    else:
        when = ""
    return {
        "id": r["id"],
        "name": r["name"] or "",
        "sweep": r.get("sweep_id") or "",
        "status": r["status"],
        "progress": f"{done}/{total}" if total else f"{done} steps",
        "created": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(r["created_at"])),
        "duration": _duration(elapsed) if elapsed is not None else "",
        "eta": when,
        "model": _describe(config),
        "norm": norm,
        "test_acc": round(final["test_acc"], 4) if "test_acc" in final else None,
        "doctor": badge(r.get("doctor")),
        "message": (r.get("message") or "").splitlines()[0][:120] if r.get("message") else "",
    }


def badge(counts: dict[str, int] | None) -> str:
    """A run's BN doctor badge: its active, unsilenced errors and warnings ("1 error, 2
    warnings"; "" for none)."""
    counts = counts or {}
    parts = [f"{n} {what}{'s' * (n > 1)}" for what, n in (("error", counts.get("errors", 0)),
             ("warning", counts.get("warnings", 0))) if n]  # fmt: skip
    return ", ".join(parts)


def _duration(elapsed: float) -> str:
    seconds = max(0, round(elapsed))
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"


def _describe(config: dict[str, Any]) -> str:
    m = config.get("model") or {}
    if not m:
        return "client"
    return (
        f"{m.get('kind', '')} {m.get('depth')}x{m.get('width')} {m.get('activation', '')}, "
        f"{(config.get('data') or {}).get('name', '')}, bs {config.get('batch_size')}, "
        f"lr {(config.get('optim') or {}).get('lr')}"
    )


def run_view(svc: Service, run_id: str, layer: str | None) -> dict[str, Any]:
    """Everything the run view draws, in one read of the store (NotFound: no such run)."""
    run = svc.runs.get(run_id)
    layers = svc.records.layer_names(run)
    layer = layer if layer in layers else (layers[0] if layers else None)
    keys = [("", "loss"), *[("", s) for s in EVAL_STATS]]
    if layer:
        keys += [(layer, s) for s in LAYER_STATS]
        # tracked units' percentiles and replicas' variances: those the run has records of
        # (never as many as its meta says: a view costs what is stored)
        found = sorted(
            s for lay, s in svc.records.names(run_id) if lay == layer and _PER_UNIT.fullmatch(s)
        )
        keys += [(layer, s) for s in found]
        keys += [(layer, s) for s in REPLICA_STATS if any(f.startswith("r") for f in found)]
    data = svc.records.series(run_id, keys)
    loss_steps, loss = data[("", "loss")]
    last = int(loss_steps[-1]) if len(loss_steps) else 0
    edges = np.unique(np.linspace(0, max(last, 1), HEAT_COLUMNS + 1).round().astype(np.int64))
    # layer x step overviews: every step of a short run, the stored bin means of a long one
    heat_keys = [(lay, s) for lay in layers for s in HEAT_STATS]
    source = svc.records.for_bins(run_id, heat_keys, last, HEAT_COLUMNS)
    heat = {}
    for stat in HEAT_STATS:
        heat[stat] = (
            np.stack([bin_means(*source[(lay, stat)], edges) for lay in layers], axis=1)
            if layers
            else np.empty((len(edges) - 1, 0))
        )
    centers = (edges[:-1] + edges[1:]) / 2
    filled = ~np.all(np.isnan(heat["pre_var"]), axis=1) if layers else np.zeros(0, bool)
    latest = _latest_measured(
        svc, run_id, [(lay, s) for lay in layers for s in ("grad_in_norm", "grad_out_norm")]
    )
    depth = {
        stat: [_finite(latest[(lay, stat)]) for lay in layers]
        for stat in ("grad_in_norm", "grad_out_norm")
    }
    lines = {"loss": minmax(loss_steps, loss, LINE_POINTS)}
    evals = {s: data[("", s)] for s in EVAL_STATS}
    detail = {}
    if layer:
        detail = {key[1]: minmax(*data[key], LINE_POINTS) for key in keys if key[0] == layer}
    channels = svc.records.channels(run_id, None)["layers"]
    by_block = _at_evaluations(svc, run_id, layers)
    return {
        "run": run,
        "layers": layers,
        "layer": layer,
        "last_step": last,
        "heat_steps": centers[filled],
        "heat": {k: v[filled] for k, v in heat.items()},
        "depth": depth,
        "lines": lines,
        "evals": evals,
        "detail": detail,
        "channels": channels,
        "by_block": by_block,
    }


def _at_evaluations(svc: Service, run_id: str, layers: list[str]) -> dict[str, Any]:
    """Per statistic of BLOCK_EVAL_STATS: the layers that have it, and its values there at the
    first and at the latest evaluation ({"layers", "first", "last", "first_step",
    "last_step"})."""
    data = svc.records.series(run_id, [(lay, s) for lay in layers for s in BLOCK_EVAL_STATS])
    out: dict[str, Any] = {}
    for stat in BLOCK_EVAL_STATS:
        names: list[str] = []
        first: list[float] = []
        last: list[float] = []
        steps: set[int] = set()
        for lay in layers:
            st, vals = data[(lay, stat)]
            ok = np.isfinite(vals)
            if ok.any():
                names.append(lay)
                first.append(float(vals[ok][0]))
                last.append(float(vals[ok][-1]))
                steps.update((int(st[ok][0]), int(st[ok][-1])))
        out[stat] = {
            "layers": names,
            "first": first,
            "last": last,
            "first_step": min(steps, default=0),
            "last_step": max(steps, default=0),
        }
    return out


def _latest_measured(
    svc: Service, run_id: str, keys: list[tuple[str, str]]
) -> dict[tuple[str, str], float]:
    """The latest value of each series that was measured: a script may measure a statistic at
    some steps only (gradients at steps 1 and 21), its other steps NaN; NaN where never."""
    latest = svc.records.last(run_id, keys)
    unmeasured = [key for key, v in latest.items() if not np.isfinite(v)]
    for key, (_, values) in svc.records.series(run_id, unmeasured).items() if unmeasured else ():
        measured = values[np.isfinite(values)]
        if len(measured):
            latest[key] = float(measured[-1])
    return latest


def _finite(v: float) -> float | None:
    return v if np.isfinite(v) else None


def compare_view(
    svc: Service, run_ids: list[str], stat: str, layer: str | None
) -> tuple[list[dict[str, Any]], list[str]]:
    """Per run: its name, loss, test accuracy, and one statistic of one layer position; and
    the ids that name no run."""
    out, missing = [], []
    for run_id in run_ids:
        try:
            run = svc.runs.get(run_id)
        except NotFound:
            missing.append(run_id)
            continue
        layers = svc.records.layer_names(run)
        lay = layer if layer in layers else (layers[-1] if layers else "")
        keys = [("", "loss"), ("", "test_acc"), (lay, stat)]
        data = svc.records.series(run_id, keys)
        out.append(
            {
                "id": run_id,
                "name": run["name"] or run_id,
                "status": run["status"],
                "layer": lay,
                "layers": layers,
                "loss": minmax(*data[keys[0]], LINE_POINTS),
                "test_acc": data[keys[1]],
                "stat": minmax(*data[keys[2]], LINE_POINTS),
            }
        )
    return out, missing
