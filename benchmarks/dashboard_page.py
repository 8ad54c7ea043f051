"""The dashboard in a real headless Chromium against a real ``bnscope serve``:

1. a finished 100k-step, 20-layer run opens (all figures of its view drawn) in <= 2 s, from
   the dashboard (the user picks it in the runs list and clicks Open); a cold page load with a
   link to the run is reported too;
2. while a run trains at 10 records per second per layer, a record is drawn <= 500 ms after its
   creation in the worker (p95, measured in the page for the oldest record of each redraw);
3. no main-thread task over 200 ms while it streams (PerformanceObserver 'longtask').

The live part runs twice: at statistics interval 1 (every step recorded, as fast as the worker
trains: several times the target's load, reported for information), then with the interval
that gives about 10 records per second per layer at the rate just measured (the target).

First, side by side with the version ``--baseline`` names (a git ref, checked out into a
temporary git worktree, its server run from there with the same Python), issue 28's figures of
the first second:

4. launch to first point: the Launch form's defaults POSTed, the run's link opened in a page
   where the dashboard was open; the time until the loss figure draws its first point
   (target < 2 s), median of ``--launches``, each server having launched one run before;
5. first screen: a finished 2,000-step, 20-layer run (trained here once, its records posted to
   each server through the client ingest API) opened by its link in a fresh browser context;
   the time until all six Overview figures are drawn with data (target < 1 s), median of
   ``--first-opens``;
6. the longest main-thread task during 5 (PerformanceObserver 'longtask').

    python benchmarks/dashboard_page.py                      # all of it
    python benchmarks/dashboard_page.py --side-by-side-only --baseline 104d4d4
"""

from __future__ import annotations

import argparse
import contextlib
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from api import synthetic_batch
from playwright.sync_api import sync_playwright

from bncore.record.sinks import HttpSink, MemorySink
from bnscope.process import ServerProcess, wait_for
from dashboard.browser import WATCH_LONG_TASKS, launch_browser

ROOT = Path(__file__).resolve().parents[1]
#: The version before issue 28's work on the dashboard's first second.
BASELINE = "104d4d4"
VIEWPORT = {"width": 1500, "height": 1000}
#: The run view's Overview (dashboard/views/run.py SECTIONS["overview"]).
OVERVIEW = ["fig-loss", "fig-acc", "fig-heat-var", "fig-heat-mean", "fig-depth", "fig-channels"]
#: Whether each figure named is drawn with data: a point of a line, or a value of a heatmap, in
#: what plotly computed from it (its calcdata: the same however the data was encoded).
DRAWN_WITH_DATA = """(ids) => ids.every((id) => {
  const gd = document.querySelector('#' + id + ' .js-plotly-plot');
  const finite = (row) => Array.from(row || []).some(Number.isFinite);
  return !!(gd && gd._fullLayout && gd.calcdata && gd.calcdata.some((cd) => (cd || []).some(
    (p) => p && ((Number.isFinite(p.x) && Number.isFinite(p.y)) ||
                 (p.z && Array.from(p.z).some(finite))))));
})"""

LAYERS = [f"block{i}" for i in range(20)]
DRAWN = """() => { const g = document.querySelectorAll('#fig-heat-var .js-plotly-plot');
  return g.length && g[0].data && g[0].data[0] && g[0].data[0].z && g[0].data[0].z.length > 0; }"""


def big_run(srv: ServerProcess, steps: int) -> str:
    with srv.client() as api:
        run = api.post(
            "/api/runs/client", json={"name": "100k steps, 20 layers", "meta": {"layers": LAYERS}}
        ).json()
        for i, step0 in enumerate(range(1, steps + 1, 2000), 1):
            body, _ = synthetic_batch(step0, min(2000, steps + 1 - step0), i, LAYERS)
            api.post(
                f"/api/runs/{run['id']}/records",
                content=body,
                headers={"content-type": "application/json", "X-Run-Token": run["write_token"]},
            ).raise_for_status()
        api.post(
            f"/api/runs/{run['id']}/status",
            json={"status": "completed"},
            headers={"X-Run-Token": run["write_token"]},
        )
    return run["id"]


def live(browser, srv: ServerProcess, stats_interval: int, seconds: float) -> dict:
    """Streams a training run into the page for ``seconds``; what the page measured."""
    with srv.client() as api:
        run = api.post(
            "/api/runs",
            json={
                "steps": 1_000_000,
                "stats_interval": stats_interval,
                "channel_interval": 1000,
                "model": {"depth": 6, "width": 64},
                "data": {"name": "mnist1d"},
                "eval_interval": 500,
            },
        ).json()
        wait_for(lambda: api.get(f"/api/runs/{run['id']}").json()["status"] == "running", 120)
        page = browser.new_page(viewport={"width": 1500, "height": 1000})
        page.add_init_script(WATCH_LONG_TASKS)
        page.goto(f"{srv.url}/dashboard/?run={run['id']}")
        page.wait_for_function(DRAWN, timeout=60_000)
        page.evaluate(
            "() => { Object.assign(window.bnscope, {latencies: [], latenciesAll: []});"
            " window.__longTasks = []; }"
        )
        start = api.get(f"/api/runs/{run['id']}").json()["steps_done"]
        time.sleep(seconds)
        out = {
            "lat": page.evaluate("() => window.bnscope.latencies"),
            "lat_all": page.evaluate("() => window.bnscope.latenciesAll"),
            "long_tasks": page.evaluate("() => window.__longTasks"),
            "steps_per_s": (api.get(f"/api/runs/{run['id']}").json()["steps_done"] - start)
            / seconds,
        }
        api.post(f"/api/runs/{run['id']}/cancel")
        page.close()
    out["records_per_s"] = out["steps_per_s"] / stats_interval
    return out


def report(m: dict, stats_interval: int, judged: bool) -> None:
    lat, worst = m["lat"], max(m["long_tasks"], default=0.0)
    p95 = np.percentile(lat, 95)
    verdict = f" (target <= 500 ms: {'met' if p95 <= 0.5 else 'MISSED'})" if judged else ""
    print(
        f"live at statistics interval {stats_interval} (~{m['steps_per_s']:.0f} steps/s, "
        f"{m['records_per_s']:.0f} records/s per layer): {len(lat)} redraws, record to screen "
        f"p50 {1e3 * np.median(lat):.0f} ms, p95 {1e3 * p95:.0f} ms{verdict}; in every figure "
        f"of the section: p95 {1e3 * np.percentile(m['lat_all'], 95):.0f} ms"
    )
    verdict = f" (target <= 200 ms: {'met' if worst <= 200 else 'MISSED'})" if judged else ""
    print(
        f"  main-thread tasks over 50 ms: {len(m['long_tasks'])}, longest {worst:.0f} ms{verdict}"
    )


@contextlib.contextmanager
def checkout(ref: str, where: Path) -> Iterator[Path]:
    """``ref`` of this repository, checked out at ``where`` (a git worktree) while in use."""
    git = ["git", "-C", str(ROOT), "worktree"]
    subprocess.run([*git, "add", "--detach", "--quiet", str(where), ref], check=True)
    try:
        yield where
    finally:
        subprocess.run([*git, "remove", "--force", str(where)], check=False)


def finished_run(steps: int, depth: int) -> MemorySink:
    """A real run's records, meta and summary: bncore's trainer, ``depth`` BN layers."""
    from bncore.run.config import RunConfig
    from bncore.run.data import load_dataset
    from bncore.run.engine import Trainer

    config = RunConfig.model_validate({"steps": steps, "model": {"depth": depth, "width": 64}})
    sink = MemorySink()
    Trainer(config, load_dataset(config.data)).run(sink, flush_every=200, flush_seconds=1e9)
    return sink


def replay(srv: ServerProcess, run: MemorySink, name: str) -> str:
    """``run`` posted to ``srv`` as a script's run (POST /api/runs/client, then its records and
    its end, as a worker sends them); its id."""
    with srv.client() as api:
        made = api.post("/api/runs/client", json={"name": name, "meta": run.meta}).json()
        sink = HttpSink(api, made["id"], token=made["write_token"])
        for part in run.parts:
            sink.write(part)
        sink.finish(run.summary)
        assert api.get(f"/api/runs/{made['id']}").json()["status"] == "completed"
    return made["id"]


#: The bytes a page has fetched, as sent (its document and every resource).
FETCHED = """() => performance.getEntriesByType('navigation').concat(
  performance.getEntriesByType('resource')).reduce((n, e) => n + e.transferSize, 0)"""
FIRST_POINT = """() => { const gd = document.querySelector('#fig-loss .js-plotly-plot');
  return !!(gd && gd.calcdata && gd.calcdata.some((cd) => (cd || []).some(
    (p) => p && Number.isFinite(p.x) && Number.isFinite(p.y)))); }"""


def launch_to_first_point(browser, srv: ServerProcess) -> tuple[float, float]:
    """Seconds from the POST of a run (the Launch form's defaults) to its first loss point
    drawn in a page that opens its link (the dashboard's scripts already loaded there), and
    from its creation to its worker's first report (running, with its network built: the
    server's clock, ``started_at``)."""
    context = browser.new_context(viewport=VIEWPORT)
    page = context.new_page()
    page.goto(f"{srv.url}/dashboard/")
    page.wait_for_selector("#tabs")
    with srv.client() as api:
        t0 = time.perf_counter()
        run = api.post("/api/runs", json={}).json()
        page.goto(f"{srv.url}/dashboard/?run={run['id']}")
        page.wait_for_function(FIRST_POINT, polling="raf", timeout=120_000)
        took = time.perf_counter() - t0
        api.post(f"/api/runs/{run['id']}/cancel")
        done = wait_for(
            lambda: (r := api.get(f"/api/runs/{run['id']}").json())["status"] != "running" and r,
            60,
        )
    context.close()
    return took, done["started_at"] - done["created_at"]


def first_screen(browser, srv: ServerProcess, run_id: str) -> tuple[float, float, float]:
    """Seconds from opening ``run_id``'s link in a fresh browser context (nothing cached) until
    every Overview figure is drawn with data, the longest main-thread task meanwhile (ms), and
    the bytes the page fetched by then (MB, as sent: compressed where it was)."""
    context = browser.new_context(viewport=VIEWPORT)
    page = context.new_page()
    page.add_init_script(WATCH_LONG_TASKS)
    t0 = time.perf_counter()
    page.goto(f"{srv.url}/dashboard/?run={run_id}")
    page.wait_for_function(DRAWN_WITH_DATA, arg=OVERVIEW, polling="raf", timeout=60_000)
    took = time.perf_counter() - t0
    fetched = page.evaluate(FETCHED)
    page.wait_for_timeout(300)  # a long task is reported once it has ended
    worst = max(page.evaluate("() => window.__longTasks"), default=0.0)
    context.close()
    return took, worst, fetched / 1e6


def side_by_side(browser, tmp: Path, ref: str, launches: int, opens: int) -> None:
    """Issue 28's figures of the first second, on ``ref`` and on this tree, alternately."""
    print(f"training a finished 2,000-step, {len(LAYERS)}-layer run ...", flush=True)
    run = finished_run(2000, len(LAYERS))
    load_before = os.getloadavg()
    with checkout(ref, tmp / "tree") as old:
        trees = {f"baseline {ref}": old, "current": ROOT}
        servers = {}
        try:
            for name, tree in trees.items():
                data = tmp / f"data-{name.split()[0]}"
                data.mkdir()
                # PYTHONSAFEPATH: `python -m` would put the working directory (this tree)
                # ahead of PYTHONPATH, and the baseline's server would run this code
                env = {"PYTHONPATH": str(tree), "PYTHONSAFEPATH": "1"}
                servers[name] = ServerProcess(data, "--max-runs", "1", env=env).start()
            runs = {n: replay(srv, run, "2,000 steps") for n, srv in servers.items()}
            for srv in servers.values():  # a launch first: caches (data, kernels) filled
                launch_to_first_point(browser, srv)
            launched: dict[str, list[tuple[float, ...]]] = {n: [] for n in servers}
            opened: dict[str, list[tuple[float, ...]]] = {n: [] for n in servers}
            order = list(servers)
            for i in range(max(launches, opens)):
                for name in order if i % 2 == 0 else order[::-1]:
                    if i < launches:
                        launched[name].append(launch_to_first_point(browser, servers[name]))
                    if i < opens:
                        opened[name].append(first_screen(browser, servers[name], runs[name]))
        finally:
            for srv in servers.values():
                srv.stop()
    load_after = os.getloadavg()

    def med(xs: list[tuple[float, ...]], k: int) -> float:
        return float(np.median([x[k] for x in xs]))

    base, cur = order
    rows = [
        (f"launch -> first point drawn (median of {launches})", launched, 0, "s", 2.0),
        ("  of which launch -> worker running, network built", launched, 1, "s", None),
        (f"first screen: 2,000-step run's Overview drawn (median of {opens})", opened, 0, "s", 1.0),
        ("longest main-thread task during it (median)", opened, 1, "ms", None),
        ("bytes fetched by then (compressed where sent so)", opened, 2, "MB", None),
    ]
    print(f"\nside by side on {os.cpu_count()} cores (load average before "
          f"{load_before[0]:.2f}, after {load_after[0]:.2f}):")  # fmt: skip
    print(f"{'':62} {base:>18} {cur:>10} {'ratio':>7}  goal")
    for label, got, k, unit, goal in rows:
        b, c = med(got[base], k), med(got[cur], k)
        verdict = ""
        if goal is not None:
            verdict = f"< {goal:g} s: {'met' if c < goal else 'MISSED'} (baseline: "
            verdict += f"{'met' if b < goal else 'missed'})"
        print(f"{label:62} {b:>16.2f} {unit:2} {c:>7.2f} {unit:2} {c / b:>6.2f}x  {verdict}")
    worst = {n: max(x[1] for x in opened[n]) for n in order}
    print(f"{'  worst of the longest tasks':62} {worst[base]:>16.0f} ms {worst[cur]:>7.0f} ms")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--steps", type=int, default=100_000)
    ap.add_argument("--live-seconds", type=float, default=20)
    ap.add_argument("--opens", type=int, default=5)
    ap.add_argument("--baseline", default=BASELINE, help="git ref to compare with (4-6)")
    ap.add_argument("--launches", type=int, default=5)
    ap.add_argument("--first-opens", type=int, default=5)
    ap.add_argument("--side-by-side-only", action="store_true", help="only 4-6")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp, sync_playwright() as pw:
        browser = launch_browser(pw)
        try:
            side_by_side(browser, Path(tmp), args.baseline, args.launches, args.first_opens)
        finally:
            browser.close()
    if args.side_by_side_only:
        return 0
    with tempfile.TemporaryDirectory() as tmp, sync_playwright() as pw:
        srv = ServerProcess(Path(tmp), "--max-runs", "1").start()
        browser = launch_browser(pw)
        try:
            run_id = big_run(srv, args.steps)
            cold = []
            for _ in range(args.opens):
                page = browser.new_page(viewport={"width": 1500, "height": 1000})
                t0 = time.perf_counter()
                page.goto(f"{srv.url}/dashboard/?run={run_id}")
                page.wait_for_function(DRAWN, timeout=60_000)
                cold.append(time.perf_counter() - t0)
                page.close()
            other = big_run(srv, 1000)  # a second run to switch away to
            page = browser.new_page(viewport={"width": 1500, "height": 1000})
            page.goto(f"{srv.url}/dashboard/")
            page.wait_for_selector("#runs-table .dash-spreadsheet input[type=checkbox]")
            warm = []
            for i in range(2 * args.opens):
                target = run_id if i % 2 else other
                page.click("#tabs >> text=Runs")
                page.locator("#runs-table tr", has_text=target).locator("input").check()
                page.click("#open-run")
                t0 = time.perf_counter()
                page.wait_for_function(
                    "() => (document.getElementById('run-banner') || {}).innerText"
                    f"?.includes('{target}')",
                    timeout=60_000,
                )
                page.wait_for_function(DRAWN, timeout=60_000)
                if target == run_id:
                    warm.append(time.perf_counter() - t0)
                page.click("#tabs >> text=Runs")
                page.locator("#runs-table tr", has_text=target).locator("input").uncheck()
            page.close()
            print(
                f"open a finished {args.steps:,}-step, {len(LAYERS)}-layer run from the "
                f"dashboard: median {np.median(warm):.2f} s, worst {max(warm):.2f} s "
                f"(target <= 2 s: {'met' if max(warm) <= 2 else 'MISSED'}); cold page load "
                f"with a link to it: median {np.median(cold):.2f} s"
            )

            stress = live(browser, srv, 1, args.live_seconds)
            report(stress, 1, judged=False)
            interval = max(1, round(stress["steps_per_s"] / 10))
            report(live(browser, srv, interval, args.live_seconds), interval, judged=True)
        finally:
            browser.close()
            srv.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
