"""Reading counters: strict about every sample; hostile or partial input is an error, not data."""

from __future__ import annotations

import http.server
import threading
import time
from collections.abc import Iterator
from typing import ClassVar

import pytest

from moe_operator.loads import (
    PROMETHEUS_FAILED,
    LoadReadError,
    Target,
    parse_exposition,
    parse_rerouted,
    read_direct,
    read_prometheus,
)

GOOD = """# HELP moe_expert_tokens_total tokens
# TYPE moe_expert_tokens_total counter
moe_expert_tokens_total{layer="0",expert="1"} 12.0
moe_expert_tokens_total{layer="1",expert="3"} 5.0
# TYPE moe_plan_version gauge
moe_plan_version 4.0
# TYPE moe_gate_rerouted_total counter
moe_gate_rerouted_total{layer="0"} 3.0
moe_gate_rerouted_total{layer="1"} 0.0
# TYPE moe_gate_rerouted_weight_total counter
moe_gate_rerouted_weight_total{layer="0"} 0.25
"""


def test_parses_counters_and_plan_version() -> None:
    counters, version = parse_exposition(GOOD, num_layers=2, num_experts=4, where="rank 0")
    assert counters == {(0, 1): 12.0, (1, 3): 5.0}
    assert version == 4


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ('moe_expert_tokens_total{layer="0",expert="9"} 1\n', "expert"),
        ('moe_expert_tokens_total{layer="x",expert="0"} 1\n', "layer"),
        ('moe_expert_tokens_total{layer="0",expert="0"} -3\n', "value"),
        ('moe_expert_tokens_total{layer="0",expert="0"} NaN\n', "value"),
        ('moe_expert_tokens_total{layer="0",expert="0"} +Inf\n', "value"),
        ('moe_expert_tokens_total{layer="0" 1\n', "malformed"),
        ("\x00\x01garbage{{{\n", "malformed"),
        ('moe_expert_tokens_total{expert="0"} 1\n', "layer"),
    ],
)
def test_hostile_or_malformed_text_is_refused(text: str, reason: str) -> None:
    with pytest.raises(LoadReadError, match=reason):
        parse_exposition(text, num_layers=2, num_experts=4, where="rank 0")


class _Handler(http.server.BaseHTTPRequestHandler):
    bodies: ClassVar[dict[str, bytes]] = {}
    in_flight: ClassVar[list[int]] = [0, 0]  # now, most at once
    lock = threading.Lock()

    def do_GET(self) -> None:
        with self.lock:
            self.in_flight[0] += 1
            self.in_flight[1] = max(self.in_flight)
        try:
            self._answer()
        finally:
            with self.lock:
                self.in_flight[0] -= 1

    def _answer(self) -> None:
        body = self.bodies.get(self.path, b"")
        if self.path == "/hang":
            threading.Event().wait(2)
        if self.path.startswith("/slow"):
            threading.Event().wait(0.05)
        self.send_response(200 if self.path in self.bodies else 404)
        self.end_headers()
        if self.path == "/trickle":  # a byte at a time, never a pause long enough to time out
            for byte in body:
                self.wfile.write(bytes([byte]))
                self.wfile.flush()
                threading.Event().wait(0.02)
            return
        self.wfile.write(body)

    def log_message(self, *_: object) -> None:
        pass


class _QuietServer(http.server.ThreadingHTTPServer):
    def handle_error(self, *_: object) -> None:  # the reader hangs up on oversized bodies
        pass


@pytest.fixture
def server() -> Iterator[str]:
    httpd = _QuietServer(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()


def test_parses_the_rerouted_counters_per_layer_and_refuses_odd_ones() -> None:
    assert parse_rerouted(GOOD, num_layers=2, where="rank 0") == {0: 3.0, 1: 0.0}
    assert parse_rerouted(GOOD.split("# TYPE moe_gate")[0], num_layers=2, where="r") == {}
    for text, reason in (
        ('moe_gate_rerouted_total{layer="2"} 1\n', "layer"),
        ('moe_gate_rerouted_total{layer="0"} -1\n', "value"),
        ('moe_gate_rerouted_total{layer="0"} NaN\n', "value"),
    ):
        with pytest.raises(LoadReadError, match=reason):
            parse_rerouted(text, num_layers=2, where="rank 0")


def test_direct_read_needs_every_rank(server: str) -> None:
    _Handler.bodies = {"/a": GOOD.encode(), "/b": GOOD.encode(), "/big": b"#" * (5 << 20)}
    snapshot = read_direct(
        [Target(0, f"{server}/a"), Target(1, f"{server}/b")],
        world_size=2,
        num_layers=2,
        num_experts=4,
    )
    assert snapshot.counters[1] == {(0, 1): 12.0, (1, 3): 5.0}
    assert snapshot.plan_versions == {0: 4, 1: 4}
    assert snapshot.rerouted == {0: {0: 3.0, 1: 0.0}, 1: {0: 3.0, 1: 0.0}}
    with pytest.raises(LoadReadError, match=r"ranks \[1\]"):
        read_direct([Target(0, f"{server}/a")], world_size=2, num_layers=2, num_experts=4)
    with pytest.raises(LoadReadError, match="404"):
        read_direct(
            [Target(0, f"{server}/a"), Target(1, f"{server}/missing")],
            world_size=2,
            num_layers=2,
            num_experts=4,
        )
    with pytest.raises(LoadReadError, match="larger than"):
        read_direct(
            [Target(0, f"{server}/a"), Target(1, f"{server}/big")],
            world_size=2,
            num_layers=2,
            num_experts=4,
        )


def test_a_hanging_worker_times_out(server: str) -> None:
    _Handler.bodies = {"/a": GOOD.encode(), "/hang": GOOD.encode()}
    with pytest.raises(LoadReadError, match=r"(?i)timed? ?out"):
        read_direct(
            [Target(0, f"{server}/a"), Target(1, f"{server}/hang")],
            world_size=2,
            num_layers=2,
            num_experts=4,
            timeout=0.3,
        )


class _Redirect(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        self.send_response(302)
        self.send_header("Location", "http://127.0.0.1:1/elsewhere")
        self.end_headers()

    def log_message(self, *_: object) -> None:
        pass


def test_prometheus_errors_read_the_same_whatever_listens(server: str) -> None:
    """Issue 11, item 8: the URL is the user's; refused, HTTP errors, non-Prometheus answers,
    hangs and redirects must not tell them apart (no port probing through status)."""
    _Handler.bodies = {"/text/api/v1/query": b"hello", "/hang/api/v1/query": b"{}"}
    redirect = _QuietServer(("127.0.0.1", 0), _Redirect)
    threading.Thread(target=redirect.serve_forever, daemon=True).start()
    closed = _QuietServer(("127.0.0.1", 0), _Redirect)
    closed_url = f"http://127.0.0.1:{closed.server_address[1]}"
    closed.server_close()  # nothing listens there any more: connection refused
    messages = set()
    try:
        for url in (
            closed_url,
            f"{server}/missing",
            f"{server}/text",
            f"http://127.0.0.1:{redirect.server_address[1]}",
        ):
            with pytest.raises(LoadReadError) as error:
                read_prometheus(url, "ns", "m", world_size=1, num_layers=1, num_experts=1)
            messages.add(str(error.value))
    finally:
        redirect.shutdown()
    assert messages == {PROMETHEUS_FAILED}


def test_a_trickling_worker_is_cut_off_within_its_timeout(server: str) -> None:
    _Handler.bodies = {"/a": GOOD.encode(), "/trickle": GOOD.encode() * 4}
    started = time.monotonic()
    with pytest.raises(LoadReadError, match=r"(?i)timed? ?out|within"):
        read_direct(
            [Target(0, f"{server}/a"), Target(1, f"{server}/trickle")],
            world_size=2,
            num_layers=2,
            num_experts=4,
            timeout=0.3,
        )
    assert time.monotonic() - started < 1.5  # the whole body would take ~10 s


def test_a_slow_rank_never_holds_the_read_past_its_deadline(server: str) -> None:
    _Handler.bodies = {"/a": GOOD.encode(), "/hang": GOOD.encode()}
    started = time.monotonic()
    with pytest.raises(LoadReadError, match=r"ranks \[1\] not read within 0.2 s"):
        read_direct(
            [Target(0, f"{server}/a"), Target(1, f"{server}/hang")],
            world_size=2,
            num_layers=2,
            num_experts=4,
            timeout=1.0,
            deadline=0.2,
        )
    assert time.monotonic() - started < 0.8


def test_pods_are_read_a_bounded_number_at_a_time_and_each_body_once(server: str) -> None:
    pod = "".join(
        f'moe_expert_tokens_total{{rank="{rank}",layer="0",expert="{rank}"}} {rank + 1}\n'
        for rank in range(4)
    )
    _Handler.bodies = {f"/slow{pod_index}": pod.encode() for pod_index in range(12)}
    _Handler.in_flight[:] = [0, 0]
    # 12 pods of 4 ranks; each pod's body names ranks 0..3, as a pod at ordinal 0 would: the
    # reader keeps the samples of the pod's own ranks only
    targets = [Target(4 * index, f"{server}/slow{index}", 4) for index in range(12)]
    snapshot = read_direct(targets, world_size=48, num_layers=1, num_experts=48, concurrency=3)
    assert 1 <= _Handler.in_flight[1] <= 3
    assert snapshot.counters[2] == {(0, 2): 3.0}
    assert snapshot.counters[5] == {}  # pod 1's body labels ranks 0..3, none of 4..7
