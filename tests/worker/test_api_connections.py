"""Slow clients and connection floods against real uvicorn servers of both apps (issue 19, item 7):
a head that dribbles in is cut at the header deadline, a body that dribbles in at the body
deadline, and connections beyond the cap make room by closing the one waiting longest for a
head, or are refused when every connection carries a request; normal requests are served
throughout. Deadlines are a second or so here (seconds, not minutes)."""

from __future__ import annotations

import select
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
from api_double import WAIT, ScriptedBackend, make_card
from openai_checks import check_completion, raw

from moe_worker.api import ServerHandle, create_control_app, create_openai_app, start

HEAD_TIMEOUT = 1.0
TOKEN = "s3cret-token"


def serve(kind: str, backend: ScriptedBackend, tmp: Any, **server: Any) -> ServerHandle:
    if kind == "openai":
        app = create_openai_app(backend, body_timeout=0.5, body_deadline=1.0)
    else:
        token = tmp / "token"
        token.write_text(TOKEN)
        app = create_control_app(
            backend, token_path=str(token), body_timeout=0.5, body_deadline=1.0
        )
    return start(app, "127.0.0.1", 0, header_timeout=HEAD_TIMEOUT, **server)


@pytest.fixture(params=["openai", "control"])
def server(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[str, ServerHandle]]:
    backend = ScriptedBackend(make_card())
    handle = serve(request.param, backend, tmp_path_factory.mktemp("secret"))
    yield request.param, handle
    handle.stop()


def still_serving(kind: str, handle: ServerHandle) -> None:
    if kind == "openai":
        check_completion(handle.url, "tiny-moe", [2], max_tokens=2)
    else:
        assert raw(handle.url, "/healthz")[0] == 200


def connect(handle: ServerHandle) -> socket.socket:
    return socket.create_connection(("127.0.0.1", handle.port), timeout=WAIT)


def dribble(socks: list[socket.socket], data: bytes, every: float) -> dict[socket.socket, bytes]:
    """Send `data` a byte at a time to every socket, one byte each `every` seconds, until the
    server has closed each; what each received. Fails if the data runs out first."""
    received = {sock: b"" for sock in socks}
    open_ = set(socks)
    for byte in data:
        for sock in list(open_):
            try:
                sock.send(bytes([byte]))
            except OSError:  # reset: closed by the server
                open_.discard(sock)
        readable, _, _ = select.select(list(open_), [], [], every)
        for sock in readable:
            try:
                chunk = sock.recv(4096)
            except OSError:
                chunk = b""
            received[sock] += chunk
            if not chunk:
                open_.discard(sock)
        if not open_:
            return received
    raise AssertionError(f"{len(open_)} of {len(socks)} slow connections still open")


def test_slow_heads_are_cut_at_the_header_deadline_while_requests_are_served(
    server: tuple[str, ServerHandle],
) -> None:
    kind, handle = server
    slow = [connect(handle) for _ in range(40)]
    served: list[bool] = []
    client = threading.Thread(target=lambda: (still_serving(kind, handle), served.append(True)))
    client.start()
    # Never a whole head: a header line that grows by a byte every 0.2 s, 20 s worth.
    head = b"POST /v1/completions HTTP/1.1\r\nX-Slow: " + b"a" * 60
    received = dribble(slow, head, every=0.2)
    client.join(WAIT)
    assert served == [True]
    for answer in received.values():
        assert answer.startswith(b"HTTP/1.1 408 ") or answer == b"", answer
    assert any(answer.startswith(b"HTTP/1.1 408 ") for answer in received.values())
    for sock in slow:
        sock.close()
    still_serving(kind, handle)


def test_a_silent_connection_is_closed_at_the_header_deadline(
    server: tuple[str, ServerHandle],
) -> None:
    _, handle = server
    with connect(handle) as sock:
        assert sock.recv(1024) == b""  # closed by the server, nothing said


def test_a_slow_body_is_cut_at_the_body_deadline(server: tuple[str, ServerHandle]) -> None:
    kind, handle = server
    path = b"/v1/completions" if kind == "openai" else b"/v1/plan"
    head = (
        b"POST %s HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer %s\r\nContent-Length: 1000\r\n\r\n"
    )
    with connect(handle) as sock:
        sock.sendall(head % (path, TOKEN.encode()))
        # A byte every 0.2 s: never 0.5 s without one, but the whole body is due after 1 s.
        received = dribble([sock], b" " * 1000, every=0.2)[sock]
    assert received.startswith(b"HTTP/1.1 408 "), received
    assert b"not complete 1 s after its head" in received, received
    still_serving(kind, handle)


def test_the_connection_cap_closes_the_longest_waiting_or_refuses(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    backend = ScriptedBackend(make_card())
    handle = serve("openai", backend, tmp_path_factory.mktemp("t"), max_connections=3)
    connections = handle.server.server_state.connections  # to wait for the server, not guess

    def settle(count: int) -> None:
        deadline = time.monotonic() + WAIT
        while len(connections) != count:
            assert time.monotonic() < deadline, len(connections)
            time.sleep(0.01)

    try:
        idle = []
        for _ in range(3):
            idle.append(connect(handle))
            settle(len(idle))
        # A request makes room: the connection that has waited longest for a head goes.
        assert raw(handle.url, "/v1/completions", {"model": "tiny-moe", "prompt": [2]})[0] == 200
        assert idle[0].recv(1024) == b""
        settle(2)
        # Requests held before their first token take every place; waiting ones make room.
        backend.gate.clear()
        answers: list[int] = []
        body = {"model": "tiny-moe", "prompt": [2]}
        held = [
            threading.Thread(
                target=lambda: answers.append(raw(handle.url, "/v1/completions", body)[0])
            )
            for _ in range(3)
        ]
        for thread in held:
            thread.start()
        while len(backend.submitted) < 4:
            backend.abort_seen.wait(0.01)
        assert idle[1].recv(1024) == b"" and idle[2].recv(1024) == b""
        # Nothing left to close: a connection beyond the cap is refused.
        with connect(handle) as extra:
            answer = extra.recv(4096)
        assert answer.startswith(b"HTTP/1.1 503 ") and b"at most 3" in answer, answer
        backend.gate.set()
        for thread in held:
            thread.join(WAIT)
        assert answers == [200, 200, 200]
        check_completion(handle.url, "tiny-moe", [2], max_tokens=2)
    finally:
        backend.gate.set()
        handle.stop()
