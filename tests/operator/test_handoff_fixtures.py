"""The operator's hand-off reads and writes plan documents as the shared fixtures are written.

A stand-in leader on a real local HTTP server answers GET /v1/plan with a fixture (and its
digest, as the worker does) and records what POST /v1/plan receives: the worker's own answers
to the same files are tested in tests/worker (test_api_control, test_http_plan), which call
this very `handoff` module against the real control app.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from moe_operator import handoff
from tests.plan_fixtures import UNPARSABLE, VALID, document, plan


class Leader(ThreadingHTTPServer):
    serving: dict[str, Any]
    received: list[dict[str, Any]]


class Handler(BaseHTTPRequestHandler):
    server: Leader

    def _answer(self, status: int, body: dict[str, Any]) -> None:
        raw = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(raw)))
        self.end_headers()
        self.wfile.write(raw)

    def do_GET(self) -> None:
        if self.headers.get("Authorization") != "Bearer token":  # as the worker: 401 without
            self._answer(401, {"error": "missing control token"})
            return
        self._answer(200, self.server.serving)

    def do_POST(self) -> None:
        posted = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.server.received.append(posted)
        self._answer(200, {"applied": True, "version": posted["version"], "pauseSeconds": 0.0})

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture(scope="module")
def server() -> Iterator[Leader]:
    server = Leader(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


@pytest.fixture
def leader(server: Leader) -> Leader:
    server.serving, server.received = {}, []
    return server


def url(server: Leader) -> str:
    return f"http://127.0.0.1:{server.server_address[1]}"


@pytest.mark.parametrize("name", VALID)
def test_a_served_fixture_is_read_as_its_plan(leader: Leader, name: str) -> None:
    expected = plan(name)
    leader.serving = {**document(name), "digest": expected.digest()}
    assert handoff.served_plan(url(leader), "token") == expected
    served = handoff.serving(url(leader), "token")
    assert served == handoff.Served(expected.version, expected.digest())


@pytest.mark.parametrize(("name", "field"), UNPARSABLE.items())
def test_an_unparsable_served_fixture_is_no_plan(leader: Leader, name: str, field: str) -> None:
    leader.serving = document(name)
    with pytest.raises(handoff.HandoffError, match=field):
        handoff.served_plan(url(leader), "token")


@pytest.mark.parametrize("name", VALID)
def test_a_posted_plan_is_the_fixture_document(leader: Leader, name: str) -> None:
    result = handoff.post_plan(url(leader), plan(name), "token")
    assert leader.received == [document(name)]
    assert result.applied_version == plan(name).version
