"""The one control port of a pod of several ranks: its launcher answers there for all of them.

Probes, Prometheus and the operator see a pod, not its ranks: each rank's control app listens on
an internal port (`env.internal_control_port`, on the pod's loopback) and this app, served by the
pod's launcher on the pod's port (`MOE_HTTP_PORT`), answers for the pod:

GET  /healthz    200 {"status": "ok", "ranks": [...]} when every rank's /healthz is 200 (or a
                 rank has not started listening yet: "starting", or has been silent for less
                 than the stall timeout); 503 {"status": "stalled"} naming the ranks whose
                 serving loop stopped (their own 503) or that answered once and have not for
                 longer than the stall timeout ("no answer": a stopped process):
                 the liveness probe then restarts the pod's container, and the operator the group
GET  /readyz     200 when every rank is ready (the pod is ready when all its ranks are); 503
GET  /metrics    every rank's series merged (each carries its `rank` label), and
                 moe_pod_rank_up{rank} 1 or 0 for each rank (0: it did not answer)
GET  /v1/plan, POST /v1/plan, POST /v1/drain, GET /v1/group, POST /v1/group/lost
                 passed to local rank 0 as they come (headers, body) and answered as it answers:
                 on pod 0 that is global rank 0, the leader; elsewhere a rank that is not
"""

from __future__ import annotations

import asyncio
import json
import os
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from fastapi import FastAPI
from prometheus_client import generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from moe_worker.api.body import BODY_DEADLINE, BODY_TIMEOUT, BodyLimit
from moe_worker.api.errors import ApiError, control_body, install

PROMETHEUS_TEXT = "text/plain; version=0.0.4; charset=utf-8"
_DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # never a proxy
_PASSED_HEADERS = ("authorization", "content-type")


@dataclass(frozen=True)
class LocalRank:
    """One rank of the pod and the base URL of its control app."""

    rank: int
    url: str


@dataclass(frozen=True)
class Answer:
    """What a rank answered (status 0: nothing, within the timeout)."""

    status: int
    body: bytes


def _get(url: str, timeout: float) -> Answer:
    try:
        with _DIRECT.open(url, timeout=timeout) as response:
            return Answer(response.status, response.read())
    except urllib.error.HTTPError as error:
        return Answer(error.code, error.read())
    except (OSError, ValueError):
        return Answer(0, b"")


def _json(answer: Answer) -> dict[str, object]:
    try:
        document = json.loads(answer.body)
    except ValueError:
        return {}
    return document if isinstance(document, dict) else {}


class _Merged(Collector):
    """Metric families of several ranks merged by name (a family appears once in the text)."""

    def __init__(self, texts: Sequence[str], up: dict[int, bool]) -> None:
        self.texts, self.up = texts, up

    def collect(self) -> Iterator[Metric]:
        families: dict[str, Metric] = {}
        for text in self.texts:
            for family in text_string_to_metric_families(text):
                merged = families.setdefault(
                    family.name,
                    Metric(family.name, family.documentation, family.type, family.unit),
                )
                merged.samples.extend(family.samples)
        yield from families.values()
        up = GaugeMetricFamily(
            "moe_pod_rank_up", "1 when the rank answered the pod's scrape.", labels=["rank"]
        )
        for rank, answered in sorted(self.up.items()):
            up.add_metric([str(rank)], 1.0 if answered else 0.0)
        yield up


def create_pod_app(
    ranks: Sequence[LocalRank],
    *,
    probe_timeout: float = 2.0,
    silence_timeout: float = 120.0,
    proxy_timeout: float = 90.0,
    max_body: int = 64 * 1024 * 1024,
    body_timeout: float = BODY_TIMEOUT,
    body_deadline: float = BODY_DEADLINE,
) -> FastAPI:
    """The pod's control app over its `ranks` (local rank 0 first).

    `probe_timeout`: how long each rank may take to answer a probe or a scrape (a rank that does
    not answer is silent; silent for longer than `silence_timeout`, the worker's stall
    timeout, it is taken as stalled); `proxy_timeout`: how long a request passed to rank 0 may
    take (a plan switch waits for every rank of the group: the switch timeout and a margin).
    """
    app = FastAPI(title="moe-worker pod", docs_url=None, redoc_url=None, openapi_url=None)
    install(app, control_body)
    app.add_middleware(BodyLimit, max_body=max_body, timeout=body_timeout, deadline=body_deadline)
    pool = ThreadPoolExecutor(max_workers=max(4, 2 * len(ranks)), thread_name_prefix="moe-pod")
    leader = ranks[0]

    last_answer: dict[int, float] = {}  # rank -> when its control app last answered anything

    def _silent(rank: int) -> str:
        return "no answer" if rank in last_answer else "starting"

    def _silent_too_long(rank: int) -> bool:
        """Not listening yet: starting. Silent for a while: busy (loading on a starved CPU).
        Silent for longer than the stall timeout: stopped or wedged, as its loop would be."""
        since = last_answer.get(rank)
        return since is not None and time.monotonic() - since > silence_timeout

    def ask_all(path: str) -> list[Answer]:
        answers = list(pool.map(lambda rank: _get(rank.url + path, probe_timeout), ranks))
        now = time.monotonic()
        last_answer.update((r.rank, now) for r, a in zip(ranks, answers, strict=True) if a.status)
        return answers

    @app.get("/healthz")
    def healthz() -> Response:
        answers = ask_all("/healthz")
        states = [
            {"rank": rank.rank, "status": _json(answer).get("status") or _silent(rank.rank)}
            for rank, answer in zip(ranks, answers, strict=True)
        ]
        # A rank still importing torch does not listen yet: live. One that answered before and
        # has not for longer than the stall timeout (stopped, or wedged so its HTTP thread
        # starves) is not.
        live = all(
            answer.status == 200 or (answer.status == 0 and not _silent_too_long(rank.rank))
            for rank, answer in zip(ranks, answers, strict=True)
        )
        body = {"status": "ok" if live else "stalled", "ranks": states, "pid": os.getpid()}
        return JSONResponse(body, status_code=200 if live else 503)

    @app.get("/readyz")
    def readyz() -> Response:
        answers = ask_all("/readyz")
        ready = all(answer.status == 200 for answer in answers)
        body = {
            "ready": ready,
            "ranks": [
                {"rank": rank.rank, "ready": answer.status == 200}
                for rank, answer in zip(ranks, answers, strict=True)
            ],
            "planVersion": _json(answers[0]).get("planVersion"),
        }
        first = _json(answers[0])  # local rank 0's drain (the leader's in-flight requests)
        body.update({key: first[key] for key in ("draining", "inFlight") if key in first})
        return JSONResponse(body, status_code=200 if ready else 503)

    @app.get("/metrics")
    def metrics() -> Response:
        answers = ask_all("/metrics")
        up = {rank.rank: a.status == 200 for rank, a in zip(ranks, answers, strict=True)}
        texts = [a.body.decode("utf-8", "replace") for a in answers if a.status == 200]
        try:
            text = generate_latest(_Merged(texts, up))
        except ValueError as error:  # a rank answered something that is not exposition text
            raise ApiError(502, f"a rank's metrics do not parse: {error}") from None
        return Response(text, media_type=PROMETHEUS_TEXT)

    async def pass_to_leader(request: Request) -> Response:
        body = await request.body() if request.method == "POST" else None
        headers = {k: v for k, v in request.headers.items() if k.lower() in _PASSED_HEADERS}
        url = leader.url + request.url.path
        outgoing = urllib.request.Request(url, data=body, headers=headers, method=request.method)

        def send() -> Answer:
            try:
                with _DIRECT.open(outgoing, timeout=proxy_timeout) as response:
                    return Answer(response.status, response.read())
            except urllib.error.HTTPError as error:
                return Answer(error.code, error.read())
            except (OSError, ValueError) as error:
                raise ApiError(503, f"local rank 0 did not answer: {error}") from None

        answer = await asyncio.to_thread(send)
        return Response(answer.body, status_code=answer.status, media_type="application/json")

    app.add_api_route("/v1/plan", pass_to_leader, methods=["GET", "POST"])
    app.add_api_route("/v1/drain", pass_to_leader, methods=["POST"])
    # The membership: on pod 0 the operator reads the group's and tells the leader of pods lost.
    app.add_api_route("/v1/group", pass_to_leader, methods=["GET"])
    app.add_api_route("/v1/group/lost", pass_to_leader, methods=["POST"])
    return app
