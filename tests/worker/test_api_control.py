"""The control app through a real uvicorn server: probes, metrics and the `/v1/plan` contract
the operator depends on (docs/worker.md). The HTTP-semantics cases of test_http_plan.py, over a
scripted backend instead of four worker processes."""

from __future__ import annotations

import json
import os
import threading
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from api_double import WAIT, ScriptedBackend, make_card
from openai_checks import raw
from worker_harness import FIXTURES

from moe_contract.plan import parse_plan
from moe_contract.switch import STALE, SwitchAnswer
from moe_operator import handoff
from moe_worker.api import ServerHandle, create_control_app, start

TOKEN = "s3cret-token"
Serve = Callable[..., str]


@pytest.fixture
def token_path(tmp_path: Path) -> str:
    path = tmp_path / "token"
    path.write_text(TOKEN + "\n")
    return str(path)


@pytest.fixture
def serve(token_path: str) -> Iterator[Serve]:
    handles: list[ServerHandle] = []

    def run(backend: ScriptedBackend, **options: Any) -> str:
        options.setdefault("token_path", token_path)
        handle = start(create_control_app(backend, **options), "127.0.0.1", 0, name="control")
        handles.append(handle)
        return handle.url

    yield run
    for handle in handles:
        handle.stop()


@pytest.fixture
def backend() -> ScriptedBackend:
    return ScriptedBackend(make_card(), world_size=4)


@pytest.fixture
def url(serve: Serve, backend: ScriptedBackend) -> str:
    return serve(backend)


def document(name: str) -> dict[str, Any]:
    return json.loads((FIXTURES / name).read_text())


def post_plan(url: str, doc: Any, token: str | None = TOKEN) -> tuple[int, dict[str, Any]]:
    body = doc if isinstance(doc, bytes) else json.dumps(doc).encode()
    return raw(url, "/v1/plan", body, api_key=token)


def served(url: str) -> dict[str, Any]:
    status, body = raw(url, "/v1/plan", api_key=TOKEN)
    assert status == 200, body
    return body


def test_probes_and_metrics(url: str, backend: ScriptedBackend) -> None:
    assert raw(url, "/healthz") == (200, {"status": "ok", "rank": 0, "pid": os.getpid()})
    serving = {"draining": False, "inFlight": 0, "drainTimeoutSeconds": 20.0}
    assert raw(url, "/readyz") == (200, {"ready": True, "rank": 0, "planVersion": 1, **serving})
    backend.ready, backend.live = False, False  # a hung serving loop fails liveness
    assert raw(url, "/readyz") == (503, {"ready": False, "rank": 0, "planVersion": 1, **serving})
    assert raw(url, "/healthz")[0] == 503
    with urllib.request.urlopen(f"{url}/metrics", timeout=WAIT) as response:
        assert response.headers["Content-Type"].startswith("text/plain")
        assert b"moe_plan_version 1" in response.read()


def test_get_plan_answers_the_document_and_its_digest(url: str, backend: ScriptedBackend) -> None:
    answer = served(url)
    plan = parse_plan(answer)  # checks the digest against the contents
    assert plan == backend.plan and answer["digest"] == plan.digest()
    backend.plan = None
    status, body = raw(url, "/v1/plan", api_key=TOKEN)
    assert status == 503 and body["error"]


@pytest.mark.parametrize("token", [None, "wrong"])
def test_get_plan_needs_the_control_token(url: str, token: str | None) -> None:
    """Issue 19, item 6: the plan (where every expert lives, the gate bias) was anyone's on the
    pod network; probes and metrics stay open."""
    status, body = raw(url, "/v1/plan", api_key=token)
    assert status == 401 and "control token" in body["error"] and "version" not in body
    assert raw(url, "/readyz")[0] == raw(url, "/healthz")[0] == 200
    with urllib.request.urlopen(f"{url}/metrics", timeout=WAIT) as response:
        assert response.status == 200


def test_valid_plans_apply(url: str, backend: ScriptedBackend) -> None:
    for name in (
        "replicated-2layer-4expert-4rank-2slots.json",
        "gate-bias-2layer-4expert-4rank.json",
    ):
        version = served(url)["version"] + 1
        doc = {**document(name), "version": version}
        status, body = post_plan(url, doc)
        assert status == 200, body
        assert body["applied"] is True and body["version"] == version
        assert body["pauseSeconds"] >= 0 and body["digest"] == parse_plan(doc).digest()
        assert parse_plan(served(url)) == parse_plan(doc)
    assert backend.switch_timeouts == [60.0, 60.0]


@pytest.mark.parametrize(
    ("name", "status", "field"),
    [
        ("invalid-wrong-layer-count.json", 422, "slots"),
        ("invalid-wrong-world-size.json", 422, "slots[0]"),
        ("invalid-unknown-expert.json", 422, "slots[0][3][0]"),
        ("invalid-missing-expert.json", 422, "slots[0]"),
        ("invalid-slot-count-mismatch.json", 422, "slots[0][3]"),
        ("invalid-gate-bias-length.json", 422, "gateBias[0]"),
        ("invalid-missing-version.json", 400, "version"),
        ("invalid-unknown-field.json", 400, "placement"),
        ("invalid-digest.json", 400, "digest"),
    ],
)
def test_invalid_plans_are_refused_naming_the_field(
    url: str, name: str, status: int, field: str
) -> None:
    before = served(url)
    got, body = post_plan(url, document(name))
    assert got == status, body
    assert body["field"] == field and body["error"].startswith(field), body
    assert served(url) == before


@pytest.mark.parametrize("body", [b"{not json", b"[1, 2]", b""])
def test_unparsable_bodies_are_a_400(url: str, body: bytes) -> None:
    status, answer = post_plan(url, body)
    assert status == 400 and answer["error"], answer


def test_stale_versions_are_409(url: str) -> None:
    current = served(url)
    for stale in (current["version"], 1):
        doc = {**document("round-robin-2layer-4expert-4rank.json"), "version": stale}
        assert post_plan(url, doc) == (
            409,
            {"applied": False, "reason": "stale", "version": current["version"]},
        )


@pytest.mark.parametrize("token", [None, "wrong-token", TOKEN + "-but-longer", ""])
def test_missing_or_wrong_token_is_a_401(url: str, token: str | None) -> None:
    before = served(url)
    doc = {**document("round-robin-2layer-4expert-4rank.json"), "version": 2}
    status, body = post_plan(url, doc, token=token)
    assert status == 401, body
    assert served(url) == before
    assert TOKEN not in json.dumps(body)


@pytest.mark.parametrize("token_file", ["missing", "empty", None])
def test_no_usable_token_file_refuses_every_post(
    serve: Serve, backend: ScriptedBackend, tmp_path: Path, token_file: str | None
) -> None:
    path = None if token_file is None else tmp_path / token_file
    if token_file == "empty":
        assert path is not None
        path.write_text("\n")
    url = serve(backend, token_path=None if path is None else str(path))
    doc = {**document("round-robin-2layer-4expert-4rank.json"), "version": 2}
    assert post_plan(url, doc, token="")[0] == 401
    assert post_plan(url, doc, token="anything")[0] == 401


def test_a_non_leader_points_to_rank_0(serve: Serve) -> None:
    url = serve(ScriptedBackend(make_card(), rank=2))
    doc = {**document("round-robin-2layer-4expert-4rank.json"), "version": 99}
    status, body = post_plan(url, doc)
    assert status == 421 and body["leaderRank"] == 0
    assert served(url)["version"] == 1
    assert raw(url, "/healthz")[1]["rank"] == 2


def test_not_ready_is_a_503(url: str, backend: ScriptedBackend) -> None:
    backend.ready = False
    doc = {**document("round-robin-2layer-4expert-4rank.json"), "version": 2}
    assert post_plan(url, doc)[0] == 503


def test_switch_timeout_is_a_504_and_refusal_a_409(serve: Serve, backend: ScriptedBackend) -> None:
    url = serve(backend, switch_timeout=7.5)
    backend.switch_outcome = "timeout"
    doc = {**document("round-robin-2layer-4expert-4rank.json"), "version": 2}
    assert post_plan(url, doc) == (504, {"applied": False, "reason": "timeout"})
    assert backend.switch_timeouts == [7.5]
    backend.switch_outcome = SwitchAnswer.refused(STALE, version=5)
    assert post_plan(url, doc) == (409, {"applied": False, "reason": "stale", "version": 5})


def test_probes_answer_while_a_switch_blocks(url: str, backend: ScriptedBackend) -> None:
    backend.switch_gate.clear()
    doc = {**document("replicated-2layer-4expert-4rank-2slots.json"), "version": 2}
    answers: list[tuple[int, dict[str, Any]]] = []
    poster = threading.Thread(target=lambda: answers.append(post_plan(url, doc)))
    poster.start()
    try:
        while not backend.switch_timeouts:  # the switch has begun and blocks
            backend.abort_seen.wait(0.05)
        assert raw(url, "/healthz")[0] == 200
        assert raw(url, "/readyz")[0] == 200
        assert served(url)["version"] == 1
    finally:
        backend.switch_gate.set()
        poster.join(WAIT)
    assert answers[0][0] == 200 and served(url)["version"] == 2


def test_the_operator_handoff_speaks_this_contract(url: str) -> None:
    """moe_operator.handoff is the real client: a plan goes through, a resend is a success."""
    assert handoff.serving_version(url, TOKEN) == 1
    plan = parse_plan({**document("replicated-2layer-4expert-4rank-2slots.json"), "version": 2})
    assert handoff.post_plan(url, plan, TOKEN).applied_version == 2
    assert handoff.post_plan(url, plan, TOKEN) == handoff.HandoffResult(2, None)
    with pytest.raises(handoff.HandoffError, match="401"):
        handoff.post_plan(url, plan.with_version(3), "wrong")
    assert handoff.serving_version(url, TOKEN) == 2


@pytest.mark.parametrize("token", [None, "wrong"])
def test_a_drain_needs_the_control_token_and_a_post(
    url: str, backend: ScriptedBackend, token: str | None
) -> None:
    assert raw(url, "/v1/drain", b"", api_key=token)[0] == 401
    assert raw(url, "/v1/drain", api_key=TOKEN, method="GET")[0] == 405  # never a GET
    assert not backend.draining and raw(url, "/readyz")[0] == 200


def test_a_drain_turns_readiness_off_and_says_so(url: str, backend: ScriptedBackend) -> None:
    answer = raw(url, "/v1/drain", b"", api_key=TOKEN)
    assert answer == (202, {"draining": True, "inFlight": 0, "drainTimeoutSeconds": 20.0})
    assert backend.draining
    status, body = raw(url, "/readyz")
    assert (status, body["ready"], body["draining"]) == (503, False, True)
    assert raw(url, "/healthz")[0] == 200  # liveness holds: the kubelet must not kill a drain
    assert raw(url, "/v1/drain", b"", api_key=TOKEN)[0] == 202  # idempotent


def test_unknown_routes_and_methods(url: str) -> None:
    status, body = raw(url, "/nowhere")
    assert status == 404 and body == {"error": "no route GET /nowhere", "field": None}
    assert raw(url, "/healthz", b"{}", method="POST")[0] == 405
