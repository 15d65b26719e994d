"""Issue 22 in one process: a step the group did not finish is undone and run again, the requests
of a lost rank resume on another from prompt + generated tokens (one re-prefill) with the same
tokens as an undisturbed run, the leader's verdict on its members' heartbeats, membership
records, the group's answers over HTTP. The real-process faults are in test_elastic.py."""

from __future__ import annotations

import json
import threading
from typing import Any

import pytest
import torch
from api_double import ScriptedBackend
from fastapi.testclient import TestClient
from test_scheduler import Group, config, request

from moe_contract.group import GroupStatus
from moe_contract.plan import round_robin_plan
from moe_contract.shape import ModelShape
from moe_contract.switch import BACKGROUND, SwitchAnswer
from moe_worker.api.control import create_control_app
from moe_worker.ep.engine import EPEngine
from moe_worker.ep.runner import ModelRunner
from moe_worker.models.kv_cache import KVCache
from moe_worker.models.weights import SyntheticWeights
from moe_worker.serving.generation import ModelCard, SamplingParams
from moe_worker.serving.leader import Leader
from moe_worker.serving.membership import BEAT_S, EpochRecord, Liveness, Member
from moe_worker.serving.regroup import Regroup
from moe_worker.serving.scheduler import Scheduler
from moe_worker.serving.step import Chunk, NewSequence
from moe_worker.serving.traffic import TrafficSource
from moe_worker.settings import TrafficSettings

# ---------------------------------------------------------------- the scheduler


def test_a_lost_ranks_requests_resume_first_on_a_live_rank_with_their_tokens() -> None:
    group = Group(Scheduler(config(world_size=2)), token=lambda rid, i: 20 + i)
    group.submit(request("a", 3, 6))
    group.submit(request("b", 3, 6))
    for _ in range(3):  # prefill, then two decodes: 3 tokens each
        group.step()
    ranks = {rid: s.rank for rid, s in group.scheduler._running.items()}
    lost = ranks["b"]
    assert group.scheduler.lose([lost]) == ["b"] and group.scheduler.resumed_total == 1
    group.ranks[lost] = type(group.ranks[lost])(4, 16)  # the rank's cache went with it
    group.cached.pop("b")
    resumed = group.step()
    (new,) = resumed.admit
    assert (new.request_id, new.rank, new.generated) == ("b", 1 - lost, (20, 21, 22))
    (prefill,) = [c for c in resumed.chunks if c.request_id == "b"]
    # One re-prefill of prompt + the 3 tokens, ending in a sample: token index 3 comes next.
    assert (prefill.start, prefill.length, prefill.sample) == (0, 6, True)
    group.run()
    assert group.tokens("b") == [20, 21, 22, 23, 24, 25]  # none twice, none missing
    assert group.tokens("a") == [20, 21, 22, 23, 24, 25]
    assert all(e.finish_reason in (None, "length") for e in group.events["b"])


def test_no_sequence_goes_to_a_lost_rank_until_it_is_welcomed_back() -> None:
    scheduler = Scheduler(config(world_size=2))
    scheduler.lose([1])
    group = Group(scheduler)
    for rid in "abc":
        group.submit(request(rid, 2, 2))
    assert {n.rank for n in group.step().admit} == {0}
    scheduler.welcome([1])
    group.submit(request("d", 2, 2))
    group.run()
    assert set(group.events) == set("abcd")


def test_a_step_the_group_did_not_finish_is_scheduled_again() -> None:
    scheduler = Scheduler(config(world_size=1, max_batch_tokens=4))
    group = Group(scheduler, token=lambda rid, i: 30 + i)
    group.submit(request("long", 10, 2))
    first = scheduler.schedule()  # admitted, first chunk of 4: the group never finishes it
    assert [(c.start, c.length) for c in first.chunks] == [(0, 4)]
    scheduler.rewind()
    again = scheduler.schedule()
    assert [n.request_id for n in again.admit] == ["long"]  # admitted again
    assert [(c.start, c.length) for c in again.chunks] == [(0, 4)]
    scheduler.rewind()
    group.run()  # the simulated ranks never saw the undone steps
    assert group.tokens("long") == [30, 31]


# ---------------------------------------------------------------- a rank's runner

SHAPE = ModelShape(
    layers=2, experts=4, hidden=16, ffn_hidden=32, heads=2, head_dim=8, top_k=2, vocab_size=64
)


def runner() -> ModelRunner:
    torch.manual_seed(0)
    source = SyntheticWeights.for_shape(SHAPE, seed=4)
    engine = EPEngine(source, round_robin_plan(2, 4, 1, 4), rank=0)
    return ModelRunner(engine, KVCache.for_shape(SHAPE, 256, block_size=16), 0)


def new(rid: str, prompt: tuple[int, ...], generated: tuple[int, ...] = ()) -> NewSequence:
    sampling = SamplingParams(temperature=0.9, max_tokens=8)
    return NewSequence(rid, 0, prompt, sampling, 7, 64, generated)


def run(r: ModelRunner, rid: str, start: int, length: int) -> int:
    (token,) = r.step([Chunk(rid, 0, start, length, True)]).tokens
    return token[1]


def test_a_resumed_sequence_samples_what_an_undisturbed_one_would() -> None:
    """Seeded sampling is keyed by seed and token index: prefilling prompt + 3 tokens and
    sampling gives the 4th token of the undisturbed run, then the 5th."""
    prompt = (3, 9, 27, 17, 5)
    whole = runner()
    whole.admit([new("x", prompt)])
    tokens = [run(whole, "x", 0, len(prompt))]
    for i in range(4):
        tokens.append(run(whole, "x", len(prompt) + i, 1))
    resumed = runner()
    resumed.admit([new("x", prompt, tuple(tokens[:3]))])
    assert run(resumed, "x", 0, len(prompt) + 3) == tokens[3]
    assert run(resumed, "x", len(prompt) + 3, 1) == tokens[4]


def test_rewind_undoes_the_step_begun_and_the_same_step_runs_again() -> None:
    prompt = (3, 9, 27, 17, 5)
    r = runner()
    r.begin_step(0)
    r.admit([new("x", prompt)])
    first = run(r, "x", 0, len(prompt))
    r.begin_step(1)
    r.admit([new("y", (1, 2))])
    run(r, "x", len(prompt), 1)  # the group never finished this step
    assert r.last_step == 1
    r.rewind()
    assert "y" not in r.sequences and r.cache.length("x") == len(prompt)
    assert r.sequences["x"].generated == [first]
    again = runner()
    again.admit([new("x", prompt)])
    run(again, "x", 0, len(prompt))
    assert run(r, "x", len(prompt), 1) == run(again, "x", len(prompt), 1)


# ---------------------------------------------------------------- the leader


def leader() -> Leader:
    traffic = TrafficSource(TrafficSettings(), vocab_size=64, world_size=2, seed=0)
    return Leader(config(world_size=2), traffic, background_switch=True)


def test_a_regroup_answers_the_switch_in_flight_and_resumes_the_lost_requests() -> None:
    lead = leader()
    answers: list[SwitchAnswer] = []
    asking = threading.Thread(
        target=lambda: answers.append(lead.switch(round_robin_plan(2, 4, 2, 2, version=2), 30))
    )
    asking.start()
    lead.submit(request("r", 2, 4), lambda event: None)
    step = lead.next_step(0, 1, False)
    assert step.switch is not None and step.switch.action == "start"
    resumed = lead.regroup([step.admit[0].rank], [], "rank 1 was lost during the switch")
    asking.join(5)
    assert answers and answers[0].reason == "transfer failed" and "rank 1" in answers[0].error
    assert resumed == [] and not lead.switching  # admitted in the undone step: waits again
    again = lead.next_step(0, 1, False)
    assert [n.request_id for n in again.admit] == ["r"] and again.switch is None


def test_a_rank_back_gets_its_experts_by_an_internal_switch_of_the_same_version() -> None:
    lead = leader()
    record = round_robin_plan(2, 4, 2, 2, version=5)
    layout = record.model_copy(update={"absent_ranks": (1,)})
    lead.grow(record, record, timeout=30)
    start = lead.next_step(0, 5, False).switch
    assert start is not None and start.action == "start" and start.serve == record
    assert start.plan == record and lead.switching
    lead.complete([])
    lead.answer_switch(SwitchAnswer.switched(record, 0.01, BACKGROUND))
    assert not lead.switching and layout.version == record.version


# ---------------------------------------------------------------- membership


def test_the_leaders_verdict_comes_from_heartbeats_never_from_a_slow_collective() -> None:
    live = Liveness(hang_s=5.0, suspect_s=1.5)
    live.begin([1, 2, 3], now=0.0)
    for t in range(1, 40):  # ranks 1 and 2 beat; rank 3 stops at t = 1 s
        now = t * BEAT_S
        live.beat(1, t, now)
        live.beat(2, t, now)
        live.beat(3, min(t, 5), now)
    assert live.lost(39 * BEAT_S) == {3: "no heartbeat for 6.8 s (stopped or hung)"}
    fast = Liveness(hang_s=5.0, suspect_s=1.5)
    fast.begin([1, 2], now=0.0)
    fast.beat(1, 1, 0.2)
    fast.beat(2, 1, 0.2)
    fast.beat(1, 2, 1.9)
    assert fast.lost(1.9) == {}  # silent 1.7 s, nothing failed: alive (a long step)
    fast.suspect(1.9)  # a collective failed: now 1.5 s of silence is enough
    assert list(fast.lost(1.9)) == [2]
    assert not fast.suspicion_cleared(1.9)
    healthy = Liveness(hang_s=5.0)
    healthy.begin([1], now=0.0)
    healthy.suspect(0.0)
    healthy.beat(1, 9, 1.6)
    assert healthy.lost(1.7) == {} and healthy.suspicion_cleared(1.8)  # re-form as it is
    told = Liveness(hang_s=5.0)
    told.begin([1], now=0.0)
    told.report(1, "pod m-1 deleted")
    told.report(7, "not a member")
    assert told.lost(0.1) == {1: "pod m-1 deleted"}


def test_epoch_records_drop_the_lost_and_let_the_new_incarnations_in() -> None:
    first = EpochRecord(0, tuple(Member(r, f"p{r}") for r in range(4)))
    second = first.next([3], [], "rank 3 lost")
    assert second.ranks == (0, 1, 2) and second.lost == (3,) and second.epoch == 1
    third = second.next([], [Member(3, "q3")], "rank 3 joined")
    assert third.ranks == (0, 1, 2, 3) and third.joined == (3,)
    assert third.holds(3, "q3") and not third.holds(3, "p3")  # the old process is out
    assert EpochRecord.from_json(third.to_json()) == third


def test_the_regroup_message_round_trips() -> None:
    plan = round_robin_plan(2, 4, 2, 2, version=3)
    layout = plan.model_copy(update={"absent_ranks": (1,), "slots": ((), ())})
    message = Regroup(4, 17, plan, plan, None, (1,), ())
    assert Regroup.from_json(message.to_json()) == message
    assert json.loads(message.to_json())["committed"] == 17 and layout.absent == {1}


# ---------------------------------------------------------------- HTTP


@pytest.fixture
def backend() -> ScriptedBackend:
    return ScriptedBackend(ModelCard("m", SHAPE, 64))


def control(backend: ScriptedBackend, tmp: Any) -> TestClient:
    token = tmp / "token"
    token.write_text("t0k\n")
    return TestClient(create_control_app(backend, token_path=str(token)))


def test_the_group_is_answered_and_lost_ranks_are_taken(
    backend: ScriptedBackend, tmp_path: Any
) -> None:
    app = control(backend, tmp_path)
    assert app.get("/v1/group").status_code == 404  # no membership of its own
    lost = {"ranks": [3], "reason": "pod m-3 deleted"}
    auth = {"Authorization": "Bearer t0k"}
    assert app.post("/v1/group/lost", json=lost, headers=auth).status_code == 409
    backend.group = GroupStatus(epoch=2, world=4, live=(0, 1, 2), state="Degraded")
    answer = app.get("/v1/group").json()
    assert answer["lostRanks"] == [3] and answer["epoch"] == 2 and answer["state"] == "Degraded"
    assert GroupStatus.from_document(answer) == backend.group
    assert app.post("/v1/group/lost", json=lost).status_code == 401
    assert app.post("/v1/group/lost", json={"ranks": [0]}, headers=auth).status_code == 400
    assert app.post("/v1/group/lost", content=b"{", headers=auth).status_code == 400
    reply = app.post("/v1/group/lost", json=lost, headers=auth)
    assert reply.status_code == 202 and backend.lost_reports == [([3], "pod m-3 deleted")]
