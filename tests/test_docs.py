"""The documentation holds: README is a front door whose links lead somewhere, the site under
docs/ builds with no warning (a broken link, anchor or API reference, or a page left out of the
nav, fails here), and the Layout page names every module there is."""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
#: A Markdown link or image target: [text](target) or ![alt](target "title").
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")


def test_readme_is_a_front_door():
    lines = README.read_text().splitlines()
    assert len(lines) <= 150, f"README.md has {len(lines)} lines: move the detail into docs/"


def test_readme_links_lead_to_files_of_the_repository():
    targets = LINK.findall(README.read_text())
    assert targets, "no links found: has the pattern stopped matching?"
    missing = [
        t
        for t in targets
        if not re.match(r"[a-z]+:", t)  # http:, https:, mailto:
        and not t.startswith("#")
        and not (ROOT / t.split("#")[0]).exists()
    ]
    assert not missing, f"README.md links to files that do not exist: {missing}"


def test_layout_names_every_module():
    layout = (ROOT / "docs" / "layout.md").read_text()
    modules = sorted(
        str(p.relative_to(ROOT))
        for package in ("bncore", "server", "dashboard", "bnscope")
        for p in (ROOT / package).rglob("*.py")
    )
    unnamed = [m for m in modules if f"`{m}`" not in layout]
    assert not unnamed, f"docs/layout.md does not name {unnamed}: add a row for each"


@pytest.mark.timeout(180)
def test_docs_site_builds_strict(tmp_path):
    needed = {"mkdocs": "mkdocs", "material": "mkdocs-material",
              "mkdocstrings_handlers.python": "mkdocstrings-python"}  # fmt: skip
    absent = [package for module, package in needed.items() if not _installed(module)]
    if absent:
        pytest.skip(f"{', '.join(absent)} not installed (the test extra has them)")
    build = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path)],
        cwd=ROOT,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},  # Material's notice about MkDocs 2
        capture_output=True,
        text=True,
        timeout=150,
    )
    assert build.returncode == 0, build.stderr[-4000:]
    assert (tmp_path / "index.html").exists() and (tmp_path / "reference" / "client").is_dir()


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:  # a parent package is missing
        return False
