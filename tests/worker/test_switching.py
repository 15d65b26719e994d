"""The non-blocking plan switch: the leader's decisions (flip once every rank's experts landed,
abandon on a failure or at the timeout), and on two gloo ranks serving synthetic SeedMLP: a
failed transfer and a timed-out one leave every rank on the old plan and serving, a later
switch applies; a rank killed mid-transfer leaves its peer on the old plan, stopping so that the
group restarts as a whole. Never half-switched."""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Any

import pytest
from worker_harness import run_world
from worker_serving_cases import Driver, greedy, replace_plan, serve_group

from moe_contract.plan import round_robin_plan
from moe_contract.shape import ModelShape
from moe_contract.switch import BACKGROUND, BLOCKING, TIMEOUT, TRANSFER_FAILED, SwitchAnswer
from moe_worker.serving.generation import GenerationRequest, SamplingParams
from moe_worker.serving.leader import Leader
from moe_worker.serving.scheduler import SchedulerConfig
from moe_worker.serving.step import StepDescriptor, StepResult, SwitchCommand
from moe_worker.serving.traffic import TrafficSource
from moe_worker.settings import TrafficSettings, WorkerSettings
from moe_worker.switch.mover import ExpertMover
from moe_worker.switch.transfer import ExpertTransfer

SHAPE = ModelShape(
    layers=2, experts=4, hidden=32, ffn_hidden=48, heads=4, head_dim=8, kv_heads=2, vocab_size=80
)
SETTINGS = WorkerSettings(
    model=SHAPE, seed=5, kv_cache_tokens=256, max_batch_tokens=8, switch_timeout=20.0
)
PROMPTS = [(3, 4, 5, 6, 7, 8), (9, 10), (11, 12, 13, 14, 15, 16, 17, 18, 19)]


# ------------------------------------------------------------ the leader's decisions


def leader(**options: bool) -> Leader:
    config = SchedulerConfig(world_size=2, kv_cache_tokens=64, max_context=64, vocab_size=80)
    traffic = TrafficSource(TrafficSettings(), vocab_size=80, world_size=2, seed=0)
    return Leader(config, traffic, **options)


def asked(lead: Leader, version: int, timeout: float) -> tuple[threading.Thread, list[Any]]:
    """An HTTP thread asking for a switch; its answer lands in the list."""
    answers: list[Any] = []
    plan = round_robin_plan(2, 4, 2, 2, version=version)
    thread = threading.Thread(target=lambda: answers.append(lead.switch(plan, timeout)))
    thread.start()
    return thread, answers


def step(lead: Leader, number: int, *states: str | None) -> StepDescriptor:
    """The next descriptor, after the ranks answered the previous step with `states`."""
    if states:
        lead.complete([StepResult(switch=s) for s in states])
    return lead.next_step(number, 1, stopping=False)


def late_command() -> SwitchCommand:
    return SwitchCommand.abandon("timeout: experts still moving at the switch timeout")


def test_the_leader_flips_only_once_every_rank_is_done() -> None:
    lead = leader(background_switch=True)
    thread, answers = asked(lead, 2, timeout=30)
    first = step(lead, 0)
    assert first.switch == SwitchCommand.start(
        round_robin_plan(2, 4, 2, 2, version=2), background=True
    )
    assert first.switch.reports and first.gathers
    assert step(lead, 1, "pending", "done").switch == SwitchCommand.poll()
    flip = step(lead, 2, "done", "done")
    assert flip.switch == SwitchCommand.flip(2) and not flip.switch.reports
    applied = SwitchAnswer.switched(round_robin_plan(2, 4, 2, 2, version=2), 0.1, BACKGROUND)
    lead.answer_switch(applied)
    thread.join(5)
    assert answers == [applied]
    assert step(lead, 3).idle


def test_the_leader_abandons_a_failed_or_late_switch() -> None:
    lead = leader(background_switch=True)
    thread, answers = asked(lead, 2, timeout=30)
    step(lead, 0)
    abandon = step(lead, 1, "pending", "failed: RuntimeError: peer gone")
    assert abandon.switch == SwitchCommand.abandon("rank 1: failed: RuntimeError: peer gone")
    lead.answer_switch(SwitchAnswer.refused(TRANSFER_FAILED))
    thread.join(5)
    assert answers[0].reason == "transfer failed"

    thread, answers = asked(lead, 3, timeout=0.05)  # experts still moving at the timeout
    step(lead, 2)
    thread.join(0.2)
    late = step(lead, 3, "done", "pending")
    assert late.switch is not None and late.switch.action == "abandon"
    assert late.switch.reason is not None and late.switch.reason.startswith("timeout")
    lead.answer_switch(SwitchAnswer.refused(TIMEOUT, version=1, error=late.switch.reason))
    thread.join(5)
    assert answers[0].to_document() == {
        "applied": False,
        "reason": "timeout",
        "version": 1,
        "error": "timeout: experts still moving at the switch timeout",
    }


def test_a_blocking_leader_switches_in_one_step_and_two_batches_need_two_tokens() -> None:
    lead = leader(background_switch=False, two_batch=True)
    thread, _ = asked(lead, 2, timeout=30)
    d = step(lead, 0)
    assert d.switch is not None and d.switch.action == "start" and not d.switch.background
    assert not d.switch.reports and d.gathers  # every step that does something is gathered
    lead.answer_switch(
        SwitchAnswer.switched(round_robin_plan(2, 4, 2, 2, version=2), 0.1, BLOCKING)
    )
    thread.join(5)
    request = GenerationRequest("a", (1, 2, 3, 4, 5), SamplingParams(temperature=0, max_tokens=3))
    lead.submit(request, lambda event: None)
    prefill = step(lead, 1)
    assert [c.length for c in prefill.chunks] == [5] and prefill.two_batch
    rank = prefill.chunks[0].rank
    lead.complete([StepResult(tokens=(("a", 7),)) if r == rank else StepResult() for r in (0, 1)])
    decode = step(lead, 2)
    assert [c.length for c in decode.chunks] == [1] and not decode.two_batch  # nothing to split
    for command in (d.switch, SwitchCommand.poll(), SwitchCommand.flip(3), late_command()):
        sent = StepDescriptor(3, switch=command, two_batch=True)
        assert StepDescriptor.from_json(sent.to_json()) == sent


# ------------------------------------------------------------ two real ranks


def lead_through_failures(driver: Driver) -> dict[str, Any]:
    backend = driver.backend
    plan = backend.current_plan()
    assert plan is not None
    results: dict[str, Any] = {
        "before": [o.tokens for o in driver.run([greedy(p, 6) for p in PROMPTS])]
    }
    running = [driver.submit(*greedy(p, 16)) for p in PROMPTS]  # served through the failures
    results["failed"] = backend.switch_plan(replace_plan(plan, 2, SHAPE.experts), 30).to_document()
    timed_out = backend.switch_plan(replace_plan(plan, 3, SHAPE.experts), 1.0)
    results["timed_out"] = timed_out.to_document()
    for outcome in running:
        assert outcome.done.wait(120)
    results["during"] = [(o.tokens, o.finish) for o in running]
    results["version_after_failures"] = backend.current_plan().version  # type: ignore[union-attr]
    results["applied"] = backend.switch_plan(replace_plan(plan, 4, SHAPE.experts), 60).to_document()
    results["after"] = [o.tokens for o in driver.run([greedy(p, 6) for p in PROMPTS])]
    results["alone"] = [driver.run([greedy(p, 16)])[0].tokens for p in PROMPTS]
    return results


def flaky_rank(rank: int, world: int) -> dict[str, Any]:
    """Rank 1 fails to start switch 2 and never posts the messages of switch 3."""
    flipped: list[int] = []
    start, flip = ExpertMover.start, ExpertMover.flip

    def start_switch(self: ExpertMover, plan: Any, group: Any) -> ExpertTransfer:
        if rank == 1 and plan.version == 2:
            raise RuntimeError("injected transfer failure")
        if rank == 1 and plan.version == 3:  # nothing posted: rank 0 waits for its experts
            post, ExpertTransfer.post = ExpertTransfer.post, lambda transfer: None  # type: ignore[method-assign]
            try:
                return start(self, plan, group)
            finally:
                ExpertTransfer.post = post  # type: ignore[method-assign]
        return start(self, plan, group)

    def recorded_flip(
        self: ExpertMover, plan: Any, transfer: ExpertTransfer, record: Any = None
    ) -> int:
        flipped.append(plan.version)
        return flip(self, plan, transfer, record)

    ExpertMover.start = start_switch  # type: ignore[method-assign]  (this forked rank only)
    ExpertMover.flip = recorded_flip  # type: ignore[method-assign]
    results = serve_group(rank, world, SETTINGS, lead_through_failures)
    return {**results, "flipped": flipped}


@pytest.mark.distributed
def test_failed_and_timed_out_switches_leave_every_rank_serving_the_old_plan(
    tmp_path: Path,
) -> None:
    ranks = run_world(flaky_rank, 2, tmp_path, 300)
    leader_result = ranks[0]
    failed, timed_out = leader_result["failed"], leader_result["timed_out"]
    assert (failed["applied"], failed["reason"]) == (False, "transfer failed")
    assert "rank 1" in failed["error"] and "injected transfer failure" in failed["error"]
    assert (timed_out["applied"], timed_out["reason"]) == (False, "timeout")
    assert leader_result["version_after_failures"] == 1
    assert [r["flipped"] for r in ranks] == [[4], [4]]  # only the switch that landed
    assert leader_result["applied"]["applied"] is True
    assert leader_result["applied"]["mode"] == "background"
    assert leader_result["after"] == leader_result["before"]  # Replace preserves outputs
    assert [t for t, _ in leader_result["during"]] == leader_result["alone"]
    assert {f for _, f in leader_result["during"]} == {"length"}


def lead_until_killed(driver: Driver) -> dict[str, Any]:
    backend = driver.backend
    plan = backend.current_plan()
    assert plan is not None
    running = driver.submit(*greedy(PROMPTS[2], 40))
    answer = backend.switch_plan(replace_plan(plan, 2, SHAPE.experts), 60)
    assert running.done.wait(120)
    return {
        "answer": answer.to_document(),
        "version": backend.current_plan().version,  # type: ignore[union-attr]
        "running": running.finish,
    }


def dying_rank(rank: int, world: int) -> dict[str, Any]:
    """Rank 1 dies right after posting its messages of the switch."""
    flipped: list[int] = []
    start, flip = ExpertMover.start, ExpertMover.flip

    def start_switch(self: ExpertMover, plan: Any, group: Any) -> ExpertTransfer:
        transfer = start(self, plan, group)
        if rank == 1:
            os._exit(17)
        return transfer

    def recorded_flip(
        self: ExpertMover, plan: Any, transfer: ExpertTransfer, record: Any = None
    ) -> int:
        flipped.append(plan.version)
        return flip(self, plan, transfer, record)

    ExpertMover.start = start_switch  # type: ignore[method-assign]
    ExpertMover.flip = recorded_flip  # type: ignore[method-assign]
    results = serve_group(rank, world, SETTINGS, lead_until_killed, expect_failure=True)
    return {**results, "flipped": flipped}


@pytest.mark.distributed
def test_a_rank_killed_mid_transfer_never_leaves_a_half_switched_group(tmp_path: Path) -> None:
    survivor, dead = run_world(dying_rank, 2, tmp_path, 300, check=False)
    assert dead == {"error": "no result"}
    assert survivor["flipped"] == [] and survivor["version"] == 1
    assert survivor["answer"]["applied"] is False and survivor["answer"]["reason"] == "group failed"
    assert survivor["running"] == "error"
    assert survivor["failure"] is not None  # its serving loop stopped: the group restarts
