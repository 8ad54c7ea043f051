"""The server under load, measured against a real ``bnscope serve`` on 127.0.0.1 (SQLite):

1. live latency: from a record's creation in a training worker (the wall clock of its step) to
   its arrival at an SSE client; target p95 <= 250 ms;
2. ingest: statistic values per second stored through the ingest endpoint, sustained; target
   >= 100,000/s; and a training run's speed through the server against the same run alone;
3. ``GET /metrics?max_points=2000`` on a 100k-step run while two runs train; target p99 <= 50 ms.

    python benchmarks/api.py            # about two minutes
    python benchmarks/api.py --doctor-off   # the same, without the BN doctor on ingest

The BN doctor's cost (bncore.diagnose, run by the server on every batch ingested): ingest
throughput with it on and off, side by side, on two servers alternately (``--rounds`` each):

    python benchmarks/api.py --doctor-compare [--running-stats]

``--running-stats``: the batches also carry each layer's running mean and variance, as a
worker's do, so that the doctor's rules on them run too (the plain batch leaves them out).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
import orjson
from httpx_sse import connect_sse

from bnscope.process import ServerProcess, wait_for

LAYERS = [f"block{i}" for i in range(6)]
MAX_RUNS = 2
TRAIN = {
    "model": {"depth": 6, "width": 128},
    "data": {"name": "mnist1d"},
    "batch_size": 64,
    "channel_interval": 100,
    "eval_interval": 1000,
}


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q))


def live_latency(srv: ServerProcess, seconds: float) -> dict[str, float]:
    with srv.client() as api:
        run = api.post("/api/runs", json={**TRAIN, "steps": 1_000_000}).json()
        wait_for(lambda: api.get(f"/api/runs/{run['id']}").json()["status"] == "running")
        latencies: list[float] = []
        deadline = time.time() + seconds
        with (
            httpx.Client(base_url=srv.url, timeout=30) as c,
            connect_sse(c, "GET", f"/api/runs/{run['id']}/stream") as source,
        ):
            for sse in source.iter_sse():
                if sse.event == "records":
                    arrived = time.time()
                    created = sse.json()["steps"]["time"]
                    latencies += [arrived - t for t in created]
                if time.time() > deadline:
                    break
        api.post(f"/api/runs/{run['id']}/cancel")
    return {
        "records": len(latencies),
        "p50_ms": 1e3 * percentile(latencies, 50),
        "p95_ms": 1e3 * percentile(latencies, 95),
        "max_ms": 1e3 * max(latencies),
    }


def synthetic_batch(
    step0: int, steps: int, seq: int, names: list[str] = LAYERS, running: bool = False
) -> tuple[bytes, int]:
    """A worker-shaped batch: steps, layers x 29 statistics (31 with ``running``: the running
    mean and variance too), no per-channel arrays."""
    rng = np.random.default_rng(seq)
    s = np.arange(step0, step0 + steps)
    layers = {"step": np.repeat(s, len(names)).tolist(), "layer": names * steps}
    stats = [
        "pre_mean",
        "pre_var",
        "post_mean",
        "post_var",
        "act_mean",
        "act_var",
        "act_saturated",
        "act_dead",
        "running_mean_gap",
        "running_var_gap",
        "gamma",
        "beta",
        "gamma_grad_norm",
        "beta_grad_norm",
        "grad_out_norm",
        "grad_in_norm",
        "weight_grad_norm",
        "pre_mean_abs",
        "pre_var_min",
        "pre_var_max",
        *(f"p{q}_{j}" for q in (15, 50, 85) for j in range(3)),
        *(("running_mean", "running_var") if running else ()),
    ]
    for k in stats:
        layers[k] = np.abs(rng.standard_normal(len(s) * len(names))).astype(np.float32)
    body = {
        "seq": seq,
        "steps": {
            "step": s,
            "loss": rng.random(steps),
            "lr": np.full(steps, 0.1),
            "step_time": np.full(steps, 0.01),
            "time": np.full(steps, 1.0),
        },
        "layers": layers,
    }
    values = steps * 4 + len(s) * len(names) * len(stats)
    return orjson.dumps(body, option=orjson.OPT_SERIALIZE_NUMPY), values


def ingest_rate(
    srv: ServerProcess, steps_total: int, batch_steps: int, running: bool = False
) -> tuple[str, float]:
    """Fill a client run with steps_total steps as fast as the server takes them."""
    with srv.client() as api:
        run = api.post(
            "/api/runs/client", json={"name": "synthetic", "meta": {"layers": LAYERS}}
        ).json()
        sent, t0 = 0, time.perf_counter()
        for i, step0 in enumerate(range(1, steps_total + 1, batch_steps), 1):
            body, n = synthetic_batch(
                step0, min(batch_steps, steps_total + 1 - step0), i, running=running
            )
            r = api.post(
                f"/api/runs/{run['id']}/records",
                content=body,
                headers={"content-type": "application/json", "X-Run-Token": run["write_token"]},
            )
            r.raise_for_status()
            sent += n
        api.post(
            f"/api/runs/{run['id']}/status",
            json={"status": "completed"},
            headers={"X-Run-Token": run["write_token"]},
        ).raise_for_status()  # timed too: batches the doctor left for later are diagnosed now
        rate = sent / (time.perf_counter() - t0)
    return run["id"], rate


def worker_speed(srv: ServerProcess, steps: int) -> dict[str, float]:
    """Steps/s of a run trained by the server against the same run trained alone, with the
    torch threads the server gives a run."""
    import torch

    from bncore.record.sinks import MemorySink
    from bncore.run.config import parse_config
    from bncore.run.engine import Trainer
    from server.settings import Settings

    cfg = {**TRAIN, "steps": steps}
    threads = torch.get_num_threads()
    torch.set_num_threads(Settings(max_runs=MAX_RUNS).threads_per_run())

    class Timed(MemorySink):  # from "running" to the end, as the server's timestamps
        def start(self, meta: dict) -> None:
            self.t0 = time.time()
            super().start(meta)

        def finish(self, summary: dict) -> None:
            self.t1 = time.time()
            super().finish(summary)

    try:
        Trainer(parse_config({**cfg, "steps": 50})).run(MemorySink())  # warm: kernel, data
        sink = Timed()
        Trainer(parse_config(cfg)).run(sink, flush_seconds=0.05)
        alone = steps / (sink.t1 - sink.t0)
    finally:
        torch.set_num_threads(threads)
    with srv.client() as api:
        run = api.post("/api/runs", json=cfg).json()
        done = wait_for(
            lambda: (
                (r := api.get(f"/api/runs/{run['id']}").json())["status"] in ("completed", "failed")
                and r
            ),
            600,
            0.2,
        )
    served = steps / (done["finished_at"] - done["started_at"])
    return {"alone_steps_per_s": alone, "served_steps_per_s": served, "ratio": served / alone}


def query_latency(srv: ServerProcess, run_id: str, requests: int) -> dict[str, float]:
    with srv.client() as api:
        trainers = [
            api.post("/api/runs", json={**TRAIN, "steps": 1_000_000}).json()["id"] for _ in range(2)
        ]
        wait_for(
            lambda: all(api.get(f"/api/runs/{t}").json()["status"] == "running" for t in trainers),
            120,
        )
        times = []
        for i in range(requests):
            stat = ("pre_var", "grad_in_norm", "act_dead", "gamma")[i % 4]
            t0 = time.perf_counter()
            r = api.get(
                f"/api/runs/{run_id}/metrics",
                params={"stat": stat, "layer": LAYERS[i % 6], "max_points": 2000},
            )
            times.append(time.perf_counter() - t0)
            r.raise_for_status()
            assert len(r.json()["series"][0]["steps"]) <= 2000
        whole = api.get(f"/api/runs/{run_id}/metrics", params={"stat": "loss"}).json()
        for t in trainers:
            api.post(f"/api/runs/{t}/cancel")
    return {
        "points_total": whole["series"][0]["points_total"],
        "p50_ms": 1e3 * percentile(times, 50),
        "p99_ms": 1e3 * percentile(times, 99),
    }


def doctor_compare(steps: int, batch_steps: int, rounds: int, running: bool) -> None:
    """Ingest throughput with the BN doctor on (its defaults) and off (--no-doctor), side by
    side: two servers, the same batches, alternately, ``rounds`` times each."""
    rates: dict[str, list[float]] = {"on": [], "off": []}
    with tempfile.TemporaryDirectory() as tmp:
        servers = {
            "on": ServerProcess(Path(tmp) / "on").start(),
            "off": ServerProcess(Path(tmp) / "off", "--no-doctor").start(),
        }
        try:
            ingest_rate(servers["on"], batch_steps * 2, batch_steps, running)  # warm both
            ingest_rate(servers["off"], batch_steps * 2, batch_steps, running)
            for r in range(rounds):
                for mode in ("on", "off") if r % 2 == 0 else ("off", "on"):
                    rates[mode].append(ingest_rate(servers[mode], steps, batch_steps, running)[1])
                    print(f"  round {r + 1}, doctor {mode}: {rates[mode][-1]:,.0f} values/s")
        finally:
            for srv in servers.values():
                srv.stop()
    on, off = (float(np.median(rates[m])) for m in ("on", "off"))
    what = "with running statistics" if running else "as the plain benchmark's"
    print(
        f"ingest, batches {what}, {steps:,} steps x 6 layers, median of {rounds}: doctor on "
        f"{on:,.0f} values/s, off {off:,.0f} values/s: the doctor costs {1 - on / off:.1%} "
        f"(target <= 5%: {'met' if on >= 0.95 * off else 'MISSED'})"
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--latency-seconds", type=float, default=20)
    ap.add_argument("--history-steps", type=int, default=100_000)
    ap.add_argument("--queries", type=int, default=300)
    ap.add_argument("--worker-steps", type=int, default=1500)
    ap.add_argument("--doctor-off", action="store_true", help="serve with --no-doctor")
    ap.add_argument(
        "--doctor-compare", action="store_true", help="only ingest, doctor on against off"
    )
    ap.add_argument("--rounds", type=int, default=3, help="of --doctor-compare, each")
    ap.add_argument("--batch-steps", type=int, default=2000, help="steps per ingested batch")
    ap.add_argument(
        "--running-stats", action="store_true", help="batches carry the running statistics"
    )
    args = ap.parse_args(argv)
    if args.doctor_compare:
        doctor_compare(args.history_steps, args.batch_steps, args.rounds, args.running_stats)
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        flags = ("--no-doctor",) if args.doctor_off else ()
        srv = ServerProcess(Path(tmp), "--max-runs", str(MAX_RUNS), *flags).start()
        try:
            lat = live_latency(srv, args.latency_seconds)
            print(
                f"live latency, worker to SSE client: p50 {lat['p50_ms']:.0f} ms, "
                f"p95 {lat['p95_ms']:.0f} ms, max {lat['max_ms']:.0f} ms over {lat['records']} "
                f"records  (target p95 <= 250 ms: {'met' if lat['p95_ms'] <= 250 else 'MISSED'})"
            )
            run_id, rate = ingest_rate(srv, args.history_steps, args.batch_steps)
            print(
                f"ingest: {rate:,.0f} statistic values/s into SQLite, "
                f"{args.history_steps:,} steps x 6 layers  "
                f"(target >= 100,000/s: {'met' if rate >= 1e5 else 'MISSED'})"
            )
            q = query_latency(srv, run_id, args.queries)
            print(
                f"GET /metrics?max_points=2000 on a {q['points_total']:,}-step run while two "
                f"runs train: p50 {q['p50_ms']:.1f} ms, p99 {q['p99_ms']:.1f} ms  "
                f"(target p99 <= 50 ms: {'met' if q['p99_ms'] <= 50 else 'MISSED'})"
            )
            w = worker_speed(srv, args.worker_steps)
            print(
                f"training through the server: {w['served_steps_per_s']:.0f} steps/s against "
                f"{w['alone_steps_per_s']:.0f} alone (ratio {w['ratio']:.2f})"
            )
        finally:
            srv.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
