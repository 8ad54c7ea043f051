"""Every experiment at its quick size through a real ``bnscope serve``: how long each takes on
this machine (the target: minutes on a 2-core CPU), the numbers its result view shows, and
whether the measurement agrees with the paper (its verdict).

    python benchmarks/experiments.py                 # all of them
    python benchmarks/experiments.py noisy-bn landscape
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

from bncore.science.experiments import EXPERIMENTS
from bncore.status import FINISHED
from bnscope.process import ServerProcess, wait_for

FINAL = set(FINISHED)


def _short(values: list) -> str:
    return "[" + ", ".join("-" if v is None else f"{v:.3g}" for v in values) + "]"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("keys", nargs="*", default=list(EXPERIMENTS))
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        srv = ServerProcess(Path(tmp)).start()
        try:
            with srv.client() as api:
                for key in args.keys:
                    t0 = time.perf_counter()
                    sweep = api.post(f"/api/experiments/{key}").json()
                    for run in sweep["runs"]:
                        wait_for(lambda r=run: api.get(f"/api/runs/{r['id']}").json()["status"]
                                 in FINAL, 1800)  # fmt: skip
                    seconds = time.perf_counter() - t0
                    res = api.get(f"/api/sweeps/{sweep['id']}/result").json()
                    print(f"\n{key}: {len(sweep['runs'])} runs in {seconds:.0f} s")
                    v = res["verdict"]
                    said = ("agrees" if v["agrees"] else "DISAGREES") if v else "not measured"
                    print(f"  verdict: {said}: {v['text'] if v else ''}")
                    for panel in res["panels"]:
                        print(f"  {panel['title']}")
                        for s in panel["series"]:
                            ys = s["y"]
                            shown = ys if panel["kind"] == "by_value" else ys[-1:]
                            what = "" if panel["kind"] == "by_value" else " (last)"
                            print(f"    {s['name']}{what}: {_short(shown)}")
        finally:
            srv.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
