"""What ``import bnscope.client`` costs a training script beyond ``import torch``.

Each sample is a fresh interpreter timing its own import (``time.perf_counter`` around it, so
the interpreter's start is not counted); torch alone and torch then bnscope.client alternate,
so both see the same machine moments. The figure is the difference of the medians. Target
(issue 25): at most 0.5 s.

    python benchmarks/client_import.py
    python benchmarks/client_import.py --repeats 9 --check   # exit 1 if the target is missed
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys

TARGET_S = 0.5
TIMED = (
    "import time; t = time.perf_counter(); import torch; a = time.perf_counter(); {extra}; "
    "print(a - t, time.perf_counter() - a)"
)


def sample(extra: str) -> tuple[float, float]:
    """(seconds importing torch, seconds importing what follows it) in a fresh interpreter."""
    out = subprocess.run(
        [sys.executable, "-c", TIMED.format(extra=extra or "pass")],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.split()
    return float(out[0]), float(out[1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--check", action="store_true", help="exit 1 if the target is missed")
    args = parser.parse_args()
    sample("import bnscope.client")  # warm the file cache: the first import reads from disk
    torch_alone, client = [], []
    for _ in range(args.repeats):
        torch_alone.append(sum(sample("")))
        t, c = sample("import bnscope.client")
        client.append(t + c)
    base, with_client = statistics.median(torch_alone), statistics.median(client)
    extra = with_client - base
    met = extra <= TARGET_S
    print(f"import torch:                     {base:.2f} s (median of {args.repeats})")
    print(f"import torch, then bnscope.client: {with_client:.2f} s")
    print(f"bnscope.client costs {extra:+.2f} s more than torch: target <= {TARGET_S} s: "
          f"{'met' if met else 'MISSED'}")  # fmt: skip
    return 0 if met or not args.check else 1


if __name__ == "__main__":
    sys.exit(main())
