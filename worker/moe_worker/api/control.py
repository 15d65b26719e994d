"""The control app: probes, metrics and the plan endpoint, on every rank's control port.

The operator is its client (`moe_operator.handoff`, `moe_operator.loads`); docs/worker.md is the
contract. Errors are `{"error": message, "field": name-or-null}`.

GET  /healthz     200 {"status": "ok", "rank", "pid"} while `backend.is_live()`; 503 (status
                  "stalled") once the serving loop stopped making progress
GET  /readyz      200 / 503 {"ready", "rank", "planVersion"}
GET  /metrics     Prometheus text (`backend.metrics_text()`)
GET  /v1/plan     200 the plan document and its "digest"; 503 before the first plan
POST /v1/plan     leader only, `Authorization: Bearer <control token>`:
                  200 {"applied": true, "version", "digest", "pauseSeconds"} once every rank
                      switched; 400 not a plan document; 422 does not fit the group; 409
                      {"applied": false, "reason": "stale", "version": current} when version <=
                      current; 401 token; 413 body too large; 421 not the leader; 503 not
                      ready, or {"applied": false, "reason": "transfer failed", "error"}
                      (the old plan serves); 504 {"applied": false, "reason": "timeout"}
"""

from __future__ import annotations

import asyncio
import os

from fastapi import FastAPI
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from moe_contract.plan import Plan, PlanError, parse_plan
from moe_contract.switch import STALE, SwitchAnswer
from moe_worker.api import auth
from moe_worker.api.body import BODY_DEADLINE, BODY_TIMEOUT, BodyLimit
from moe_worker.api.errors import ApiError, control_body, install
from moe_worker.serving.generation import Backend

PROMETHEUS_TEXT = "text/plain; version=0.0.4; charset=utf-8"


def create_control_app(
    backend: Backend,
    *,
    token_path: str | None,
    switch_timeout: float = 60.0,
    max_body: int = 64 * 1024 * 1024,
    body_timeout: float = BODY_TIMEOUT,
    body_deadline: float = BODY_DEADLINE,
) -> FastAPI:
    """The control app of one rank. `token_path`: the control token file (None or an empty file
    refuses every POST)."""
    app = FastAPI(title="moe-worker control", docs_url=None, redoc_url=None, openapi_url=None)
    install(app, control_body)
    app.add_middleware(BodyLimit, max_body=max_body, timeout=body_timeout, deadline=body_deadline)

    @app.get("/healthz")
    def healthz() -> Response:
        live = backend.is_live()
        body = {"status": "ok" if live else "stalled", "rank": backend.rank, "pid": os.getpid()}
        return JSONResponse(body, status_code=200 if live else 503)

    @app.get("/readyz")
    def readyz() -> Response:
        ready = backend.is_ready()
        plan = backend.current_plan()
        body = {"ready": ready, "rank": backend.rank, "planVersion": plan and plan.version}
        return JSONResponse(body, status_code=200 if ready else 503)

    @app.get("/metrics")
    def metrics() -> Response:
        return Response(backend.metrics_text(), media_type=PROMETHEUS_TEXT)

    @app.get("/v1/plan")
    def get_plan() -> Response:
        plan = backend.current_plan()
        if plan is None:
            raise ApiError(503, "no plan loaded yet")
        return JSONResponse({**plan.to_document(), "digest": plan.digest()})

    @app.post("/v1/plan")
    async def post_plan(request: Request) -> Response:
        _leader_authorized_ready(backend, request, token_path)
        plan = _parse(await request.body())
        try:
            backend.validate_plan(plan)
        except PlanError as error:
            raise _plan_error(422, error) from None
        current = backend.current_plan()
        if current is not None and plan.version <= current.version:
            answer = SwitchAnswer.refused(STALE, version=current.version)
        else:  # blocking until every rank switched: off the event loop, so probes keep answering
            answer = await asyncio.to_thread(backend.switch_plan, plan, switch_timeout)
        return JSONResponse(answer.to_document(), status_code=answer.http_status)

    return app


def _leader_authorized_ready(backend: Backend, request: Request, token_path: str | None) -> None:
    """The checks every control POST passes, in the documented order (before the body is read)."""
    if not backend.is_leader:
        raise ApiError(
            421, "only rank 0 accepts this; send it to the leader", extra={"leaderRank": 0}
        )
    auth.require(request, token_path, what="control token", optional=False)
    if not backend.is_ready():
        raise ApiError(503, "worker group not ready")


def _parse(body: bytes) -> Plan:
    try:
        return parse_plan(body)
    except PlanError as error:
        raise _plan_error(400, error) from None


def _plan_error(status: int, error: PlanError) -> ApiError:
    """Plan messages start with the field at fault (`slots[0][3]: ...`)."""
    message = str(error)
    return ApiError(status, message, param=message.split(":", 1)[0] if ":" in message else None)
