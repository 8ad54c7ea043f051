"""The server a script or notebook talks to when it names none: ``Client()`` with no URL.

Where ``Client()`` is given no URL, it uses, in this order:

1. this process's own local server, once one was started (every later ``Client()`` shares it);
2. a BN Scope server answering at :data:`DEFAULT_URL` (``bnscope serve``'s address,
   http://127.0.0.1:8000): the one you run yourself, whose dashboard you already have open;
3. a new local server: ``bnscope serve`` as a child process, on a free port of 127.0.0.1, its
   runs kept in ``./bnscope-data`` (the directory this process runs in, as ``bnscope serve``
   keeps them), without a token, configured by nothing of this process's ``BNSCOPE_*``
   environment (those are a server's settings, maybe another's). A line on stderr says where
   it listens. It stops when this process ends: at exit, and, when the process is killed (kill
   -9, a Jupyter kernel restarted or killed) and no exit handler runs, by itself within a second
   (``bnscope serve --parent-pid``). It runs in a session of its own, so Ctrl-C in a terminal
   or Jupyter's "interrupt kernel" stops the training, not the server.

A URL given explicitly is used as it is, and nothing is started: give
``Client("http://127.0.0.1:8000")`` to insist on the server you run, even when it is down.

Runs the local server saw are kept in ``./bnscope-data``: a ``bnscope serve`` started later in
that directory shows them.
"""

from __future__ import annotations

import atexit
import os
import sys
import threading
from pathlib import Path

import httpx

from bnscope.process import ServerProcess

__all__ = ["DATA_DIR", "DEFAULT_URL", "is_bnscope", "local_server", "server_url"]

#: Where ``bnscope serve`` listens unless told otherwise (server.settings: host and port).
DEFAULT_URL = "http://127.0.0.1:8000"
#: Where the local server keeps its runs, relative to the directory the process runs in.
DATA_DIR = "bnscope-data"
#: Seconds the local server has to answer its health check once started.
START_TIMEOUT = 60.0

_lock = threading.Lock()
_server: ServerProcess | None = None


def is_bnscope(url: str, timeout: float = 1.0) -> bool:
    """Whether a BN Scope server answers at ``url`` (its ``/healthz``, which needs no token;
    anything else listening there, or nothing, is no)."""
    try:
        with httpx.Client(timeout=timeout, trust_env=False) as http:  # loopback: no proxy
            r = http.get(f"{url.rstrip('/')}/healthz")
        body = r.json()
    except (httpx.HTTPError, ValueError):
        return False
    return (
        r.status_code == 200
        and isinstance(body, dict)
        and body.get("status") == "ok"
        and {"version", "running", "queued"} <= body.keys()
    )


def local_server() -> ServerProcess | None:
    """This process's local server, while it runs (None before it is started)."""
    return _server if _server is not None and _server.alive else None


def server_url() -> str:
    """The URL of the server ``Client()`` with no URL talks to (the module docstring's order),
    starting the local one if need be: RuntimeError (bnscope.process.ServerStartError) with the
    end of its output if it does not come up in :data:`START_TIMEOUT` seconds."""
    global _server
    with _lock:  # two threads asking at once get one server
        own = local_server()
        if own is not None:
            return own.url
        if is_bnscope(DEFAULT_URL):
            return DEFAULT_URL
        if _server is not None:  # it was started, and ended (killed, crashed)
            print(
                f"BN Scope: the local server at {_server.url} has ended; starting another",
                file=sys.stderr,
            )
        data = Path(DATA_DIR).resolve()
        print(
            f"BN Scope: no server at {DEFAULT_URL}; starting one here (runs kept in {data})",
            file=sys.stderr,
            flush=True,
        )
        srv = ServerProcess(
            data,
            "--parent-pid",
            str(os.getpid()),
            # a script's server: its runs are the script's own; a run launched from its
            # dashboard starts a fresh worker, instead of a process importing torch beside the
            # script from the start, kept for the server's life (server.executors)
            "--worker-start",
            "spawn",
            inherit_settings=False,
            own_session=True,
        ).start(START_TIMEOUT)
        atexit.register(srv.stop, 10.0)
        _server = srv
        print(
            f"BN Scope: dashboard on {srv.url}/dashboard/, until this process ends",
            file=sys.stderr,
            flush=True,
        )
        return srv.url
