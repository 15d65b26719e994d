"""One rank's serving loop, in lock-step with the group, and the `generation.Backend` it offers the
HTTP layer.

Every step the leader (rank 0) asks its scheduler what to do and broadcasts a `StepDescriptor`
(plain JSON): sequences to release, a plan to switch to, new sequences with their rank, every
rank's chunks, or stop. Each rank then does the same things in the same order: free, switch
(point-to-point expert moves), admit, one forward when any rank has work (zero tokens still join
every all-to-all), sample; the leader gathers every rank's tokens and failures and hands events
to the requests' sinks (`leader.Leader` is that side: scheduler, traffic, plan-switch queue).
With nothing to do the leader still broadcasts an idle step at least every `leader.IDLE_TICK`
seconds, so the group stays alive and a hung peer shows as a stall.

Threads: `run()` owns the process group; HTTP threads only call `submit`, `abort`, `switch_plan`
(which queue work and wake the loop) and read state (`metrics_text`, `current_plan`, `is_live`)
without any lock the loop holds while computing.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from pathlib import Path

import torch
import torch.distributed as dist

from moe_contract.plan import PLAN_FILE_NAME, Plan, PlanError, parse_plan, round_robin_plan
from moe_contract.plan import validate_plan as check_plan
from moe_contract.switch import NOT_READY, STALE, SwitchAnswer
from moe_worker.ep import group
from moe_worker.ep.engine import EPEngine
from moe_worker.ep.runner import ModelRunner
from moe_worker.metrics import WorkerMetrics, exposition
from moe_worker.models.base import DTYPES
from moe_worker.models.kv_cache import KVCache
from moe_worker.models.weights import WeightSource
from moe_worker.runtime.loading import model_card
from moe_worker.serving.generation import EventSink, GenerationRequest, ModelCard, NotReady
from moe_worker.serving.leader import Leader
from moe_worker.serving.scheduler import SchedulerConfig
from moe_worker.serving.step import StepDescriptor, StepResult
from moe_worker.serving.traffic import TrafficSource
from moe_worker.settings import WorkerSettings
from moe_worker.switch.commands import RankSwitch, Switched
from moe_worker.switch.mover import ExpertMover

log = logging.getLogger("moe_worker")

LEADER_READY_STALL_S = 10.0
"""The leader steps at least every `leader.IDLE_TICK` (0.2 s) while the group serves; this long
without a step, a peer hangs or is gone and the group serves nothing: the leader reports not
ready (its pod leaves the `-api` Service) well before liveness (`stall_timeout`) restarts it."""
KV_BLOCK_SIZE = 16


def read_initial_plan(settings: WorkerSettings) -> Plan:
    """The mounted plan if it fits this model, else (with a warning) the round-robin plan."""
    m, world = settings.model, settings.world_size
    if settings.plan_path:
        path = Path(settings.plan_path)
        path = path / PLAN_FILE_NAME if path.is_dir() else path
        if path.is_file():
            try:
                plan = parse_plan(path.read_text())
                check_plan(
                    plan,
                    num_layers=m.layers,
                    num_experts=m.experts,
                    world_size=world,
                    max_slots_per_rank=settings.max_slots_per_rank,
                )
                return plan
            except (PlanError, OSError) as error:
                log.warning(
                    "the mounted plan %s does not fit this model (%s); starting on the "
                    "round-robin plan",
                    path,
                    error,
                )
    slots = max(settings.slots_per_rank, math.ceil(m.experts / world))
    return round_robin_plan(m.layers, m.experts, world, slots)


class Runtime:
    """One rank: `run()` is the serving loop; the other public methods are the Backend."""

    def __init__(
        self, settings: WorkerSettings, source: WeightSource, card: ModelCard | None = None
    ) -> None:
        self.settings, self.source = settings, source
        self._card = card or model_card(source, settings)
        self.engine: EPEngine | None = None
        self.runner: ModelRunner | None = None
        self.switch: RankSwitch | None = None
        self.metrics = WorkerMetrics(self._read_counts, self._read_held, self._read_reroutes)
        self.stopping = threading.Event()
        self.stopped = threading.Event()
        self._ready = False
        self._serving = False
        self._last_progress = time.monotonic()
        self.leader: Leader | None = None
        self._store: dist.Store | None = None  # the rendezvous store, when run() joined a group
        if settings.is_leader:
            s, spec = settings, source.spec
            config = SchedulerConfig(
                world_size=s.world_size,
                kv_cache_tokens=s.kv_cache_tokens,
                max_context=spec.max_context,
                vocab_size=s.model.vocab_size,
                eos_token_ids=spec.eos_token_ids,
                block_size=KV_BLOCK_SIZE,
                max_batch_tokens=s.max_batch_tokens,
                max_queued_requests=s.max_queued_requests,
            )
            traffic = TrafficSource(
                s.traffic, vocab_size=s.model.vocab_size, world_size=s.world_size, seed=s.seed
            )
            leader = self.leader = Leader(
                config,
                traffic,
                count_delivery=self.metrics.count_delivery,
                background_switch=s.background_switch,
                two_batch=s.two_batch_overlap,
            )
            self.metrics.requests_waiting.set_function(lambda: leader.scheduler.waiting)
            self.metrics.requests_running.set_function(lambda: leader.scheduler.running)
        self.metrics.kv_free_tokens.set_function(
            lambda: 0 if self.runner is None else self.runner.cache.free_tokens
        )
        self.metrics.sequences.set_function(
            lambda: 0 if self.runner is None else len(self.runner.sequences)
        )

    # ------------------------------------------------------------ Backend: read by HTTP threads

    @property
    def rank(self) -> int:
        return self.settings.rank

    @property
    def is_leader(self) -> bool:
        return self.settings.is_leader

    @property
    def card(self) -> ModelCard:
        return self._card

    def is_ready(self) -> bool:
        """Every rank: the group formed and loaded its plan. The leader also: the group keeps
        stepping, so a ready leader means the whole group serves."""
        stalled = time.monotonic() - self._last_progress > LEADER_READY_STALL_S
        return self._ready and not self.stopping.is_set() and not (self.is_leader and stalled)

    def is_live(self) -> bool:
        stalled = time.monotonic() - self._last_progress > self.settings.stall_timeout
        return not (self._serving and stalled)

    def metrics_text(self) -> bytes:
        return exposition(self.metrics.registry, self.rank)

    def current_plan(self) -> Plan | None:
        return None if self.engine is None else self.engine.plan

    def validate_plan(self, plan: Plan) -> None:
        """The plan fits the model, the world, the slots per rank this group may grow to, and
        (measured on CUDA) the leader's free memory; PlanError with the reason (HTTP 422)."""
        s, m = self.settings, self.settings.model
        check_plan(
            plan,
            num_layers=m.layers,
            num_experts=m.experts,
            world_size=s.world_size,
            max_slots_per_rank=s.max_slots_per_rank,
        )
        switch = self.switch
        if switch is not None and plan.version > switch.mover.engine.plan.version:
            switch.mover.check_memory(plan)

    def submit(self, request: GenerationRequest, on_event: EventSink) -> None:
        if self.leader is None:
            raise NotReady("only the leader (rank 0) serves requests")
        if not self.is_ready():
            raise NotReady("the worker group is not ready")
        self.leader.submit(request, on_event)

    def abort(self, request_id: str) -> None:
        if self.leader is not None:
            self.leader.abort(request_id)

    def switch_plan(self, plan: Plan, timeout: float) -> SwitchAnswer:
        """Leader: block until every rank serves `plan`; the stale answer if it is not newer."""
        current = self.current_plan()
        if self.leader is None or current is None or not self.is_ready():
            return SwitchAnswer.refused(NOT_READY, version=current and current.version)
        if plan.version <= current.version:
            return SwitchAnswer.refused(STALE, version=current.version)
        return self.leader.switch(plan, timeout)

    def stop(self) -> None:
        self.stopping.set()
        if self.leader is not None:
            self.leader.wake()

    # ------------------------------------------------------------ the serving loop

    def run(self) -> None:
        """Join the group (unless already in one), load this rank's shard, serve until stopped."""
        s = self.settings
        owns_group = not dist.is_initialized()
        if owns_group:
            device, backend = group.resolve_device(s.device, s.backend, s.local_rank)
            self._store = group.join(
                backend,
                s.master_addr,
                s.master_port,
                s.rank,
                s.world_size,
                collective_timeout_s=s.collective_timeout,
                startup_timeout_s=s.startup_timeout,
                listen_address=s.bind_address,
            )
        else:
            device = torch.device(s.device or "cpu")
        try:
            self._load(device)
            self._serve()
        except BaseException as error:
            if self.leader is not None:
                self.leader.fail_all(f"the serving loop failed: {error}")
            raise
        finally:
            self._ready = self._serving = False
            self.metrics.ready.set(0)
            self.stopped.set()
            if owns_group:
                dist.destroy_process_group()

    def _load(self, device: torch.device) -> None:
        s = self.settings
        # The leader's plan wins: mounted ConfigMaps can lag by a sync period between pods.
        plan = parse_plan(
            group.broadcast_text(read_initial_plan(s).to_json() if s.is_leader else None)
        )
        dtype = DTYPES[s.model.dtype]
        self.engine = EPEngine(self.source, plan, rank=s.rank, device=device, dtype=dtype)
        cache = KVCache.for_shape(
            s.model, s.kv_cache_tokens, block_size=KV_BLOCK_SIZE, dtype=dtype, device=device
        )
        self.runner = ModelRunner(self.engine, cache, s.rank)
        self.switch = RankSwitch(
            ExpertMover(self.engine), s.world_size, s.switch_timeout, self._record_switch
        )
        if self._store is not None:  # ranks load at their own pace: wait on the startup clock
            group.wait_for_peers(self._store, "loaded", s.world_size, s.startup_timeout)
        dist.barrier()
        self._ready = self._serving = True
        self._last_progress = time.monotonic()
        self.metrics.ready.set(1)
        self.metrics.plan_version.set(plan.version)
        log.info("rank %d ready with plan version %d", s.rank, plan.version)

    def _serve(self) -> None:
        step = 0
        while True:
            text = None
            if self.leader is not None:
                assert self.engine is not None
                version = self.engine.plan.version
                text = self.leader.next_step(step, version, self.stopping.is_set()).to_json()
            descriptor = StepDescriptor.from_json(group.broadcast_text(text))
            self._last_progress = time.monotonic()
            if descriptor.stop or (self.stopping.is_set() and not self.is_leader):
                return
            if not descriptor.idle:
                self._execute(descriptor)
                self._last_progress = time.monotonic()
            step += 1

    def _execute(self, d: StepDescriptor) -> None:
        assert self.runner is not None and self.switch is not None
        self.runner.release(d.release)
        if d.switch is not None:
            answer = self.switch.step(d.switch)
            if answer is not None and self.leader is not None:
                self.leader.answer_switch(answer)
        errors = self.runner.admit(d.admit)
        result = StepResult(errors=tuple(errors), switch=self.switch.state())
        if d.chunks:
            start = time.perf_counter()
            tokens_before = self.runner.tokens_run
            stepped = self.runner.step(d.chunks, two_batch=d.two_batch)
            result = StepResult(stepped.tokens, result.errors + stepped.errors, result.switch)
            self.metrics.step_latency.observe(time.perf_counter() - start)
            self.metrics.tokens.inc(self.runner.tokens_run - tokens_before)
        if d.gathers:
            texts = group.gather_text(result.to_json())
            if self.leader is not None:
                self.leader.complete([StepResult.from_json(t) for t in texts])

    def _record_switch(self, switched: Switched) -> None:
        self.metrics.switch_pause.observe(switched.pause_s)
        self.metrics.last_switch_pause.set(switched.pause_s)
        self.metrics.experts_moved.inc(switched.moved)
        self.metrics.plan_version.set(switched.plan.version)

    def _read_counts(self) -> list[list[int]] | None:
        engine = self.engine
        return None if engine is None else engine.counts_LE.tolist()

    def _read_reroutes(self) -> tuple[list[int], list[float]] | None:
        engine = self.engine
        return None if engine is None else engine.reroutes()

    def _read_held(self) -> list[set[int]]:
        engine = self.engine
        return [] if engine is None else engine.held_experts()
