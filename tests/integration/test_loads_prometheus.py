"""The Prometheus load source against a real Prometheus (Debian's package) scraping two ranks.

Each "rank" is a tiny HTTP server serving exposition text; Prometheus scrapes them with the
`namespace` and `pod` labels a PodMonitor would attach, and `loads.read_prometheus` must return
exactly the counters the ranks serve, summed rank by rank over the deployment's replica groups
(pods `moe-<ordinal>` and `moe-g<k>-<ordinal>`, issue 23) and nothing of another deployment.
"""

from __future__ import annotations

import http.server
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import ClassVar

import pytest
import yaml

from moe_local.controlplane import free_port
from moe_operator.loads import CounterSnapshot, LoadReadError, read_prometheus
from tests.requirements import require_tool

pytestmark = pytest.mark.integration


class _Rank(http.server.BaseHTTPRequestHandler):
    bodies: ClassVar[dict[int, str]] = {}

    def do_GET(self) -> None:
        body = self.bodies[self.server.server_address[1]].encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/plain; version=0.0.4")
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *_: object) -> None:
        pass


def _counters(rank: int, values: dict[tuple[int, int], float], rerouted: float) -> str:
    """A worker's series: every one carries its `rank` label (a pod of several ranks serves
    them all; the queries sum by it, not by pod)."""
    lines = ["# TYPE moe_expert_tokens_total counter"]
    lines += [
        f'moe_expert_tokens_total{{rank="{rank}",layer="{layer}",expert="{expert}"}} {value}'
        for (layer, expert), value in values.items()
    ]
    lines += [
        "# TYPE moe_gate_rerouted_total counter",
        f'moe_gate_rerouted_total{{rank="{rank}",layer="0"}} {rerouted}',
    ]
    return "\n".join(lines) + "\n"


GROUP_0 = {0: {(0, 0): 100.0, (0, 1): 20.0}, 1: {(0, 2): 5.0, (0, 3): 0.0}}
GROUP_3 = {0: {(0, 0): 20.0, (0, 1): 10.0}, 1: {(0, 2): 2.0, (0, 3): 0.0}}
RANK_COUNTERS = {0: {(0, 0): 120.0, (0, 1): 30.0}, 1: {(0, 2): 7.0, (0, 3): 0.0}}  # summed
REROUTED_0, REROUTED_3 = {0: 6.0, 1: 1.0}, {0: 3.0, 1: 1.0}
RANK_REROUTED = {0: {0: 9.0}, 1: {0: 2.0}}
OTHER = {0: {(0, 0): 1000.0}, 1: {(0, 2): 1000.0}}  # deployment moe-canary: never counted
# (pod, rank, counters, rerouted) of every target Prometheus scrapes.
TARGETS = [
    *((f"moe-{rank}", rank, GROUP_0[rank], REROUTED_0[rank]) for rank in (0, 1)),
    *((f"moe-g3-{rank}", rank, GROUP_3[rank], REROUTED_3[rank]) for rank in (0, 1)),
    *((f"moe-canary-{rank}", rank, OTHER[rank], 100.0) for rank in (0, 1)),
]


@pytest.fixture
def prometheus(tmp_path: Path) -> Iterator[str]:
    executable = require_tool("prometheus")
    servers = []
    targets = []
    for pod, rank, counters, rerouted in TARGETS:
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Rank)
        _Rank.bodies[server.server_address[1]] = _counters(rank, counters, rerouted)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        targets.append(
            {
                "targets": [f"127.0.0.1:{server.server_address[1]}"],
                "labels": {"namespace": "ml", "pod": pod},
            }
        )
    config = {
        "global": {"scrape_interval": "1s"},
        "scrape_configs": [{"job_name": "workers", "static_configs": targets}],
    }
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    port = free_port()
    process = subprocess.Popen(
        [
            executable,
            f"--config.file={tmp_path / 'prometheus.yml'}",
            f"--storage.tsdb.path={tmp_path / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        process.terminate()
        process.wait(timeout=20)
        for server in servers:
            server.shutdown()


def _both_ranks(prometheus: str) -> CounterSnapshot:
    deadline = time.monotonic() + 30
    while True:
        try:
            return read_prometheus(
                prometheus, "ml", "moe", world_size=2, num_layers=1, num_experts=4
            )
        except LoadReadError:
            assert time.monotonic() < deadline, "Prometheus never returned both ranks"
            time.sleep(0.5)


def test_prometheus_source_returns_what_the_ranks_serve(prometheus: str) -> None:
    deadline = time.monotonic() + 30
    snapshot = _both_ranks(prometheus)
    while snapshot.counters != RANK_COUNTERS and time.monotonic() < deadline:
        time.sleep(0.5)  # both groups' ranks scraped, not only the first seen
        snapshot = _both_ranks(prometheus)
    assert snapshot.counters == RANK_COUNTERS
    assert snapshot.rerouted == RANK_REROUTED  # scraped together with the token counters


def test_prometheus_source_refuses_a_missing_rank(prometheus: str) -> None:
    _both_ranks(prometheus)  # scraped: rank 2 is missing, not merely late
    with pytest.raises(LoadReadError, match=r"ranks \[2\]"):
        read_prometheus(prometheus, "ml", "moe", world_size=3, num_layers=1, num_experts=4)
