"""A deadline for every request's head and a cap on open connections, in uvicorn's h11 protocol.

uvicorn has a keep-alive timeout (idle between two requests, cancelled by any byte) and
`limit_concurrency` (a 503 to requests beyond N connections or tasks, once their head is in),
but no deadline for a head: a client sending a byte every few seconds (slow loris) holds its
connection forever, and connections are accepted as long as file descriptors last. The
protocol here adds:

- a header deadline: a request's head (request line and headers) must be complete
  `header_timeout` seconds after the connection opened, or after the previous response on it
  ended; else the connection is closed, with a plain-text 408 when part of a head had come;
- a cap: a connection beyond `max_connections` makes room by closing the connection that has
  waited longest for a head (an idle keep-alive one, or a slow loris), or, when every other
  connection carries a request, is answered 503 and closed. Probes and clients, which send
  their head at once, are never the ones waiting longest: flooding the port cannot lock them out.

The body's deadlines are the app's (`moe_worker.api.body.BodyLimit`): it answers them in the
app's own error shape.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

HEADER_TIMEOUT = 10.0
"""Seconds a request's head may take (kubelet's probes and the clients send it in one packet)."""


class GuardedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with a header deadline and a cap on connections (see the module
    docstring). `guarded_protocol` makes the class of one server, with its limits."""

    header_timeout: float = HEADER_TIMEOUT
    max_connections: int = 1024

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        self._head_deadline: asyncio.TimerHandle | None = None
        self._waiting_since = time.monotonic()
        super().connection_made(transport)
        if len(self.connections) > self.max_connections and not self._make_room():
            self._answer_and_close(
                503, f"too many open connections (at most {self.max_connections})"
            )
            return
        self._await_head()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self._head_deadline is not None and not self.awaiting_head:
            self._head_deadline.cancel()
            self._head_deadline = None

    def on_response_complete(self) -> None:
        super().on_response_complete()  # may parse the next, pipelined, request's head
        if not self.transport.is_closing() and self.awaiting_head:
            self._waiting_since = time.monotonic()
            self._await_head()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._head_deadline is not None:
            self._head_deadline.cancel()
            self._head_deadline = None
        super().connection_lost(exc)

    @property
    def awaiting_head(self) -> bool:
        """No request of this connection is being read or answered: the next one's head is due."""
        return self.conn.their_state is h11.IDLE and self.conn.our_state is h11.IDLE

    def _await_head(self) -> None:
        if self._head_deadline is not None:
            self._head_deadline.cancel()
        self._head_deadline = self.loop.call_later(self.header_timeout, self._head_overdue)

    def _head_overdue(self) -> None:
        self._head_deadline = None
        if self.transport.is_closing() or not self.awaiting_head:
            return
        if self.conn.trailing_data[0]:  # part of a head came: say why the connection ends
            self._answer_and_close(408, f"request head incomplete after {self.header_timeout:g} s")
        else:  # an idle connection: closed as keep-alive timeouts close them
            self.transport.close()

    def _make_room(self) -> bool:
        """Close the connection that has waited longest for a head; False if none is waiting."""
        waiting = [
            other
            for other in self.connections
            if other is not self
            and isinstance(other, GuardedH11Protocol)
            and other.awaiting_head
            and not other.transport.is_closing()
        ]
        if not waiting:
            return False
        min(waiting, key=lambda other: other._waiting_since).transport.close()
        return True

    def _answer_and_close(self, status: int, message: str) -> None:
        """A plain-text answer written past h11 (no request may have been parsed), then close."""
        body = message.encode()
        reason = {408: b"Request Timeout", 503: b"Service Unavailable"}[status]
        self.transport.write(
            b"HTTP/1.1 %d %s\r\ncontent-type: text/plain; charset=utf-8\r\n"
            b"content-length: %d\r\nconnection: close\r\n\r\n%s" % (status, reason, len(body), body)
        )
        self.transport.close()


def guarded_protocol(header_timeout: float, max_connections: int) -> type[GuardedH11Protocol]:
    """The protocol class of one server (uvicorn.Config(http=...) takes a class)."""
    limits: dict[str, Any] = {"header_timeout": header_timeout, "max_connections": max_connections}
    return type("GuardedH11Protocol", (GuardedH11Protocol,), limits)
