"""One rank process: the HTTP server and the serving loop wired together, with signal handling.

The runtime (`Worker`, the serving loop) and the HTTP server (`server`, which depends only on the
small `ServedWorker` interface) know nothing of each other; this module is where they meet.
"""

from __future__ import annotations

import logging
import signal

from moe_worker.runtime import Worker
from moe_worker.server import start_http_server
from moe_worker.settings import WorkerSettings

log = logging.getLogger("moe_worker")


def install_signal_handlers(worker: Worker) -> None:
    def stop(signum: int, _frame: object) -> None:
        log.info("rank %d got signal %d, stopping", worker.settings.rank, signum)
        worker.stopping.set()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)


def serve(settings: WorkerSettings) -> int:
    """Entry of `moe-worker serve`: HTTP first (liveness while the group forms), then the loop."""
    worker = Worker(settings)
    install_signal_handlers(worker)
    server = start_http_server(worker)
    try:
        worker.run()
    except Exception:
        if worker.stopping.is_set():  # peers stopping too: a broken collective is expected then
            log.info("rank %d stopped (group closed during shutdown)", settings.rank)
            return 0
        log.exception("rank %d serving loop failed", settings.rank)
        return 1
    finally:
        server.shutdown()
    return 0
