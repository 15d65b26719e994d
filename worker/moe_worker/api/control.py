"""The control app: probes, metrics and the plan endpoint, on every rank's control port.

The operator is its client (`moe_operator.handoff`, `moe_operator.loads`); docs/worker.md is the
contract. Errors are `{"error": message, "field": name-or-null}`.

GET  /healthz     200 {"status": "ok", "rank", "pid"} while `backend.is_live()`; 503 (status
                  "stalled") once the serving loop stopped making progress
GET  /readyz      200 / 503 {"ready", "rank", "planVersion", "draining", "inFlight",
                  "drainTimeoutSeconds"}: 503 while draining
POST /v1/drain    `Authorization: Bearer <control token>`: start draining (idempotent): 202
                  {"draining": true, "inFlight", "drainTimeoutSeconds"}; the rank is not ready,
                  the OpenAI app refuses new requests 503, running sequences finish, and the rank
                  serves on until it is stopped (SIGTERM drains as well, then stops); 401 token
GET  /metrics     Prometheus text (`backend.metrics_text()`)
GET  /v1/plan     `Authorization: Bearer <control token>`: 200 the plan document and its
                  "digest"; 401 token; 503 before the first plan
POST /v1/plan     leader only, `Authorization: Bearer <control token>`:
                  200 {"applied": true, "version", "digest", "pauseSeconds"} once every rank
                      switched; 400 not a plan document; 422 does not fit the group; 409
                      {"applied": false, "reason": "stale", "version": current} when version <=
                      current; 401 token; 413 body too large; 421 not the leader; 503 not
                      ready, or {"applied": false, "reason": "transfer failed", "error"}
                      (the old plan serves); 504 {"applied": false, "reason": "timeout"}
GET  /v1/group    200 the membership this rank serves in (`moe_contract.group.GroupStatus`);
                  404 when the group has none of its own
POST /v1/group/lost
                  leader only, the control token: {"ranks": [...], "reason"}: 202 the leader
                  drops them at once (the operator saw their pods go); 400 not such a body; 409
                  the group has no membership of its own
"""

from __future__ import annotations

import asyncio
import json
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
        body.update(backend.drain_state().to_document())
        return JSONResponse(body, status_code=200 if ready else 503)

    @app.post("/v1/drain")
    def drain(request: Request) -> Response:
        # Changes what the rank serves: the operator's (it has the token), never a probe's.
        auth.require(request, token_path, what="control token", optional=False)
        return JSONResponse(backend.drain().to_document(), status_code=202)

    @app.get("/metrics")
    def metrics() -> Response:
        return Response(backend.metrics_text(), media_type=PROMETHEUS_TEXT)

    @app.get("/v1/plan")
    def get_plan(request: Request) -> Response:
        # The plan says where every expert lives and the gate bias: the operator's business
        # (it has the token), not every client's on the pod network.
        auth.require(request, token_path, what="control token", optional=False)
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

    @app.get("/v1/group")
    def get_group() -> Response:
        status = backend.group_status()
        if status is None:
            raise ApiError(404, "this group has no membership of its own")
        return JSONResponse(status.to_document())

    @app.post("/v1/group/lost")
    async def post_lost(request: Request) -> Response:
        _leader_authorized_ready(backend, request, token_path)
        ranks, reason = _lost(await request.body())
        if not backend.report_lost(ranks, reason):
            raise ApiError(409, "this group has no membership of its own")
        return JSONResponse({"accepted": True}, status_code=202)

    return app


def _lost(body: bytes) -> tuple[list[int], str]:
    try:
        raw = json.loads(body)
        ranks = raw["ranks"]
        reason = str(raw.get("reason") or "reported lost")
    except (ValueError, KeyError, TypeError):
        raise ApiError(400, 'expected {"ranks": [...], "reason": "..."}', param="ranks") from None
    if not isinstance(ranks, list) or not all(
        isinstance(r, int) and not isinstance(r, bool) and r > 0 for r in ranks
    ):
        raise ApiError(400, "ranks: a list of ranks other than the leader's (0)", param="ranks")
    return ranks, reason


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
