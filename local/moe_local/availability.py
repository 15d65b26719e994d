"""Availability of replica groups behind the router, on the local cluster (issue 23).

One MoEDeployment of 2 groups x 2 ranks (a tiny SeedMLP checkpoint on a hostPath volume, gloo on
CPU) behind its smg router, under a steady load of greedy requests (`load.LoadGenerator`: a seed
per prompt, so an answer is the same whichever group serves it). Events, one after another on
the same deployment: a pod template change (surge: a new group before an old one goes), a kill -9
of one group's leader, scale 2 -> 1, a template change with one group, and scale 1 -> 2. For
each: requests failed, answers that differ from the reference (each prompt answered once before
the events), and the seconds until a new group took traffic (its leader finished a request).

The e2e test (tests/e2e/test_replicas.py) asserts on these figures; hack/measure_availability.py
prints them for docs/api.md ("Availability").
"""

from __future__ import annotations

import json
import os
import signal
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from moe_local.install import checkpoint_source, get_json, kubectl, synthetic_shape, wait_until
from moe_local.kube import service_endpoint
from moe_local.load import Completion, LoadGenerator, complete_once, zipf_prompts

NAME = "avail"
CHECKPOINT = "avail-moe"
RANKS = 2
VOCAB, PROMPT_TOKENS, MAX_TOKENS = 128, 12, 6
LEADER_SELECTOR = "moe-ep.io/role=leader"
ROUTER_PORT = 30000
NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def model() -> dict[str, Any]:
    return {
        "architecture": "SeedMLP",
        "layers": 2,
        "expertsPerLayer": 4,
        "hiddenSize": 32,
        "ffnHiddenSize": 64,
        "attentionHeads": 2,
        "headDim": 16,
        "topK": 2,
        "vocabSize": VOCAB,
        "dtype": "float32",
    }


def write_checkpoint(models: Path) -> Path:
    """Seeded SeedMLP weights of `model()`'s shape as a Hugging Face directory (no download)."""
    from moe_worker.models.checkpoint import write_checkpoint as write
    from moe_worker.models.weights import SyntheticWeights

    shape = synthetic_shape(model())
    path = write(models / CHECKPOINT, SyntheticWeights.for_shape(shape, seed=7, max_context=128))
    write_tokenizer(path)
    return path


def words(vocab_size: int = VOCAB) -> list[str]:
    """A vocabulary of one token per word: [UNK] = 0, </s> = 1, then w2 .. w<vocab_size - 1>."""
    return ["[UNK]", "</s>", *(f"w{i}" for i in range(2, vocab_size))]


def write_tokenizer(path: Path, vocab_size: int = VOCAB) -> None:
    """A word-level tokenizer.json of `words()`: smg 1.13 takes only text prompts (its
    completion request refuses token ids), so a checkpoint served behind it needs one."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    vocab = {word: index for index, word in enumerate(words(vocab_size))}
    tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.decoder = decoders.WordPiece(prefix="##")
    tokenizer.save(str(path / "tokenizer.json"))


def as_text(prompts: list[list[int]], vocab_size: int = VOCAB) -> list[str]:
    """Token-id prompts as the text that tokenizes to them (ids 0 and 1 become 2)."""
    vocabulary = words(vocab_size)
    return [" ".join(vocabulary[max(2, token)] for token in prompt) for prompt in prompts]


def text_prompts(count: int) -> list[str]:
    ids = zipf_prompts(count, vocab_size=VOCAB, length=PROMPT_TOKENS, exponent=1.1, seed=5)
    return as_text(ids)


def deployment(models: Path, name: str = NAME, master_port: int = 29531) -> dict[str, Any]:
    """2 groups x 2 ranks behind the router; the default surge update (1 up, 0 unavailable).
    No rebalancing during the events: the answers stay the reference's."""
    source = checkpoint_source(models, CHECKPOINT)
    return {
        "apiVersion": "moe-ep.io/v1alpha1",
        "kind": "MoEDeployment",
        "metadata": {"name": name},
        "spec": {
            "model": {**model(), "source": source},
            "parallelism": {"expert": RANKS},
            "replicas": 2,
            "placement": {"slotsPerRank": 3},
            # Replace keeps outputs; a threshold no load reaches keeps the first plan anyway.
            "rebalancing": {"method": "Replace", "imbalanceThreshold": 100},
            "router": {"type": "Smg", "policy": "round_robin"},
            "worker": {
                "backend": "gloo",
                "device": "cpu",
                "gpusPerPod": 1,
                "masterPort": master_port,
                "kvCacheTokens": 2048,
                "extraEnv": [{"name": "OMP_NUM_THREADS", "value": "1"}],
            },
        },
    }


@dataclass
class Event:
    """One event's figures."""

    what: str
    requests: int = 0  # answered while it lasted (from the change until settled)
    failed: int = 0
    wrong: int = 0  # answered, but not the reference's tokens
    settled_s: float = 0.0  # from the change until the groups serve as the spec says
    new_group_traffic_s: float | None = None  # until a new group's leader finished a request
    errors: list[str] = field(default_factory=list)

    def row(self) -> str:
        traffic = "-" if self.new_group_traffic_s is None else f"{self.new_group_traffic_s:.1f}"
        return (
            f"| {self.what} | {self.requests} | {self.failed} | {self.wrong} | "
            f"{self.settled_s:.1f} | {traffic} |"
        )


HEADER = (
    "| event | requests | failed | wrong answers | settled (s) | new group takes traffic (s) |\n"
    "|---|---|---|---|---|---|"
)


@dataclass
class Availability:
    """The deployment `name` in `namespace` of a local cluster (`kubeconfig`), and its load."""

    kubeconfig: Path
    client: Any  # kubernetes ApiClient (admin)
    namespace: str
    name: str = NAME
    concurrency: int = 4
    log: Callable[[str], None] = print
    reference: dict[int, tuple[int, ...]] = field(default_factory=dict)
    load: LoadGenerator | None = None

    # -- reading the cluster ------------------------------------------------------------------

    def moed(self) -> dict[str, Any]:
        return get_json(self.kubeconfig, "moed", self.name, "-n", self.namespace) or {}

    def pods(self, selector: str = "") -> list[dict[str, Any]]:
        labels = f"moe-ep.io/deployment={self.name}" + (f",{selector}" if selector else "")
        found = get_json(self.kubeconfig, "pods", "-n", self.namespace, "-l", labels) or {}
        return list(found.get("items") or [])

    def leaders(self) -> dict[str, dict[str, Any]]:
        """Group leaders (pod 0 of each group) by pod name."""
        return {pod["metadata"]["name"]: pod for pod in self.pods(LEADER_SELECTOR)}

    def settled(self, groups: int) -> bool:
        """`groups` groups, all current and serving, and no other worker pod left."""
        moed = self.moed()
        status = moed.get("status") or {}
        if status.get("observedGeneration") != (moed.get("metadata") or {}).get("generation"):
            return False  # the operator has not acted on the spec yet
        seen = status.get("groups") or []
        workers = [p for p in self.pods() if "moe-ep.io/group" in p["metadata"].get("labels", {})]
        return (
            len(seen) == groups
            and all(g.get("phase") == "Serving" and g.get("current") for g in seen)
            and status.get("readyReplicas") == groups
            and len(workers) == groups * RANKS
            and not any(p["metadata"].get("deletionTimestamp") for p in workers)
        )

    def router_url(self) -> str | None:
        """The `-api` Service's endpoint once it is the router's (no kube-proxy locally: go
        where it would route)."""
        found = service_endpoint(self.client, self.namespace, f"{self.name}-api")
        if found is None or found[1] != ROUTER_PORT:
            return None
        return f"http://{found[0]}:{found[1]}/v1"

    @staticmethod
    def finished(pod: dict[str, Any]) -> float:
        """Requests the pod's leader finished (its pod's merged /metrics), 0 if unreadable."""
        ip = (pod.get("status") or {}).get("podIP")
        if not ip:
            return 0.0
        try:
            with NO_PROXY.open(f"http://{ip}:8080/metrics", timeout=2) as response:
                text = response.read().decode()
        except (OSError, urllib.error.URLError):
            return 0.0
        return sum(
            float(line.rsplit(" ", 1)[1])
            for line in text.splitlines()
            if line.startswith("moe_requests_finished")
        )

    # -- the load -------------------------------------------------------------------------------

    def start_load(self, timeout: float = 180) -> None:
        """Wait for 2 serving groups and the router; answer every prompt once (the reference);
        then start the steady load."""
        wait_until(lambda: self.settled(2), timeout, "2 groups serving", interval=1)
        url = wait_until(self.router_url, timeout, "the -api Service on the router", interval=1)
        prompts = text_prompts(32)
        load = LoadGenerator(
            url, CHECKPOINT, prompts, concurrency=self.concurrency, max_tokens=MAX_TOKENS
        )
        for index in range(len(prompts)):
            _, answer = self._reference(url, load.body(index))
            self.reference[index] = tuple(answer["choices"][0]["token_ids"])
        self.load = load.start()
        self.log(f"[avail] reference answered through {url}; load of {self.concurrency} started")

    @staticmethod
    def _reference(url: str, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        def answered() -> tuple[int, dict[str, Any]] | None:
            status, answer = complete_once(url, body)
            return (status, answer) if status == 200 else None

        return wait_until(answered, 60, "the reference answer", interval=1)

    def stop_load(self) -> list[Completion]:
        assert self.load is not None
        return self.load.stop()

    def _window(self, start: float, end: float) -> list[Completion]:
        assert self.load is not None
        with self.load._lock:
            return [done for done in self.load.results if start <= done.ended <= end]

    # -- the events -----------------------------------------------------------------------------

    def measure(
        self,
        what: str,
        change: Callable[[], None],
        groups: int,
        timeout: float = 240,
        done_when: Callable[[], bool] = lambda: True,
    ) -> Event:
        """Apply `change`, wait until `groups` groups serve as the spec says, a new group (if
        any) took traffic and `done_when` holds; the figures of the requests that ended
        meanwhile."""
        before = set(self.leaders())
        started = time.time()
        change()
        traffic_s: float | None = None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            new = [pod for name, pod in self.leaders().items() if name not in before]
            if traffic_s is None and any(self.finished(pod) > 0 for pod in new):
                traffic_s = time.time() - started
            if self.settled(groups) and (traffic_s is not None or not new) and done_when():
                break
            time.sleep(0.5)
        else:
            raise TimeoutError(f"{what}: not settled on {groups} groups in {timeout:.0f}s")
        ended = time.time()
        time.sleep(2)  # requests sent just before it settled end too
        done = self._window(started, ended + 2)
        failed = [d for d in done if not d.ok]
        wrong = [d for d in done if d.ok and d.tokens != self.reference[d.index]]
        event = Event(
            what,
            requests=len(done),
            failed=len(failed),
            wrong=len(wrong),
            settled_s=ended - started,
            new_group_traffic_s=traffic_s,
            errors=sorted({f"{d.status} {d.error[:120]}" for d in failed}),
        )
        self.log(f"[avail] {event.row()} {event.errors[:3]}")
        return event

    def template_change(self, value: str, groups: int = 2) -> Event:
        env = [
            {"name": "OMP_NUM_THREADS", "value": "1"},
            {"name": "AVAIL_TEMPLATE", "value": value},
        ]
        patch = {"spec": {"worker": {"extraEnv": env}}}
        what = "template change" if groups == 2 else f"template change, {groups} group"
        return self.measure(what, lambda: self._patch(patch), groups)

    def kill_leader(self) -> Event:
        """kill -9 of the highest group's leader process; done once that group is replaced."""
        name = sorted(self.leaders())[-1]
        pod = self.leaders()[name]
        statuses = (pod.get("status") or {}).get("containerStatuses") or [{}]
        pid = int(str(statuses[0].get("containerID", "")).removeprefix("local://"))
        uid = pod["metadata"]["uid"]

        def kill() -> None:
            os.kill(pid, signal.SIGKILL)

        def replaced() -> bool:
            return all(p["metadata"]["uid"] != uid for p in self.pods())

        return self.measure(f"kill -9 of a leader ({name})", kill, 2, done_when=replaced)

    def scale(self, replicas: int, previous: int) -> Event:
        def change() -> None:
            kubectl(
                self.kubeconfig, "scale", "moed", self.name, "-n", self.namespace,
                f"--replicas={replicas}",
            )  # fmt: skip

        return self.measure(f"scale {previous} -> {replicas}", change, replicas)

    def _patch(self, patch: dict[str, Any]) -> None:
        kubectl(
            self.kubeconfig, "patch", "moed", self.name, "-n", self.namespace, "--type=merge",
            "-p", json.dumps(patch),
        )  # fmt: skip

    def run_all(self, trial: int = 0) -> list[Event]:
        """Every event in sequence on the one deployment (it ends as it began: 2 groups)."""
        return [
            self.template_change(f"{trial}-a"),
            self.kill_leader(),
            self.scale(1, 2),
            self.template_change(f"{trial}-b", groups=1),  # replicas 1, surge 1: no outage
            self.scale(2, 1),
        ]
