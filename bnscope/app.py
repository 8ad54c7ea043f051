"""The composition root: BN Scope as one process. It builds the service from the settings,
puts the HTTP API (server.app) on it, mounts the dashboard (dashboard.app) beside it, and serves
both with uvicorn on one port. Nothing below this module knows what it is assembled into."""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import socket
import threading
import time

import uvicorn
from fastapi import FastAPI

from server.app import create_api
from server.service import build
from server.settings import Settings


def create_app(settings: Settings) -> FastAPI:
    """The API with the dashboard mounted at /dashboard (when the dashboard's dependencies are
    installed)."""
    svc = build(settings)
    app = create_api(svc, settings.public_url or f"http://127.0.0.1:{settings.port}")
    try:
        from dashboard.app import mount
    except ImportError:
        return app
    mount(app, svc)
    app.state.dashboard = True
    return app


def few_malloc_arenas(arenas: int = 2) -> None:
    """Cap glibc's malloc arenas: each of the server's threads (the thread pool, SQLite) would
    otherwise get its own, and the memory freed in them is rarely given back: under load the
    server grew by 180 MB more without this (benchmarks/load.py). MALLOC_ARENA_MAX, if set,
    wins; elsewhere than glibc, nothing happens."""
    if os.environ.get("MALLOC_ARENA_MAX"):
        return
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").mallopt(M_ARENA_MAX, arenas)


M_ARENA_MAX = -8  # glibc's malloc.h


def stop_with(parent_pid: int, every: float = 0.5, grace: float = 30.0) -> None:
    """Shut this process down (SIGTERM: uvicorn's graceful shutdown, the runs it trains
    ``interrupted``) once process ``parent_pid`` has ended, checked every ``every`` seconds on a
    thread of its own; exit regardless ``grace`` seconds later. POSIX only (elsewhere, nothing
    is watched). Where ``parent_pid`` is this process's parent, its end is seen as this process
    being handed to another parent, which no reuse of its pid can hide.

    ``bnscope serve --parent-pid``: the local server a script's ``Client()`` starts
    (bnscope.local) ends with the script, even when the script is killed (kill -9, a Jupyter
    kernel restarted or killed) and its own exit handlers never run."""
    if os.name != "posix":
        return
    direct = os.getppid() == parent_pid

    def ended() -> bool:
        if direct:
            return os.getppid() != parent_pid
        try:
            os.kill(parent_pid, 0)
        except ProcessLookupError:
            return True
        except PermissionError:  # there, someone else's
            pass
        return False

    def watch() -> None:
        while not ended():
            time.sleep(every)
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(grace)
        os._exit(1)

    threading.Thread(target=watch, daemon=True, name="bnscope-parent").start()


def serve(settings: Settings, log_level: str = "info", parent_pid: int | None = None) -> None:
    """Run the server until interrupted (or until process ``parent_pid`` ends: :func:`stop_with`);
    port 0 picks a free one (printed)."""
    if parent_pid is not None:
        stop_with(parent_pid)
    few_malloc_arenas()
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    sock = socket.socket(socket.AF_INET6 if ":" in settings.host else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((settings.host, settings.port))
    port = sock.getsockname()[1]
    settings = settings.model_copy(update={"port": port})
    app = create_app(settings)
    print(
        f"BN Scope on http://{settings.host}:{port}/ (API docs: /docs, data: "
        f"{settings.data_dir.resolve()})",
        flush=True,
    )
    config = uvicorn.Config(app, log_level=log_level, timeout_graceful_shutdown=5)
    uvicorn.Server(config).run(sockets=[sock])
