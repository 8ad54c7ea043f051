"""A real ``bnscope serve`` in a child process on 127.0.0.1: for tests, benchmarks and tools that
need a server they can also kill, and for the client's own local server (bnscope.local).

It lives in bnscope, not in server: it starts the ``bnscope`` command, and the client may use it
without importing the server (it imports neither server nor dashboard)."""

from __future__ import annotations

import collections
import contextlib
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

#: The server's settings in the environment (server.settings).
PREFIX = "BNSCOPE_"
STARTUP_TIMEOUT = 60.0


class ServerStartError(RuntimeError):
    """``bnscope serve`` did not come up: why, and the last lines it printed."""


class ServerProcess:
    """``bnscope serve --port 0 --data-dir DATA_DIR ARGS...`` as a child process.

    ``env``: variables set for it on top of this process's environment; with
    ``inherit_settings=False``, this process's ``BNSCOPE_*`` variables (the server's settings,
    server.settings) are not passed on, so that only ``args`` configure it. ``own_session``: the
    child leads a session (and process group) of its own, so that a signal to this process's
    group (a terminal's Ctrl-C, Jupyter's "interrupt kernel") does not stop it; :meth:`kill`
    then ends its group, the runs it trains too."""

    def __init__(
        self,
        data_dir: Path,
        *args: str,
        env: dict[str, str] | None = None,
        inherit_settings: bool = True,
        own_session: bool = False,
    ) -> None:
        self.data_dir, self.args, self.env = data_dir, args, env or {}
        self.inherit_settings, self.own_session = inherit_settings, own_session
        self.proc: subprocess.Popen[str] | None = None
        self.url = ""
        self.lines: collections.deque[str] = collections.deque(maxlen=2000)  # its last output
        self._listening = threading.Event()  # it said its address, or its output ended

    def start(self, timeout: float = STARTUP_TIMEOUT) -> ServerProcess:
        """Start it and wait, at most ``timeout`` seconds, until ``/healthz`` answers;
        ServerStartError (with the end of its output) if it does not, the child killed."""
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
        inherited = {
            k: v for k, v in os.environ.items() if self.inherit_settings or not k.startswith(PREFIX)
        }
        self.proc = subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env={**inherited, **self.env},
            start_new_session=self.own_session,
        )
        # read all it prints, from the start: a full pipe would block the server's next write
        threading.Thread(target=self._drain, daemon=True, name="bnscope-serve-output").start()
        deadline = time.monotonic() + timeout
        try:
            self._wait_healthy(deadline, timeout)
        except BaseException:
            self.kill()  # never a half-started server left behind
            raise
        return self

    def _wait_healthy(self, deadline: float, timeout: float) -> None:
        assert self.proc is not None
        while not self._listening.wait(0.1):
            if time.monotonic() > deadline:
                raise self._failed(f"did not say its address in {timeout:g} s")
        if not self.url:  # its output ended: it exited
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(max(1.0, deadline - time.monotonic()))
            raise self._failed(f"exited with status {self.proc.returncode}")
        with httpx.Client(timeout=2, trust_env=False) as http:  # loopback: never a proxy
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    raise self._failed(f"exited with status {self.proc.returncode}")
                try:
                    if http.get(f"{self.url}/healthz").status_code == 200:
                        return
                except httpx.TransportError:
                    pass
                time.sleep(0.1)
        raise self._failed(f"was not healthy at {self.url}/healthz in {timeout:g} s")

    def _failed(self, what: str, last: int = 20) -> ServerStartError:
        tail = "".join(list(self.lines)[-last:]).rstrip() or "(nothing)"
        return ServerStartError(
            f"bnscope serve (data in {self.data_dir}) {what}; the last it printed:\n{tail}"
        )

    def _drain(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line)
            m = None if self.url else re.search(r"http://[\d.]+:(\d+)/", line)
            if m is not None:
                self.url = f"http://127.0.0.1:{m.group(1)}"
                self._listening.set()
        self._listening.set()
        self.proc.stdout.close()

    def output(self) -> str:
        """What the server printed lately (its log)."""
        return "".join(self.lines)

    def client(self, **kw: Any) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=30.0, **kw)

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> None:
        """kill -9: no shutdown, no cleanup (with ``own_session``, of its whole group)."""
        if self.proc is None or self.proc.returncode is not None:  # reaped: its pid is not ours
            return
        if self.own_session:  # the runs it trains are in its group: they go with it
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.proc.pid, signal.SIGKILL)
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def stop(self, timeout: float = 15.0) -> None:
        """Ctrl-C: it shuts down (its runs ``interrupted``); killed after ``timeout`` s."""
        if self.alive:
            assert self.proc is not None
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout)
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
