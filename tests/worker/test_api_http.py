"""Hostile HTTP over a raw socket, against both apps: malformed or lying Content-Length, bodies
over the limit, bodies that never finish. Every one gets an answer (never a hang, never a
dropped connection without a status), nothing is read past the limit, and the server keeps
serving."""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator

import pytest
from api_double import WAIT, ScriptedBackend, make_card
from openai_checks import check_completion, raw

from moe_worker.api import ServerHandle, create_control_app, create_openai_app, start

LIMIT = 4096
TOKEN = "s3cret-token"


@pytest.fixture(params=["openai", "control"])
def server(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[str, ServerHandle]]:
    backend = ScriptedBackend(make_card())
    if request.param == "openai":
        app = create_openai_app(backend, max_body=LIMIT, body_timeout=0.5)
    else:
        token = tmp_path_factory.mktemp("secret") / "token"
        token.write_text(TOKEN)
        app = create_control_app(backend, token_path=str(token), max_body=LIMIT, body_timeout=0.5)
    handle = start(app, "127.0.0.1", 0)
    yield request.param, handle
    handle.stop()


def path_of(kind: str) -> bytes:
    return b"/v1/completions" if kind == "openai" else b"/v1/plan"


def exchange(handle: ServerHandle, head: bytes, body: bytes = b"") -> tuple[int, bytes]:
    """Send a request as raw bytes; (status, body) of the answer, read until the server is done."""
    with socket.create_connection(("127.0.0.1", handle.port), timeout=WAIT) as sock:
        sock.sendall(head + b"\r\n" + body)
        received = b""
        while b"\r\n\r\n" not in received:
            chunk = sock.recv(65536)
            assert chunk, f"connection closed without an answer: {received!r}"
            received += chunk
        header, _, rest = received.partition(b"\r\n\r\n")
        status = int(header.split(b" ", 2)[1])
        length = next(
            (
                int(line.split(b":")[1])
                for line in header.lower().split(b"\r\n")
                if line.startswith(b"content-length:")
            ),
            None,
        )
        while length is not None and len(rest) < length:
            chunk = sock.recv(65536)
            if not chunk:
                break
            rest += chunk
        return status, rest


def headers(kind: str, *lines: bytes) -> bytes:
    auth = b"Authorization: Bearer %s\r\n" % TOKEN.encode()
    return b"POST %s HTTP/1.1\r\nHost: test\r\n%s%s" % (
        path_of(kind),
        auth,
        b"".join(line + b"\r\n" for line in lines),
    )


def assert_error_shape(kind: str, body: bytes, status: int) -> None:
    answer = json.loads(body)
    if kind == "openai":
        assert set(answer["error"]) == {"message", "type", "param", "code"}, answer
    else:
        assert isinstance(answer["error"], str) and "field" in answer, answer


def still_serving(kind: str, handle: ServerHandle) -> None:
    if kind == "openai":
        check_completion(handle.url, "tiny-moe", [2], max_tokens=2)
    else:
        assert raw(handle.url, "/v1/plan", api_key=TOKEN)[0] == 200


@pytest.mark.parametrize(
    "length", [b"-1", b"abc", b"1e3", b"+5", b"0x10", b"5, 7", b" ", b"9" * 30]
)
def test_malformed_content_length_is_a_400(server: tuple[str, ServerHandle], length: bytes) -> None:
    kind, handle = server
    # The HTTP parser (h11) answers these itself, before any app code: a plain-text 400.
    status, _ = exchange(handle, headers(kind, b"Content-Length: " + length), b"{}")
    assert status == 400
    still_serving(kind, handle)


def test_two_content_lengths_are_a_400(server: tuple[str, ServerHandle]) -> None:
    kind, handle = server
    status, _ = exchange(
        handle, headers(kind, b"Content-Length: 2", b"Content-Length: 3000"), b"{}"
    )
    assert status == 400
    still_serving(kind, handle)


def test_a_declared_body_over_the_limit_is_refused_unread(
    server: tuple[str, ServerHandle],
) -> None:
    kind, handle = server
    # The body is never sent: the answer comes without waiting for it.
    status, body = exchange(handle, headers(kind, b"Content-Length: %d" % (10**12)))
    assert status == 413
    assert_error_shape(kind, body, 413)
    still_serving(kind, handle)


def test_a_chunked_body_growing_past_the_limit_is_refused(
    server: tuple[str, ServerHandle],
) -> None:
    kind, handle = server
    chunk = b"%x\r\n%s\r\n" % (1024, b" " * 1024)
    status, body = exchange(handle, headers(kind, b"Transfer-Encoding: chunked"), chunk * 5)
    assert status == 413
    assert_error_shape(kind, body, 413)
    still_serving(kind, handle)


def test_a_body_shorter_than_declared_times_out(server: tuple[str, ServerHandle]) -> None:
    kind, handle = server
    status, body = exchange(handle, headers(kind, b"Content-Length: 100"), b'{"model":')
    assert status == 408
    assert_error_shape(kind, body, 408)
    still_serving(kind, handle)


def test_a_body_longer_than_declared_is_cut_there(server: tuple[str, ServerHandle]) -> None:
    kind, handle = server
    # The server reads 2 bytes ("{}", an invalid request) and takes the rest for the next
    # request, which is garbage: one answer each way, no hang.
    status, _ = exchange(handle, headers(kind, b"Content-Length: 2"), b"{}" + b"x" * 100)
    assert status == 400
    still_serving(kind, handle)
