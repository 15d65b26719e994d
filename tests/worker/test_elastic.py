"""Issue 22: survivors keep serving. ONE group of four real `moe-worker serve` processes (gloo)
serving a tiny Mixtral saved by transformers takes faults in sequence (the tests run in file
order, each leaving the group as the next expects): kill -9 of a rank under a steady greedy load
and a stream, its replacement rejoining (and a replacement lost while it rejoins), SIGSTOP and
SIGCONT of a rank, a rank lost during a plan switch, two ranks lost in a row, and at last no room
for the orphaned experts: the whole-group fallback, its reason in the termination message.

Every answer is checked against transformers' greedy `generate()` (or, seeded, against the same
request answered before any fault): no request fails, no token is missing or twice."""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch
from hf_tiny import TINY, prompts
from openai_checks import client, token_ids
from worker_harness import Cluster, parse_metric

from moe_contract.plan import Plan
from moe_local.load import complete_once

pytestmark = pytest.mark.distributed

WORLD = 4
NEW = 10
HEARTBEAT_S = 3.0
GREEDY = prompts(5, 9, 3, 12, 7, 4, seed=11)
STREAM = prompts(6, seed=12)[0]
STREAM_TOKENS = 40
SEEDED = prompts(8, 5, seed=13)
MODEL = "elastic-mixtral"


@dataclass
class Model:
    path: Path
    greedy: list[list[int]]
    stream: list[int]


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Model:
    from transformers import MixtralConfig, MixtralForCausalLM

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(3)
        config = MixtralConfig(
            **TINY, intermediate_size=32, num_local_experts=8, num_experts_per_tok=2
        )
        hf = MixtralForCausalLM(config).eval()
        hf.generation_config.eos_token_id = None  # whole generations (requests ignore EOS)
        path = tmp_path_factory.mktemp(MODEL)
        hf.save_pretrained(path)

        def generate(prompt: list[int], new: int) -> list[int]:
            out = hf.generate(torch.tensor([prompt]), max_new_tokens=new, do_sample=False)
            return out[0, len(prompt) :].tolist()

        return Model(path, [generate(p, NEW) for p in GREEDY], generate(STREAM, STREAM_TOKENS))
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def group(tmp_path_factory: pytest.TempPathFactory, model: Model) -> Iterator[Cluster]:
    tmp = Path(tmp_path_factory.mktemp("elastic"))
    for rank in range(WORLD):
        (tmp / f"termination-{rank}").write_text("")
    env = {
        "MOE_CHECKPOINT": str(model.path),
        "MOE_SERVED_MODEL_NAME": MODEL,
        "MOE_SLOTS_PER_RANK": "3",  # 12 slots for 8 experts: 4 of them on two ranks
        "MOE_MAX_SLOTS_PER_RANK": "4",  # room for the orphans of two lost ranks, not three
        "MOE_HEARTBEAT_TIMEOUT": str(HEARTBEAT_S),
        "MOE_KV_CACHE_TOKENS": "1024",
        "MOE_MAX_BATCH_TOKENS": "32",
        "MOE_COLLECTIVE_TIMEOUT": "60",
        "MOE_SWITCH_TIMEOUT": "30",
    }

    def rank_env(rank: int) -> dict[str, str]:
        return {"MOE_TERMINATION_MESSAGE_PATH": str(tmp / f"termination-{rank}")}

    c = Cluster(tmp, WORLD, env, rank_env=rank_env)
    try:
        c.wait_ready(300)
        yield c
    finally:
        for proc in c.procs:  # never leave a stopped process behind
            if proc.poll() is None:
                proc.send_signal(signal.SIGCONT)
        c.stop()


# ---------------------------------------------------------------- clients


def body(prompt: list[int], max_tokens: int, seed: int | None = None) -> dict[str, Any]:
    sampling = {"temperature": 0} if seed is None else {"temperature": 0.9, "seed": seed}
    return {"model": MODEL, "prompt": prompt, "max_tokens": max_tokens, "ignore_eos": True,
            **sampling}  # fmt: skip


def ask(c: Cluster, prompt: list[int], max_tokens: int, seed: int | None = None) -> list[int]:
    code, answer = complete_once(c.api_url, body(prompt, max_tokens, seed), timeout=120)
    assert code == 200, answer
    return list(answer["choices"][0]["token_ids"])


@dataclass
class Load:
    """Clients asking the greedy prompts in turn (and the seeded ones) until stopped."""

    c: Cluster
    seeded: list[list[int]]
    clients: int = 4
    done: list[tuple[str, int, int, Any, float]] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _threads: list[threading.Thread] = field(default_factory=list)

    def __enter__(self) -> Load:
        for n in range(self.clients):
            thread = threading.Thread(target=self._client, args=(n,), daemon=True)
            thread.start()
            self._threads.append(thread)
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(180)

    def _client(self, n: int) -> None:
        turn = n
        while not self._stop.is_set():
            kind, index = ("seeded", turn % 2) if turn % 3 == 2 else ("greedy", turn % len(GREEDY))
            prompt = SEEDED[index] if kind == "seeded" else GREEDY[index]
            seed = 100 + index if kind == "seeded" else None
            try:
                code, answer = complete_once(self.c.api_url, body(prompt, NEW, seed), timeout=120)
            except OSError as error:
                code, answer = 0, {"error": str(error)}
            tokens = answer["choices"][0]["token_ids"] if code == 200 else answer
            self.done.append((kind, index, code, tokens, time.monotonic()))
            turn += self.clients

    def check(self, model: Model, since: float | None = None) -> int:
        """Every answer right (greedy: transformers'; seeded: the undisturbed answer); the
        number of answers completed after `since`."""
        assert self.done, "no request completed"
        for kind, index, code, tokens, _ in self.done:
            assert code == 200, (kind, index, tokens)
            expected = model.greedy[index] if kind == "greedy" else self.seeded[index]
            assert tokens == expected, (kind, index)
        return sum(at > since for *_, at in self.done) if since is not None else len(self.done)

    def first_after(self, moment: float) -> float | None:
        """Seconds from `moment` to the first answer completed after it."""
        later = [at for *_, at in self.done if at > moment]
        return min(later) - moment if later else None


class Stream:
    """One streamed greedy completion (the official client), its chunks' tokens as they came."""

    def __init__(self, c: Cluster) -> None:
        self.tokens: list[int] = []
        self.error: BaseException | None = None
        self.first = threading.Event()
        self.thread = threading.Thread(target=self._run, args=(c,), daemon=True)
        self.thread.start()

    def _run(self, c: Cluster) -> None:
        try:
            stream = client(c.api_url.removesuffix("/v1")).completions.create(
                model=MODEL, prompt=STREAM, max_tokens=STREAM_TOKENS, temperature=0,
                stream=True, extra_body={"ignore_eos": True},
            )  # fmt: skip
            for chunk in stream:
                if chunk.choices:
                    self.tokens += token_ids(chunk.choices[0])
                    self.first.set()
        except BaseException as error:
            self.error = error
            self.first.set()

    def result(self) -> list[int]:
        self.thread.join(180)
        assert self.error is None, self.error
        return self.tokens


# ---------------------------------------------------------------- the group


def group_status(c: Cluster, rank: int = 0) -> dict[str, Any]:
    code, status = c.request(rank, "/v1/group")
    assert code == 200, status
    return dict(status)


def wait_for(what: str, predicate: Callable[[], Any], timeout: float) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            value = predicate()
        except OSError:
            value = None
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"{what}: not within {timeout:.0f} s")


def serving(c: Cluster, live: list[int], state: str) -> Callable[[], dict[str, Any] | None]:
    def check() -> dict[str, Any] | None:
        status = group_status(c)
        return status if status["liveRanks"] == live and status["state"] == state else None

    return check


def pids(c: Cluster, ranks: list[int]) -> dict[int, int]:
    """Each rank's process id, as its own /healthz says (the process alive and serving)."""
    out = {}
    for rank in ranks:
        code, answer = c.request(rank, "/healthz")
        assert code == 200 and answer["pid"] == c.procs[rank].pid, answer
        out[rank] = answer["pid"]
    return out


def metric(c: Cluster, rank: int, name: str) -> float:
    code, text = c.request(rank, "/metrics")
    assert code == 200
    values = parse_metric(text, name)
    assert values, f"{name} missing"
    return sum(values.values())


# ---------------------------------------------------------------- the faults, in order


@pytest.fixture(scope="module")
def seeded(group: Cluster) -> list[list[int]]:
    """The seeded prompts' answers before any fault (sampling is keyed by seed and index)."""
    return [ask(group, prompt, NEW, seed=100 + i) for i, prompt in enumerate(SEEDED)]


def test_kill_9_of_a_rank_under_load_loses_no_request(
    group: Cluster, model: Model, seeded: list[list[int]]
) -> None:
    c = group
    assert [ask(c, p, NEW) for p in GREEDY] == model.greedy
    survivors = pids(c, [0, 1, 2])
    digest = c.request(0, "/v1/plan", token=c.token)[1]["digest"]
    with Load(c, seeded) as load:
        wait_for("answers under load", lambda: len(load.done) >= 4, 60)
        stream = Stream(c)
        assert stream.first.wait(60)
        killed = time.monotonic()
        os.kill(c.procs[3].pid, signal.SIGKILL)
        status = wait_for("the survivors serve", serving(c, [0, 1, 2], "Degraded"), 60)
        wait_for("answers after the loss", lambda: load.check(model, killed) >= 6, 90)
    resumed_s = load.first_after(killed)
    print(f"\n[elastic] kill -9: serving again {resumed_s:.2f} s after, {len(load.done)} answers")
    load.check(model)  # not one failed, every token right
    assert stream.result() == model.stream  # the stream crossed the loss: none twice or missing
    assert status["epoch"] >= 1 and status["lostRanks"] == [3], status
    assert pids(c, [0, 1, 2]) == survivors  # no survivor restarted
    assert c.procs[3].poll() == -signal.SIGKILL
    assert (
        c.request(0, "/v1/plan", token=c.token)[1]["digest"] == digest
    )  # the operator's plan, still
    assert metric(c, 0, "moe_group_live_ranks") == 3
    assert metric(c, 1, "moe_group_epoch") == status["epoch"]
    assert metric(c, 0, "moe_requests_resumed_total") == group_status(c)["resumedRequests"]


def test_a_replacement_rejoins_and_the_plan_returns_to_its_full_layout(
    group: Cluster, model: Model, seeded: list[list[int]]
) -> None:
    c = group
    # A replacement lost while it rejoins (its experts on their way) leaves the others serving.
    epoch = group_status(c)["epoch"]
    c.restart(3)
    wait_for("rank 3 let in", lambda: 3 in group_status(c)["liveRanks"], 120)
    os.kill(c.procs[3].pid, signal.SIGKILL)
    wait_for("the survivors serve again", serving(c, [0, 1, 2], "Degraded"), 60)
    assert group_status(c)["epoch"] >= epoch + 2
    c.procs[3].wait(30)
    c.restart(3)
    status = wait_for("rank 3 back, experts and all", serving(c, [0, 1, 2, 3], "Serving"), 120)
    assert group_status(c, 3)["epoch"] == status["epoch"]
    held = parse_metric(c.request(3, "/metrics")[1], "moe_expert_tokens_total")
    assert len(held) >= 3  # it holds its experts of the full layout again
    with Load(c, seeded) as load:
        wait_for("answers", lambda: len(load.done) >= 8, 60)
    load.check(model)


def test_a_stopped_rank_is_dropped_and_after_sigcont_cannot_rejoin_the_old_epoch(
    group: Cluster, model: Model, seeded: list[list[int]]
) -> None:
    c = group
    stopped = c.procs[2]
    with Load(c, seeded) as load:
        wait_for("answers under load", lambda: len(load.done) >= 4, 60)
        stopped_at = time.monotonic()
        os.kill(stopped.pid, signal.SIGSTOP)
        status = wait_for("rank 2 dropped", serving(c, [0, 1, 3], "Degraded"), 60)
        wait_for("answers after the drop", lambda: load.check(model, stopped_at) >= 6, 90)
    hang_s = load.first_after(stopped_at)
    print(f"\n[elastic] SIGSTOP: serving again {hang_s:.2f} s after (heartbeat {HEARTBEAT_S} s)")
    load.check(model)
    # Continued, the dropped process finds itself in no epoch and leaves: it never serves in
    # the old one (its peers moved on) nor slips into the new one.
    stopped.send_signal(signal.SIGCONT)
    assert stopped.wait(60) == 1
    assert f"rank 2 is not in epoch {status['epoch']}" in c.logs(2)
    assert group_status(c)["liveRanks"] == [0, 1, 3]
    c.restart(2)
    wait_for("rank 2 back", serving(c, [0, 1, 2, 3], "Serving"), 120)


def test_a_rank_lost_during_a_plan_switch_leaves_the_old_plan_then_the_plan_applies(
    group: Cluster, model: Model, seeded: list[list[int]]
) -> None:
    c = group
    old = c.request(0, "/v1/plan", token=c.token)[1]
    new = rotated(Plan.model_validate({k: v for k, v in old.items() if k != "digest"}))
    answers: list[tuple[int, Any]] = []
    os.kill(c.procs[1].pid, signal.SIGSTOP)  # stopped as the switch starts: it never lands
    post = threading.Thread(
        target=lambda: answers.append(c.request(0, "/v1/plan", new.to_document(), c.token))
    )
    post.start()
    post.join(120)
    os.kill(c.procs[1].pid, signal.SIGKILL)
    code, answer = answers[0]
    assert code == 503 and answer["reason"] == "transfer failed", answer
    assert "rank 1 was lost" in answer["error"], answer
    wait_for("the others serve", serving(c, [0, 2, 3], "Degraded"), 60)
    assert (
        c.request(0, "/v1/plan", token=c.token)[1]["version"] == old["version"]
    )  # the old plan serves
    assert [ask(c, p, NEW) for p in GREEDY] == model.greedy
    # Sent again, the plan applies on the ranks in the group, and on all once rank 1 is back.
    code, answer = c.request(0, "/v1/plan", new.to_document(), c.token)
    assert code == 200 and answer["version"] == new.version, answer
    c.procs[1].wait(30)
    c.restart(1)
    wait_for("rank 1 back", serving(c, [0, 1, 2, 3], "Serving"), 120)
    assert c.request(1, "/v1/plan", token=c.token)[1]["digest"] == new.digest()
    assert [ask(c, p, NEW) for p in GREEDY] == model.greedy


def rotated(plan: Plan) -> Plan:
    """The plan's slots moved one rank on (every expert travels), one version up."""
    slots = tuple(layer[-1:] + layer[:-1] for layer in plan.slots)
    return plan.model_copy(update={"slots": slots, "version": plan.version + 1})


def test_two_ranks_lost_in_a_row_end_serving(
    group: Cluster, model: Model, seeded: list[list[int]]
) -> None:
    c = group
    with Load(c, seeded) as load:
        wait_for("answers under load", lambda: len(load.done) >= 4, 60)
        killed = time.monotonic()
        os.kill(c.procs[3].pid, signal.SIGKILL)
        time.sleep(0.3)
        os.kill(c.procs[2].pid, signal.SIGKILL)
        wait_for("two survivors serve", serving(c, [0, 1], "Degraded"), 90)
        wait_for("answers after both losses", lambda: load.check(model, killed) >= 6, 90)
    load.check(model)


def test_no_room_for_the_orphans_restarts_the_group_whole_with_the_reason(
    group: Cluster,
) -> None:
    """Rank 0 alone cannot hold 8 experts in 4 slots: the leader stops the group (the operator
    then replaces it whole), saying why in its termination message."""
    c = group
    os.kill(c.procs[1].pid, signal.SIGKILL)
    assert c.procs[0].wait(90) == 1
    message = (c.tmp / "termination-0").read_text()
    assert message.startswith("rank 0: no room for the experts of ranks [1]"), message
    assert "no slot to spare" in message and "maxSlotsPerRank" in message, message
