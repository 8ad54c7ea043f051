"""The ``bnscope`` command line."""

from __future__ import annotations

import argparse
import platform
import sys
from collections.abc import Sequence

import torch

import bncore
from bncore import kernels
from bncore.kernels import cpu


def _info(_: argparse.Namespace) -> int:
    """Versions, devices, and which batch-norm kernel runs here (building it if needed)."""
    print(
        f"bnscope {bncore.__version__}  python {platform.python_version()}  "
        f"torch {torch.__version__}"
    )
    cuda = torch.cuda.get_device_name() if torch.cuda.is_available() else "none"
    print(f"devices: cpu ({torch.get_num_threads()} threads), cuda: {cuda}")
    fused = "available" if cpu.available() else f"unavailable ({cpu.unavailable_reason()})"
    print(f"fused CPU kernel: {fused}")
    chosen = kernels.select(torch.zeros(2, 2), None, None).NAME
    print(
        f"kernel used for float32 CPU input: {chosen}"
        f"{' (forced by BNCORE_KERNEL)' if kernels.forced() else ''}"
    )
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="bnscope",
        description="BN Scope: see what batch normalization does inside a network while it trains.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    info = sub.add_parser("info", help=_info.__doc__, description=_info.__doc__)
    info.set_defaults(func=_info)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
