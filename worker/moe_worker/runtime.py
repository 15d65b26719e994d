"""The rank process: joins the process group, builds its shard, and serves in lock-step.

At every step boundary rank 0 broadcasts one `Control` to all ranks: idle, traffic step, forward
request, new plan, or stop. Every rank therefore runs the same collectives in the same order, and a
plan switch happens at the same step everywhere. HTTP threads never touch the process group: on
the leader they queue a request and wait for the serving loop to answer it.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any, Literal

import torch
import torch.distributed as dist
from prometheus_client import CollectorRegistry

from moe_worker.engine import EPEngine
from moe_worker.metrics import WorkerMetrics
from moe_worker.plan import (
    PLAN_FILE_NAME,
    Plan,
    parse_plan,
    plan_transfers,
    round_robin_plan,
    validate_plan,
)
from moe_worker.settings import WorkerSettings
from moe_worker.traffic import TrafficSource

log = logging.getLogger("moe_worker")

IDLE_TICK = 0.2
"""Longest the leader waits before broadcasting an idle control (keeps collectives alive)."""


@dataclass(frozen=True)
class Control:
    """What every rank does at the next step boundary (broadcast by rank 0)."""

    kind: Literal["idle", "traffic", "forward", "plan", "stop"]
    step: int = 0
    plan_json: str | None = None
    hidden_BTD: torch.Tensor | None = None  # forward requests: the whole batch, split by sequence


@dataclass
class Request:
    """A leader-side request from an HTTP thread, answered by the serving loop."""

    control: Control
    done: threading.Event = field(default_factory=threading.Event)
    result: Any = None


def resolve_device(settings: WorkerSettings) -> tuple[torch.device, str]:
    device = settings.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda":
        torch.cuda.set_device(settings.rank % torch.cuda.device_count())
        device = f"cuda:{torch.cuda.current_device()}"
    backend = settings.backend or ("nccl" if device.startswith("cuda") else "gloo")
    return torch.device(device), backend


def read_initial_plan(settings: WorkerSettings) -> Plan:
    """The mounted plan if there is one, else the seed's round-robin placement."""
    m = settings.model
    if settings.plan_path:
        path = Path(settings.plan_path)
        path = path / PLAN_FILE_NAME if path.is_dir() else path
        if path.is_file():
            plan = parse_plan(path.read_text())
            validate_plan(
                plan, num_layers=m.layers, num_experts=m.experts, world_size=settings.world_size
            )
            return plan
    slots = max(settings.slots_per_rank, -(-m.experts // settings.world_size))
    return round_robin_plan(m.layers, m.experts, settings.world_size, slots)


class Worker:
    """One rank. `run()` is the serving loop; the other public methods are for the HTTP server."""

    def __init__(self, settings: WorkerSettings) -> None:
        self.settings = settings
        self.engine: EPEngine | None = None
        self.metrics = WorkerMetrics(self.expert_counts)
        self.requests: queue.Queue[Request] = queue.Queue()
        self.stopping = threading.Event()
        self.stopped = threading.Event()
        self._ready = False
        self._lock = threading.Lock()  # guards counts reads against the serving thread's updates
        self.traffic = TrafficSource(
            settings.model, settings.traffic, rank=settings.rank, seed=settings.seed
        )

    # ------------------------------------------------------------ read by HTTP threads

    @property
    def is_leader(self) -> bool:
        return self.settings.is_leader

    @property
    def registry(self) -> CollectorRegistry:
        return self.metrics.registry

    def is_ready(self) -> bool:
        return self._ready and not self.stopping.is_set()

    def current_plan(self) -> Plan | None:
        return None if self.engine is None else self.engine.plan

    def expert_counts(self) -> list[list[int]]:
        if self.engine is None:
            m = self.settings.model
            return [[0] * m.experts for _ in range(m.layers)]
        with self._lock:
            return self.engine.counts_LE.tolist()

    def validate(self, plan: Plan) -> None:
        m = self.settings.model
        validate_plan(
            plan, num_layers=m.layers, num_experts=m.experts, world_size=self.settings.world_size
        )

    def submit(self, control: Control, timeout: float) -> Any:
        """Leader only: run `control` at the next step boundary; None if it timed out."""
        request = Request(control)
        self.requests.put(request)
        return request.result if request.done.wait(timeout) else None

    def request_forward(self, hidden: Any, timeout: float) -> list[Any] | None:
        """Leader only: run a [B, T, D] batch (nested lists) through the model; None on timeout."""
        x_BTD = torch.tensor(hidden, dtype=torch.float32)
        if x_BTD.dim() != 3 or x_BTD.shape[-1] != self.settings.model.hidden or x_BTD.shape[1] == 0:
            raise ValueError(
                f"hidden: expected [batch, tokens, {self.settings.model.hidden}] with tokens > 0, "
                f"got {list(x_BTD.shape)}"
            )
        out = self.submit(Control("forward", hidden_BTD=x_BTD), timeout)
        return None if out is None else out.float().tolist()

    def request_plan(self, plan: Plan, timeout: float) -> dict[str, Any] | None:
        """Leader only: switch every rank to a validated `plan`; None on timeout."""
        return self.submit(Control("plan", plan_json=plan.to_json()), timeout)

    # ------------------------------------------------------------ the serving loop

    def run(self) -> None:
        s = self.settings
        device, backend = resolve_device(s)
        log.info(
            "rank %d/%d joining %s group at %s:%d",
            s.rank,
            s.world_size,
            backend,
            s.master_addr,
            s.master_port,
        )
        dist.init_process_group(
            backend,
            init_method=f"tcp://{s.master_addr}:{s.master_port}",
            rank=s.rank,
            world_size=s.world_size,
            timeout=timedelta(minutes=10),
        )
        try:
            # The leader's plan wins: mounted ConfigMaps can lag by a sync period between pods.
            plan_doc = [read_initial_plan(s).to_json() if s.is_leader else None]
            dist.broadcast_object_list(plan_doc, src=0)
            plan = parse_plan(plan_doc[0])
            self.engine = EPEngine(
                s.model, plan, rank=s.rank, device=device, seed=s.seed, checkpoint=s.checkpoint
            )
            dist.barrier()
            self._ready = True
            self.metrics.ready.set(1)
            self.metrics.plan_version.set(plan.version)
            log.info("rank %d ready with plan version %d", s.rank, plan.version)
            self._serve()
        finally:
            self._ready = False
            self.metrics.ready.set(0)
            self.stopped.set()
            dist.destroy_process_group()

    def _serve(self) -> None:
        step = 0
        next_traffic = time.monotonic()
        while True:
            pending: Request | None = None
            box: list[Any] = [None]
            if self.is_leader:
                box[0], pending = self._next_control(step, next_traffic)
            dist.broadcast_object_list(box, src=0)
            control: Control = box[0]
            result = self._handle(control)
            if pending is not None:
                pending.result = result
                pending.done.set()
            if control.kind == "stop" or (self.stopping.is_set() and not self.is_leader):
                return
            if control.kind == "traffic":
                next_traffic = time.monotonic() + self.settings.traffic.interval
            step += 1

    def _next_control(self, step: int, next_traffic: float) -> tuple[Control, Request | None]:
        if self.stopping.is_set():
            return Control("stop", step), None
        wait = IDLE_TICK
        if self.traffic.enabled:
            wait = min(wait, max(0.0, next_traffic - time.monotonic()))
        try:
            request = self.requests.get(timeout=wait)
            c = request.control
            return Control(c.kind, step, c.plan_json, c.hidden_BTD), request
        except queue.Empty:
            pass
        if self.traffic.enabled and time.monotonic() >= next_traffic:
            return Control("traffic", step), None
        return Control("idle", step), None

    def _handle(self, control: Control) -> Any:
        if control.kind == "traffic":
            self._step(self.traffic.batch(control.step), self.traffic.logit_offset_E)
        elif control.kind == "forward":
            assert control.hidden_BTD is not None
            mine = control.hidden_BTD.tensor_split(self.settings.world_size)[self.settings.rank]
            out = self._step(mine, None).cpu()
            gathered: list[Any] = [None] * self.settings.world_size if self.is_leader else []
            dist.gather_object(out, gathered if self.is_leader else None, dst=0)
            return torch.cat(gathered) if self.is_leader else None
        elif control.kind == "plan":
            assert control.plan_json is not None
            return self._switch(parse_plan(control.plan_json))
        return None

    def _step(self, x_BTD: torch.Tensor, offset: torch.Tensor | None) -> torch.Tensor:
        assert self.engine is not None
        start = time.perf_counter()
        with self._lock:
            out = self.engine.forward(x_BTD, offset)
        if out.is_cuda:
            torch.cuda.synchronize()
        self.metrics.step_latency.observe(time.perf_counter() - start)
        self.metrics.tokens.inc(x_BTD.shape[0] * x_BTD.shape[1])
        return out

    def _switch(self, plan: Plan) -> dict[str, Any]:
        assert self.engine is not None
        current = self.engine.plan.version
        if plan.version <= current:  # re-checked here: two POSTs may race past the HTTP check
            return {"applied": False, "reason": "stale", "version": current}
        start = time.perf_counter()
        moved = sum(t.dst == self.settings.rank for t in plan_transfers(self.engine.plan, plan))
        with self._lock:
            self.engine.apply_plan(plan)
        dist.barrier()
        pause = time.perf_counter() - start
        self.metrics.switch_pause.observe(pause)
        self.metrics.last_switch_pause.set(pause)
        self.metrics.experts_moved.inc(moved)
        self.metrics.plan_version.set(plan.version)
        log.info(
            "rank %d switched plan %d -> %d: received %d experts, serving pause %.4f s",
            self.settings.rank,
            current,
            plan.version,
            moved,
            pause,
        )
        return {
            "applied": True,
            "version": plan.version,
            "digest": plan.digest(),
            "pauseSeconds": pause,
        }
