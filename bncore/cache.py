"""Where bncore keeps what it builds or makes once (kernels, generated datasets)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def cache_dirs() -> list[Path]:
    """Candidate cache folders, in order of preference: $BNCORE_CACHE_DIR alone if set, else
    ~/.cache/bncore (or $XDG_CACHE_HOME/bncore) and then the system's temporary folder."""
    env = os.environ.get("BNCORE_CACHE_DIR")
    home = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "bncore"
    return [Path(env)] if env else [home, Path(tempfile.gettempdir()) / "bncore"]
