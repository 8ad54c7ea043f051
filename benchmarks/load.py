"""The live path under load, against a real ``bnscope serve`` on 127.0.0.1 (SQLite):

- an idle phase: the server trains nothing; ``GET /metrics`` (every statistic the run view
  draws, all 20 layers, max_points=1000: a chart 1000 pixels wide) on a finished 20-layer,
  20k-step run, timed;
- a loaded phase: 2 runs train while 100 SSE clients (in a process of their own, as remote
  browsers would be) follow them (50 each), and the same
  queries are timed, side by side with the idle figures; every client must receive every
  batch (sequence numbers without a gap, from its first to the run's last) and the final
  status; the server's memory (RSS) is sampled each second, and its slope after the warm-up
  is reported.

Targets (issue 17): no event lost; memory flat after warm-up; ``/metrics`` p95 <= 100 ms.

    python benchmarks/load.py               # about two minutes
    python benchmarks/load.py --clients 30 --seconds 30
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing as mp
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import orjson
from api import TRAIN as API_TRAIN  # benchmarks/api.py, beside this script
from httpx_sse import aconnect_sse

from bnscope.process import ServerProcess, wait_for

ENV: dict[str, str] = {}
LAYERS = [f"block{i}" for i in range(20)]
STATS = ["pre_mean", "pre_var", "post_mean", "post_var", "running_mean", "gamma", "loss"]
TRAIN = {
    **API_TRAIN,
    "model": {"depth": 6, "width": 64},
    "channel_interval": 20,
    "eval_interval": 500,
    "steps": 1_000_000,
}


def finished_run(api: httpx.Client, steps: int = 20_000) -> str:
    """A script's run with ``steps`` steps of every layer's statistics, completed."""
    run = api.post("/api/runs/client", json={"name": "load", "meta": {"layers": LAYERS}}).json()
    token = {"X-Run-Token": run["write_token"], "content-type": "application/json"}
    for seq, step0 in enumerate(range(1, steps + 1, 2000), 1):
        s = np.arange(step0, step0 + 2000)
        rows = np.repeat(s, len(LAYERS))
        layers: dict[str, object] = {"step": rows, "layer": LAYERS * len(s)}
        layers.update({k: np.random.rand(len(rows)) for k in STATS if k != "loss"})
        body = {"seq": seq, "steps": {"step": s, "loss": 1 / s}, "layers": layers}
        content = orjson.dumps(body, option=orjson.OPT_SERIALIZE_NUMPY)
        api.post(f"/api/runs/{run['id']}/records", content=content, headers=token)
        api.post(f"/api/runs/{run['id']}/heartbeat", headers=token)
    api.post(f"/api/runs/{run['id']}/status", json={"status": "completed"}, headers=token)
    return run["id"]


def time_metrics(url: str, run_id: str, n: int, pause: float = 0.0) -> list[float]:
    """Milliseconds of ``n`` /metrics reads of the run view's series."""
    took = []
    with httpx.Client(base_url=url, timeout=60) as c:
        for _ in range(n):
            t0 = time.perf_counter()
            c.get(f"/api/runs/{run_id}/metrics", params={"stat": STATS, "max_points": 1000})
            took.append((time.perf_counter() - t0) * 1000)
            time.sleep(pause)
    return took


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


async def follow(url: str, run_id: str, got: dict[str, object]) -> None:
    """One SSE client: every ``records`` id it sees, and whether the final status came."""
    seqs: list[int] = []
    got["seqs"], got["final"], got["resets"] = seqs, False, 0
    async with (
        httpx.AsyncClient(base_url=url, timeout=None) as c,
        aconnect_sse(c, "GET", f"/api/runs/{run_id}/stream") as source,
    ):
        async for sse in source.aiter_sse():
            got["open"] = True  # the stream opens with the run's status
            if not sse.data:  # a keep-alive comment
                continue
            if sse.event == "records" and sse.id:
                seqs.append(int(sse.id))
            elif sse.event == "reset":
                got["resets"] = int(got["resets"]) + 1  # type: ignore[call-overload]
            elif sse.event == "status" and orjson.loads(sse.data)["status"] in (
                "completed", "failed", "cancelled", "diverged", "interrupted"
            ):  # fmt: skip
                got["final"] = True
                return


def followers(url: str, runs: list[str], n: int, out: object) -> None:
    """Process entry: ``n`` SSE clients, half on each run, until the runs end."""
    os.nice(5)
    results: list[dict[str, object]] = [{} for _ in range(n)]

    async def ready() -> None:  # every client has its first event: the timing may start
        while not all(r.get("open") for r in results):
            await asyncio.sleep(0.1)
        out.put("ready")  # type: ignore[attr-defined]

    async def all_of_them() -> None:
        await asyncio.gather(ready(), *(follow(url, runs[i % 2], results[i]) for i in range(n)))

    asyncio.run(all_of_them())
    out.put(results)  # type: ignore[attr-defined]


def lost(seqs: list[int]) -> int:
    """Batches missing between a client's first and last (ids are consecutive)."""
    if not seqs:
        return 0
    return (seqs[-1] - seqs[0] + 1) - len(set(seqs))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--clients", type=int, default=100)
    ap.add_argument("--seconds", type=float, default=60.0)
    ap.add_argument("--queries", type=int, default=200)
    ap.add_argument("--env", action="append", default=[], help="NAME=VALUE for the server")
    args = ap.parse_args()
    ENV.update(kv.split("=", 1) for kv in args.env)

    with tempfile.TemporaryDirectory() as tmp:
        srv = ServerProcess(Path(tmp), "--max-runs", "2", env=ENV).start()
        assert srv.proc is not None
        pid = srv.proc.pid
        try:
            with srv.client() as api:
                big = finished_run(api)
                time_metrics(srv.url, big, 10)  # warm caches
                idle = time_metrics(srv.url, big, args.queries, pause=0.05)
                idle_rss = rss_mb(pid)
                runs = [api.post("/api/runs", json=TRAIN).json()["id"] for _ in range(2)]
                for rid in runs:
                    wait_for(lambda r=rid: api.get(f"/api/runs/{r}").json()["status"] == "running")

            # the clients in a process of their own, as browsers elsewhere would be: their
            # parsing must not hold up the timed reads (one GIL)
            ctx = mp.get_context("spawn")
            out: mp.Queue = ctx.Queue()
            clients = ctx.Process(target=followers, args=(srv.url, runs, args.clients, out))
            clients.start()
            assert out.get(timeout=120) == "ready"
            samples: list[tuple[float, float]] = []
            loaded: list[float] = []
            t0 = time.monotonic()
            stop = threading.Event()

            def sample() -> None:
                while not stop.is_set():
                    samples.append((time.monotonic() - t0, rss_mb(pid)))
                    stop.wait(1.0)

            sampler = threading.Thread(target=sample, daemon=True)
            sampler.start()
            while time.monotonic() - t0 < args.seconds:
                loaded += time_metrics(srv.url, big, 5, pause=0.05)
            with srv.client() as api:
                steps = [api.get(f"/api/runs/{r}").json()["steps_done"] for r in runs]
                for rid in runs:
                    api.post(f"/api/runs/{rid}/cancel")
            results: list[dict[str, object]] = out.get(timeout=120)
            clients.join(30)
            stop.set()
            sampler.join()
        finally:
            srv.stop()

    done = sum(1 for r in results if r.get("final"))
    missing = sum(lost(r.get("seqs") or []) for r in results)  # type: ignore[arg-type]
    resets = sum(int(r.get("resets") or 0) for r in results)  # type: ignore[call-overload]
    events = sum(len(r.get("seqs") or []) for r in results)  # type: ignore[arg-type]
    warm = [(t, m) for t, m in samples if t >= min(20.0, args.seconds / 3)]
    slope = (
        float(np.polyfit([t for t, _ in warm], [m for _, m in warm], 1)[0]) * 60
        if len(warm) > 2
        else float("nan")
    )
    p = lambda xs, q: float(np.percentile(xs, q))  # noqa: E731
    print(f"{args.clients} SSE clients on 2 training runs for {args.seconds:.0f} s "
          f"(steps trained: {steps})")  # fmt: skip
    print(f"events received: {events}; lost: {missing}; resets: {resets}; "
          f"clients that saw the final status: {done}/{args.clients}")  # fmt: skip
    print(
        f"server RSS: idle {idle_rss:.0f} MB, loaded {samples[0][1]:.0f} -> {samples[-1][1]:.0f}"
        f" MB (max {max(m for _, m in samples):.0f}); slope after warm-up {slope:+.1f} MB/min"
    )
    print(f"/metrics ms     idle p50 {p(idle, 50):6.1f}  p95 {p(idle, 95):6.1f}  (n={len(idle)})")
    print(
        f"/metrics ms   loaded p50 {p(loaded, 50):6.1f}  p95 {p(loaded, 95):6.1f}  "
        f"(n={len(loaded)}); ratio of p95 {p(loaded, 95) / p(idle, 95):.2f}"
    )
    ok = missing == 0 and done == args.clients and p(loaded, 95) <= 100
    print("targets met" if ok else "targets NOT met")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
