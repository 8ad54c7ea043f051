"""A real ``bnscope serve`` in a child process on 127.0.0.1: for tests, benchmarks and tools that
need a server they can also kill, and for the client's own local server (bnscope.local).

It lives in bnscope, not in server: it starts the ``bnscope`` command, and the client may use it
without importing the server (it imports neither server nor dashboard)."""

from __future__ import annotations

import collections
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx

STARTUP_TIMEOUT = 60.0


class ServerProcess:
    def __init__(self, data_dir: Path, *args: str, env: dict[str, str] | None = None) -> None:
        self.data_dir, self.args, self.env = data_dir, args, env or {}
        self.proc: subprocess.Popen[str] | None = None
        self.url = ""
        self.lines: collections.deque[str] = collections.deque(maxlen=2000)  # its last output

    def start(self) -> ServerProcess:
        cmd = [
            sys.executable,
            "-m",
            "bnscope.cli",
            "serve",
            "--port",
            "0",
            "--data-dir",
            str(self.data_dir),
            "--log-level",
            "warning",
            *self.args,
        ]
        self.proc = subprocess.Popen(
            cmd,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env={**os.environ, **self.env},
        )
        deadline = time.monotonic() + STARTUP_TIMEOUT
        assert self.proc.stdout is not None
        while time.monotonic() < deadline:
            line = self.proc.stdout.readline()
            m = re.search(r"http://[\d.]+:(\d+)/", line)
            if m:
                self.url = f"http://127.0.0.1:{m.group(1)}"
                break
            if not line and self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}")
        else:
            raise RuntimeError("server did not start in time")
        # read what it prints from now on: a full pipe would block the server's next write
        threading.Thread(target=self._drain, daemon=True).start()
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{self.url}/healthz", timeout=2).status_code == 200:
                    return self
            except httpx.TransportError:
                time.sleep(0.1)
        raise RuntimeError("server not healthy in time")

    def _drain(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line)

    def output(self) -> str:
        """What the server printed lately (its log)."""
        return "".join(self.lines)

    def client(self, **kw: Any) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=30.0, **kw)

    def kill(self) -> None:
        """kill -9: no shutdown, no cleanup."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.kill()


def wait_for(predicate, timeout: float = 60.0, every: float = 0.1):
    """Poll until predicate() is truthy; its value, or AssertionError on timeout."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout}s waiting for {predicate}")
