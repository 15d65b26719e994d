"""Many lightweight fake ranks: HTTP servers that answer like worker pods, without torch.

For the operator at scale (`moe-ep operator-bench`, tests/operator/test_scale_step.py): one
small threaded HTTP server per pod, at 127.0.X.Y (every address of 127/8 is the loopback on
Linux) and the deployment's port, as the operator addresses pods by IP. Each pod answers
`/metrics` for its ranks in the workers' exposition (every series labelled with `rank`; a
rank exports `moe_expert_tokens_total` for the experts it holds, growing by its share of a fixed
expert load on every scrape, plus the plan version, the rerouted counters and a latency
histogram, as a worker would) and pod 0 answers `/v1/plan` (GET: the served version and digest;
POST: a newer plan is applied at once).
"""

from __future__ import annotations

import http.server
import json
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from moe_contract.plan import Plan, PlanError, parse_plan


def pod_ip(ordinal: int) -> str:
    """127.0.X.Y for pod `ordinal` (never 127.0.0.0)."""
    number = ordinal + 1
    return f"127.0.{number // 256}.{number % 256}"


@dataclass
class FakeRanks:
    """The pods of one deployment. `load[layer][expert]`: tokens per scrape of every expert."""

    plan: Plan
    load: Sequence[Sequence[float]]
    ranks_per_pod: int
    port: int
    token: str = "token"
    slow_pods: frozenset[int] = frozenset()
    """Pods that take `slow_seconds` to answer /metrics (a stalled rank)."""
    slow_seconds: float = 30.0
    scrapes: int = 0
    posted: list[Plan] = field(default_factory=list)
    _servers: list[http.server.ThreadingHTTPServer] = field(default_factory=list)
    _counts: dict[tuple[int, int], dict[int, float]] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _replica_cache: tuple[int, list[dict[int, int]]] = (0, [])

    @property
    def pods(self) -> int:
        return self.plan.world_size // self.ranks_per_pod

    def pod_objects(self, name: str) -> list[dict[str, Any]]:
        """The pods as the API server would list them (name and IP are what the operator reads)."""
        return [
            {
                "metadata": {"name": f"{name}-{ordinal}"},
                "status": {"phase": "Running", "podIP": pod_ip(ordinal)},
            }
            for ordinal in range(self.pods)
        ]

    def start(self) -> FakeRanks:
        for ordinal in range(self.pods):
            server = http.server.ThreadingHTTPServer((pod_ip(ordinal), self.port), _handler(self))
            server.daemon_threads = True
            serve = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
            serve.start()
            self._servers.append(server)
        return self

    def stop(self) -> None:
        for server in self._servers:
            server.shutdown()
            server.server_close()
        self._servers.clear()

    def metrics(self, ordinal: int) -> bytes:
        """The pod's exposition; every call is a scrape, and the counters grow."""
        with self._lock:
            self.scrapes += 1
            plan = self.plan
            lines: list[str] = []
            first = ordinal * self.ranks_per_pod
            for rank in range(first, first + self.ranks_per_pod):
                lines += self._rank_lines(plan, rank)
        return ("\n".join(lines) + "\n").encode()

    def _rank_lines(self, plan: Plan, rank: int) -> list[str]:
        r = f'rank="{rank}"'
        lines = [
            "# HELP moe_expert_tokens_total Tokens this rank processed for each expert.",
            "# TYPE moe_expert_tokens_total counter",
        ]
        for layer, layer_slots in enumerate(plan.slots):
            replicas = self._replicas(plan)[layer]
            counts = self._counts.setdefault((rank, layer), {})
            for expert in set(layer_slots[rank]):
                share = self.load[layer][expert] / replicas[expert]
                held = layer_slots[rank].count(expert)
                counts[expert] = counts.get(expert, 0.0) + round(share * held)
            lines += [  # a series once exposed stays, as prometheus_client keeps it
                f'moe_expert_tokens_total{{{r},layer="{layer}",expert="{expert}"}} {value}'
                for expert, value in sorted(counts.items())
            ]
        lines += ["# TYPE moe_plan_version gauge", f"moe_plan_version{{{r}}} {plan.version}"]
        lines.append("# TYPE moe_gate_rerouted_total counter")
        lines += [
            f'moe_gate_rerouted_total{{{r},layer="{layer}"}} 0.0'
            for layer in range(plan.num_layers)
        ]
        lines.append("# TYPE moe_step_latency_seconds histogram")
        for bound in ("0.001", "0.01", "0.1", "1.0", "+Inf"):
            lines.append(f'moe_step_latency_seconds_bucket{{{r},le="{bound}"}} {self.scrapes}')
        lines += [
            f"moe_step_latency_seconds_count{{{r}}} {self.scrapes}",
            f"moe_step_latency_seconds_sum{{{r}}} {0.01 * self.scrapes}",
        ]
        return lines

    def _replicas(self, plan: Plan) -> list[dict[int, int]]:
        """Per layer, replicas of each expert under `plan` (kept for the plan being served)."""
        if self._replica_cache[0] != plan.version:
            per_layer: list[dict[int, int]] = []
            for layer_slots in plan.slots:
                replicas: dict[int, int] = {}
                for rank_slots in layer_slots:
                    for expert in rank_slots:
                        replicas[expert] = replicas.get(expert, 0) + 1
                per_layer.append(replicas)
            self._replica_cache = (plan.version, per_layer)
        return self._replica_cache[1]

    def serve_plan(self) -> dict[str, Any]:
        with self._lock:
            return {"version": self.plan.version, "digest": self.plan.digest()}

    def post_plan(self, body: bytes, authorization: str | None) -> tuple[int, dict[str, Any]]:
        if authorization != f"Bearer {self.token}":
            return 401, {"error": "missing or wrong bearer token"}
        try:
            plan = parse_plan(body)
        except PlanError as error:
            return 400, {"error": str(error)}
        with self._lock:
            if plan.version <= self.plan.version:
                return 409, {"applied": False, "reason": "stale", "version": self.plan.version}
            self.plan = plan
            self.posted.append(plan)
        payload = {"applied": True, "version": plan.version, "digest": plan.digest()}
        return 200, {**payload, "pauseSeconds": 0.0}


def _handler(ranks: FakeRanks) -> type[http.server.BaseHTTPRequestHandler]:
    class Handler(http.server.BaseHTTPRequestHandler):
        def _send(self, status: int, body: bytes, kind: str = "application/json") -> None:
            self.send_response(status)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def _ordinal(self) -> int:
            host = self.server.server_address[0]
            _, _, high, low = (int(part) for part in str(host).split("."))
            return high * 256 + low - 1

        def do_GET(self) -> None:
            if self.path == "/metrics" and self._ordinal() in ranks.slow_pods:
                threading.Event().wait(ranks.slow_seconds)
            if self.path == "/metrics":
                self._send(200, ranks.metrics(self._ordinal()), "text/plain; version=0.0.4")
            elif self.path == "/v1/plan" and self._ordinal() == 0:
                if self.headers.get("Authorization") != f"Bearer {ranks.token}":  # as a worker
                    self._send(401, b'{"error": "missing or wrong bearer token"}')
                    return
                self._send(200, json.dumps(ranks.serve_plan()).encode())
            else:
                self._send(404, b"{}")

        def do_POST(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length)
            if self.path != "/v1/plan" or self._ordinal() != 0:
                self._send(404, b"{}")
                return
            status, document = ranks.post_plan(body, self.headers.get("Authorization"))
            self._send(status, json.dumps(document).encode())

        def log_message(self, *_: object) -> None:
            pass

    return Handler
