"""A real headless Chromium (Debian's, at /usr/bin/chromium) for the dashboard's tests and
benchmarks, driven by Playwright. Playwright's own browser download is never used."""

from __future__ import annotations

import os
import shutil

CHROMIUM = os.environ.get("BNSCOPE_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]

# Long main-thread tasks, as the page sees them (PerformanceObserver 'longtask').
WATCH_LONG_TASKS = """
window.__longTasks = [];
new PerformanceObserver((list) => {
  for (const e of list.getEntries()) window.__longTasks.push(e.duration);
}).observe({entryTypes: ["longtask"]});
"""


def launch_browser(playwright):
    """The system Chromium, headless; raises FileNotFoundError if it is not installed."""
    if not os.path.exists(CHROMIUM):
        raise FileNotFoundError(f"no Chromium at {CHROMIUM} (apt-get install chromium)")
    return playwright.chromium.launch(executable_path=CHROMIUM, args=ARGS)
