"""The worker's control routes (stdlib ThreadingHTTPServer; imports no torch), over the Backend
port (`moe_worker.generation`). A stop-gap until `moe_worker.api` serves them.

GET  /healthz      200 {"status": "ok", "rank", "pid"} while the process lives
GET  /readyz       200 once the group formed and the plan is loaded, else 503
GET  /metrics      Prometheus text from this worker's own registry
GET  /v1/plan      200 the current plan document (it carries "version") and its "digest"
                   (`Plan.digest()`); 503 before the first plan
POST /v1/plan      leader only, `Authorization: Bearer <token file content>`:
                   200 {"applied": true, "version", "digest", "pauseSeconds"} once every rank
                       switched
                   400 body is not a plan document, 422 plan does not fit the model/world
                       (both {"error": message, "field": name})
                   409 {"applied": false, "reason": "stale", "version": current}: version <= current
                       (a resend of the current version is already applied: treat as success)
                   401 missing/wrong token, 421 not the leader, 503 not ready, 504 switch timed out
"""

from __future__ import annotations

import hmac
import json
import logging
import os
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from moe_worker.generation import Backend
from moe_worker.plan import PlanError, parse_plan
from moe_worker.settings import WorkerSettings

log = logging.getLogger("moe_worker.http")

MAX_BODY = 16 * 1024 * 1024
CONTENT_TYPE_METRICS = "text/plain; version=0.0.4; charset=utf-8"


def _error(message: str) -> dict[str, Any]:
    """A JSON error naming the offending field (plan messages start with `field: `)."""
    field = message.split(":", 1)[0] if ":" in message else None
    return {"error": message, "field": field}


class WorkerHandler(BaseHTTPRequestHandler):
    worker: Backend  # set on the subclass made by start_http_server
    settings: WorkerSettings

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("%s " + format, self.address_string(), *args)  # never headers: no token in logs

    # ------------------------------------------------------------ responses

    def _send(
        self, status: int, body: bytes, content_type: str, headers: dict[str, str] | None = None
    ) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(body)

    def _json(
        self, status: int, payload: dict[str, Any], headers: dict[str, str] | None = None
    ) -> None:
        self._send(status, json.dumps(payload).encode(), "application/json", headers)

    # ------------------------------------------------------------ routes

    def do_GET(self) -> None:
        w = self.worker
        if self.path == "/healthz":
            self._json(200, {"status": "ok", "rank": w.rank, "pid": os.getpid()})
        elif self.path == "/readyz":
            plan = w.current_plan()
            payload = {
                "ready": w.is_ready(),
                "rank": w.rank,
                "planVersion": plan and plan.version,
            }
            self._json(200 if w.is_ready() else 503, payload)
        elif self.path == "/metrics":
            self._send(200, w.metrics_text(), CONTENT_TYPE_METRICS)
        elif self.path == "/v1/plan":
            plan = w.current_plan()
            if plan is None:
                self._json(503, {"error": "no plan loaded yet"})
            else:
                self._json(200, {**plan.to_document(), "digest": plan.digest()})
        else:
            self._json(404, {"error": f"no route {self.path}"})

    def do_POST(self) -> None:
        if self.path != "/v1/plan":
            self._json(404, {"error": f"no route {self.path}"})
            return
        if not self.worker.is_leader:
            self._json(
                421, {"error": "only rank 0 accepts this; send it to the leader", "leaderRank": 0}
            )
            return
        if not self._authorized():
            self._json(
                401, {"error": "missing or wrong bearer token"}, {"WWW-Authenticate": "Bearer"}
            )
            return
        if not self.worker.is_ready():
            self._json(503, {"error": "worker group not ready"})
            return
        length = int(self.headers.get("Content-Length") or 0)
        if length > MAX_BODY:
            self._json(413, {"error": f"body over {MAX_BODY} bytes"})
            return
        self._post_plan(self.rfile.read(length))

    def _authorized(self) -> bool:
        path = self.settings.token_path
        try:
            expected = Path(path).read_bytes().strip() if path else b""
        except OSError:
            expected = b""
        if not expected:  # no token configured: refuse rather than run unauthenticated
            return False
        header = self.headers.get("Authorization", "")
        scheme, _, given = header.partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(), expected)

    def _post_plan(self, body: bytes) -> None:
        w = self.worker
        try:
            plan = parse_plan(body)
        except PlanError as error:
            self._json(400, _error(str(error)))
            return
        try:
            w.validate_plan(plan)
        except PlanError as error:
            self._json(422, _error(str(error)))
            return
        current = w.current_plan()
        if current is not None and plan.version <= current.version:
            self._json(409, {"applied": False, "reason": "stale", "version": current.version})
            return
        result = w.switch_plan(plan, self.settings.switch_timeout)
        if result is None:
            self._json(504, {"applied": False, "reason": "timeout"})
        else:
            self._json(200 if result["applied"] else 409, result)


def start_http_server(worker: Backend, settings: WorkerSettings) -> ThreadingHTTPServer:
    """Serve in a daemon thread; returns the server (call .shutdown() to stop)."""
    attrs = {"worker": worker, "settings": settings}
    handler = type("BoundWorkerHandler", (WorkerHandler,), attrs)
    server = ThreadingHTTPServer((settings.bind_address, settings.http_port), handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, name="moe-http", daemon=True)
    thread.start()
    log.info("rank %d HTTP on %s:%d", worker.rank, *server.server_address[:2])
    return server
