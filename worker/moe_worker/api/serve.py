"""Run an app under uvicorn in a background thread, beside the serving loop.

The main thread of a worker runs torch collectives, so uvicorn gets its own thread and event loop
and installs no signal handlers (uvicorn installs them only on the main thread); the process's
own handlers stay in charge. The socket is bound here, before the thread starts, so a port in use
fails the caller at once and port 0 gives a free port that `ServerHandle.port` reports.

Every server runs `moe_worker.api.connections`' protocol: a deadline on each request's head and a
cap on open connections (uvicorn has neither); the apps bound and time their bodies themselves.
"""

from __future__ import annotations

import logging
import os
import resource
import socket
import threading
import time
from dataclasses import dataclass

import uvicorn
from starlette.types import ASGIApp

from moe_worker.api.connections import HEADER_TIMEOUT, guarded_protocol

log = logging.getLogger("moe_worker.api")

MAX_CONNECTIONS = 1024
"""Open connections per server, at most (fewer when the process may open few files)."""


def default_max_connections() -> int:
    """MAX_CONNECTIONS, or a quarter of the process's file limit if that is less: a process
    serves two apps and talks to its peers, and refusing beats failing to accept."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return MAX_CONNECTIONS
    return max(16, min(MAX_CONNECTIONS, soft // 4))


@dataclass
class ServerHandle:
    """A running server; `stop()` ends it (idempotent)."""

    host: str
    port: int
    server: uvicorn.Server
    thread: threading.Thread

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def stop(self, timeout: float = 10.0) -> None:
        self.server.should_exit = True
        self.thread.join(timeout)
        if self.thread.is_alive():
            log.warning("HTTP server on port %d still stopping after %g s", self.port, timeout)


def start(
    app: ASGIApp,
    host: str,
    port: int,
    *,
    name: str = "http",
    graceful_seconds: int = 5,
    startup_timeout: float = 30.0,
    header_timeout: float = HEADER_TIMEOUT,
    max_connections: int | None = None,
) -> ServerHandle:
    """Serve `app` on host:port (0: any free port) from a daemon thread; returns once listening.

    `graceful_seconds`: how long `stop()` lets open requests (streams) finish before closing them.
    `header_timeout`: seconds a request's head may take; `max_connections`: open connections
    at most (None: `default_max_connections()`).
    """
    cap = default_max_connections() if max_connections is None else max_connections
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        sock = socket.create_server((host, port), family=family, backlog=2048)
    except OSError as error:  # one line that names the server and the port, for the operator
        why = os.strerror(error.errno) if error.errno else str(error)
        message = f"the {name} server cannot listen on {host}:{port}: {why}"
        raise OSError(error.errno, message) from None
    bound = sock.getsockname()[1]
    config = uvicorn.Config(
        app,
        # h11, one parser, the one the hostile-input tests were run against, with deadlines
        http=guarded_protocol(header_timeout, cap),
        loop="asyncio",
        lifespan="off",
        log_config=None,  # the process configures logging; uvicorn must not reconfigure it
        access_log=False,
        proxy_headers=False,
        server_header=False,
        timeout_keep_alive=5,
        timeout_graceful_shutdown=graceful_seconds,
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(
        target=server.run, kwargs={"sockets": [sock]}, name=f"moe-{name}", daemon=True
    )
    thread.start()
    deadline = time.monotonic() + startup_timeout
    while not server.started:  # uvicorn offers no event to wait on; it starts in milliseconds
        if not thread.is_alive() or time.monotonic() > deadline:
            server.should_exit = True
            sock.close()
            raise RuntimeError(f"{name} server on {host}:{bound} did not start")
        time.sleep(0.01)
    log.info("%s server listening on %s:%d", name, host, bound)
    return ServerHandle(host, bound, server, thread)
