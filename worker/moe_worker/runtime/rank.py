"""One rank, wired together: its state, metrics and (on rank 0) the leader, the Backend the HTTP
layer sees (`backend`), and `run()`: join the group, load this rank's shard, serve until stopped.

    initial_plan  the plan the group starts on (the mounted one if it fits, else round-robin)
    joining       joining the process group and loading the shard
    loop          the lock-step serving loop
    backend       the `generation.Backend` of the rank (HTTP threads)
    state         what the loop writes and the HTTP threads read: readiness and liveness
    loading       the weight source from the settings (checkpoint or synthetic) and the model card

Threads: `run()` owns the process group; HTTP threads only call the backend, which queues work
for the loop and reads the state without any lock the loop holds while computing.
"""

from __future__ import annotations

import logging
import threading
import time

from moe_worker.metrics import WorkerMetrics
from moe_worker.models import ModelSpec
from moe_worker.models.weights import WeightSource
from moe_worker.runtime.backend import RankBackend
from moe_worker.runtime.joining import KV_BLOCK_SIZE, joined_group, load_rank
from moe_worker.runtime.loading import model_card
from moe_worker.runtime.loop import ServingLoop
from moe_worker.runtime.membership import Membership
from moe_worker.runtime.state import GroupView, RankState
from moe_worker.serving.generation import ModelCard
from moe_worker.serving.leader import Leader
from moe_worker.serving.scheduler import SchedulerConfig
from moe_worker.serving.traffic import TrafficSource
from moe_worker.settings import WorkerSettings
from moe_worker.switch.commands import Switched

log = logging.getLogger("moe_worker")

DRAIN_POLL_S = 0.05


class Runtime:
    def __init__(
        self, settings: WorkerSettings, source: WeightSource, card: ModelCard | None = None
    ) -> None:
        self.settings, self.source = settings, source
        self.state = RankState()
        self.metrics = _rank_metrics(self.state)
        self.leader = _leader(settings, source.spec, self.metrics) if settings.is_leader else None
        card = card or model_card(source, settings)
        self.backend = RankBackend(settings, card, self.state, self.leader, self.metrics)
        self.backend.on_drain = lambda: self.drain(then_stop=False)
        self._stop_after_drain = False
        self.membership: Membership | None = None
        self.backend.report_lost = self._report_lost
        self.state.on_group_change = self._group_changed

    def stop(self) -> None:
        self.state.stopping.set()
        if self.leader is not None:
            self.leader.wake()

    def drain(self, *, then_stop: bool) -> None:
        """Not ready (/readyz, /health 503), nothing new admitted (503), no more built-in
        traffic; running sequences go on. `then_stop` (SIGTERM): stop once they finished (a
        rank other than the leader: once the leader stopped the group), or after
        `drain_timeout` whatever runs; else (POST /v1/drain) the rank drains and serves on."""
        self.state.draining.set()
        if self.leader is not None:
            self.leader.draining = True
            self.leader.wake()
        if then_stop and not self._stop_after_drain:
            self._stop_after_drain = True
            threading.Thread(target=self._stop_when_drained, name="moe-drain", daemon=True).start()

    def _stop_when_drained(self) -> None:
        state, leader = self.state, self.leader
        deadline = time.monotonic() + self.settings.drain_timeout
        while time.monotonic() < deadline and state.serving and not state.stopped.is_set():
            if leader is not None and leader.idle:
                break
            state.stopped.wait(DRAIN_POLL_S)
        if leader is not None and not leader.idle:
            log.warning(
                "drain: %d requests still running after %g s; stopping them",
                leader.in_flight,
                self.settings.drain_timeout,
            )
        self.stop()

    def run(self) -> None:
        """Join the group (unless already in one), load this rank's shard, serve until stopped."""
        s, state = self.settings, self.state
        with joined_group(s) as joined:
            try:
                engine, runner, switch = load_rank(
                    s, self.source, joined, state, self._record_switch
                )
                self.membership = joined.membership
                loop = ServingLoop(
                    engine, runner, switch, self.leader, state, self.metrics, joined.membership,
                    max_slots_per_rank=s.max_slots_per_rank, switch_timeout=s.switch_timeout,
                )  # fmt: skip
                state.serving = True
                state.stepped()
                self.metrics.ready.set(1)
                self.metrics.plan_version.set(engine.plan.version)
                log.info("rank %d ready with plan version %d", s.rank, engine.plan.version)
                loop.run(joining=joined.joining)
            except BaseException as error:
                if self.leader is not None:
                    self.leader.fail_all(f"the serving loop failed: {error}")
                raise
            finally:
                state.serving = False
                self.metrics.ready.set(0)
                state.stopped.set()

    def _report_lost(self, ranks: list[int], why: str) -> bool:
        """The operator says these ranks are gone (their pods deleted or failed); False: this
        group has no membership of its own (it cannot take the news)."""
        if self.membership is None:
            return False
        self.membership.report_lost(ranks, why)
        return True

    def _group_changed(self, view: GroupView) -> None:
        self.metrics.group_epoch.set(view.epoch)
        self.metrics.group_live_ranks.set(len(view.members))

    def _record_switch(self, switched: Switched) -> None:
        self.metrics.switch_pause.observe(switched.pause_s)
        self.metrics.last_switch_pause.set(switched.pause_s)
        self.metrics.experts_moved.inc(switched.moved)
        self.metrics.plan_version.set(switched.plan.version)
        if self.state.engine is not None:
            self.state.holders_changed(self.state.engine)


def _rank_metrics(state: RankState) -> WorkerMetrics:
    """The rank's metrics, reading the engine's counters and the KV cache at scrape time."""

    def counts() -> list[list[int]] | None:
        engine = state.engine
        return None if engine is None else engine.counts_LE.tolist()

    def held() -> list[set[int]]:
        engine = state.engine
        return [] if engine is None else engine.held_experts()

    def reroutes() -> tuple[list[int], list[float]] | None:
        engine = state.engine
        return None if engine is None else engine.reroutes()

    metrics = WorkerMetrics(counts, held, reroutes)
    metrics.kv_free_tokens.set_function(
        lambda: 0 if state.runner is None else state.runner.cache.free_tokens
    )
    metrics.sequences.set_function(
        lambda: 0 if state.runner is None else len(state.runner.sequences)
    )
    return metrics


def _leader(settings: WorkerSettings, spec: ModelSpec, metrics: WorkerMetrics) -> Leader:
    """Rank 0's side of the loop: the scheduler over every rank's KV budget, built-in traffic."""
    s = settings
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
    leader = Leader(
        config,
        traffic,
        count_delivery=metrics.count_delivery,
        background_switch=s.background_switch,
        two_batch=s.two_batch_overlap,
    )
    metrics.requests_waiting.set_function(lambda: leader.scheduler.waiting)
    metrics.requests_running.set_function(lambda: leader.scheduler.running)
    return leader
