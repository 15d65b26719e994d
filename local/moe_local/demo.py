"""`moe-ep demo`: the whole loop on one machine, with a live table, then a summary.

Brings the local cluster up (real control plane, node agent, Prometheus with the project's rules),
installs the operator with the Helm chart, writes a small SeedMLP checkpoint into a host
directory and applies a MoEDeployment of CPU workers serving it from a hostPath volume. Then it
sends real `/v1/completions` requests through the deployment's `-api` Service, which leads to its
router, smg (bounded concurrency; text prompts whose tokens are drawn from a Zipf law, so popular
tokens give their experts more work and the imbalance comes from the data) and follows it:
workers ready, requests/s, generated tokens/s and median latency, per-layer imbalance, the
`MoEExpertLoadImbalance` alert, the rebalance, and the same figures after it. At last it kills
one worker rank under the load (`demo_loss`): the survivors serve on without it, it comes back
and rejoins.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from moe_local import availability, install
from moe_local.cluster import LocalCluster, LocalClusterConfig, default_workdir
from moe_local.demo_loss import LossFigures, lose_a_rank
from moe_local.kube import service_endpoint
from moe_local.load import Completion, Figures, LoadGenerator, zipf_prompts

NAMESPACE = "demo"
NAME = "demo"
ALERT = "MoEExpertLoadImbalance"
CHECKPOINT = "demo-moe"  # the directory under <workdir>/models, and the served model's name
VOCAB, PROMPT_TOKENS, MAX_TOKENS, CONTEXT = 256, 32, 8, 256
WINDOW_S = 15.0  # the load figures of a row: answers of the last 15 s


def demo_model(workers: int) -> dict[str, Any]:
    """spec.model: small shapes, one expert per worker and layer (the seed's layout, scaled)."""
    return {
        "architecture": "SeedMLP",
        "layers": 4,
        "expertsPerLayer": workers,
        "hiddenSize": 64,
        "ffnHiddenSize": 128,
        "attentionHeads": 4,
        "headDim": 16,
        "topK": 2,
        "vocabSize": VOCAB,
        "dtype": "float32",
    }


def write_checkpoint(models: Path, workers: int) -> Path:
    """A Hugging Face directory of seeded SeedMLP weights of the demo's shape (no download)."""
    from moe_worker.models.checkpoint import write_checkpoint as write
    from moe_worker.models.weights import SyntheticWeights

    shape = install.synthetic_shape(demo_model(workers))
    source = SyntheticWeights.for_shape(shape, seed=0, max_context=CONTEXT)
    path = write(models / CHECKPOINT, source)
    availability.write_tokenizer(path, VOCAB)  # the router (smg) takes text prompts only
    return path


def demo_deployment(workers: int, models: Path) -> dict[str, Any]:
    """gloo on CPU, spare slots (so Auto means the output-preserving Replace); the checkpoint
    on a hostPath volume; no built-in traffic: the load is the demo's own requests."""
    source = install.checkpoint_source(models, CHECKPOINT)
    return {
        "apiVersion": "moe-ep.io/v1alpha1",
        "kind": "MoEDeployment",
        "metadata": {"name": NAME},
        "spec": {
            "model": {**demo_model(workers), "source": source},
            "parallelism": {"expert": workers},
            "placement": {"slotsPerRank": 2},
            "rebalancing": {
                "imbalanceThreshold": 1.3,
                "evaluationWindowSeconds": 10,
                "consecutiveEvaluations": 3,
                "cooldownSeconds": 30,
            },
            "worker": {
                "backend": "gloo",
                "device": "cpu",
                "gpusPerPod": 1,
                "kvCacheTokens": 4096,
                "maxQueuedRequests": 256,
                "extraEnv": [{"name": "OMP_NUM_THREADS", "value": "1"}],
            },
        },
    }


@dataclass
class Observation:
    elapsed: float
    ready: str = "0/0"
    phase: str = "-"
    plan: str = "-"
    imbalance: str = "-"
    alert: str = "inactive"
    load: Figures | None = None
    status: dict[str, Any] = field(default_factory=dict)

    def row(self) -> str:
        load = "     -        -       -" if self.load is None else self.load.row()
        return (
            f"{self.elapsed:6.0f}s  {self.ready:>6}  {self.phase:<11}  {self.plan:>5}  "
            f"{self.imbalance:>9}  {self.alert:<8}  {load}"
        )


HEADER = "  time   ready  phase         plan  imbalance  alert      req/s  tokens/s     p50"


def _prometheus(url: str, path: str, **params: str) -> Any:
    query = f"?{urllib.parse.urlencode(params)}" if params else ""
    try:
        with urllib.request.urlopen(f"{url}{path}{query}", timeout=5) as response:
            return json.load(response).get("data")
    except (OSError, ValueError):
        return None


def _alert_state(url: str) -> str:
    data = _prometheus(url, "/api/v1/alerts") or {}
    states = {
        a["state"]
        for a in data.get("alerts", [])
        if a["labels"].get("alertname") == ALERT and a["labels"].get("moedeployment") == NAME
    }
    return "firing" if "firing" in states else ("pending" if "pending" in states else "inactive")


def observe(
    kubeconfig: Path, prometheus_url: str, started: float, load: LoadGenerator | None
) -> Observation:
    obj = install.get_json(kubeconfig, "moed", NAME, "-n", NAMESPACE) or {}
    status = obj.get("status") or {}
    plan = status.get("plan") or {}
    return Observation(
        elapsed=time.monotonic() - started,
        ready=status.get("ready", "0/0"),
        phase=status.get("phase", "-"),
        plan=f"{plan.get('appliedVersion', 0)}/{plan.get('version', 0)}",
        imbalance=status.get("imbalance", "-"),
        alert=_alert_state(prometheus_url),
        load=None if load is None else load.figures(WINDOW_S),
        status=status,
    )


def _restarts(kubeconfig: Path) -> int:
    pods = install.get_json(
        kubeconfig, "pods", "-n", NAMESPACE, "-l", f"moe-ep.io/deployment={NAME}"
    ) or {"items": []}
    return sum(
        status.get("restartCount", 0)
        for pod in pods["items"]
        for status in (pod.get("status") or {}).get("containerStatuses") or []
    )


@dataclass
class Load:
    """The demo's clients: started once the `-api` Service has a ready endpoint."""

    cluster: LocalCluster
    workers: int
    zipf: float = 1.2
    generator: LoadGenerator | None = None

    def start_when_served(self) -> LoadGenerator | None:
        if self.generator is None:
            # No kube-proxy on the local cluster: go where it would, the Service's endpoint.
            # Through the router (`<name>-api` moves to it once a router pod is available).
            found = service_endpoint(self.cluster.client(), NAMESPACE, f"{NAME}-api")
            if found is not None and found[1] == availability.ROUTER_PORT:
                ids = zipf_prompts(
                    256, vocab_size=VOCAB, length=PROMPT_TOKENS, exponent=self.zipf, seed=1
                )
                prompts = availability.as_text(ids, VOCAB)
                self.generator = LoadGenerator(
                    f"http://{found[0]}:{found[1]}/v1",
                    CHECKPOINT,
                    prompts,
                    concurrency=4 * self.workers,
                    max_tokens=MAX_TOKENS,
                    ramp_s=5.0,
                ).start()
        return self.generator


def follow(
    kubeconfig: Path, prometheus_url: str, load: Load, timeout: float
) -> dict[str, Observation]:
    """Print a row every few seconds until the loop has gone round; return the milestones."""
    started, milestones = time.monotonic(), {}
    print(HEADER, flush=True)
    last_row, previous = "", None
    while time.monotonic() - started < timeout:
        try:
            ready = (previous is not None and previous.phase == "Running") or None
            generator = load.start_when_served() if ready else load.generator
            now = observe(kubeconfig, prometheus_url, started, generator)
        except RuntimeError as error:  # a slow API server on a busy machine: try again
            print(f"  (could not read status: {error})", flush=True)
            time.sleep(3)
            continue
        if now.row()[8:] != last_row or int(now.elapsed) % 15 == 0:
            print(now.row(), flush=True)
            last_row = now.row()[8:]
        workers = now.ready.split("/")
        if workers[0] == workers[1] != "0":
            milestones.setdefault("ready", now)
        if generator is not None and now.load is not None and now.load.requests_per_s:
            milestones.setdefault("serving", now)
        if now.alert == "firing":
            milestones.setdefault("alert", now)
        record = now.status.get("lastRebalance")
        if record and "serving" in milestones and "rebalanced" not in milestones:
            milestones["rebalanced"] = now
            if previous is not None:
                milestones["before"] = previous  # the last row measured on the old plan
        if (
            "rebalanced" in milestones
            and now.alert == "inactive"
            and now.status.get("phase") == "Running"
            and now.elapsed - milestones["rebalanced"].elapsed > 30
        ):
            milestones["after"] = now
            break
        previous = now
        time.sleep(3)
    return milestones


def summarise(
    milestones: dict[str, Observation],
    answers: list[Completion],
    restarts: int,
    loss: LossFigures | None = None,
) -> str:
    def at(key: str) -> str:
        return f"{milestones[key].elapsed:.0f}s" if key in milestones else "not reached"

    before, after = milestones.get("before"), milestones.get("after")
    record = (after or milestones.get("rebalanced") or Observation(0)).status.get(
        "lastRebalance"
    ) or {}
    failed = [done for done in answers if not done.ok]
    statuses = sorted({done.status for done in failed})
    lines = [
        "moe-ep demo summary",
        f"  workers ready at          {at('ready')}",
        f"  serving requests at       {at('serving')} (through the Service {NAME}-api)",
        f"  imbalance alert firing at {at('alert')}",
        f"  rebalanced at             {at('rebalanced')}"
        f" ({record.get('method', '-')}, {record.get('slotsMoved', 0)} slots moved, "
        f"plan {record.get('fromVersion', '-')} -> {record.get('toVersion', '-')})",
        f"  imbalance before -> after {before.imbalance if before else '-'} -> "
        f"{after.imbalance if after else '-'} (planner predicted "
        f"{record.get('imbalanceBefore', 0):.2f} -> {record.get('imbalanceAfter', 0):.2f})",
        f"  requests/s before -> after   {_figure(before, 'requests_per_s', '.1f')} -> "
        f"{_figure(after, 'requests_per_s', '.1f')}",
        f"  tokens/s before -> after     {_figure(before, 'tokens_per_s', ',.0f')} -> "
        f"{_figure(after, 'tokens_per_s', ',.0f')} (generated)",
        f"  p50 latency before -> after  {_figure(before, 'p50_latency_s', '.2f')}s -> "
        f"{_figure(after, 'p50_latency_s', '.2f')}s ({MAX_TOKENS} tokens per request)",
        "    (every rank shares this machine's cores, so balance moves work between processes",
        "     on the same CPUs and cannot raise throughput as it does with a GPU per rank)",
        f"  predicted throughput gain x{record.get('predictedThroughputGain', 1.0):.2f} "
        "(performance model, cpu-local profile)",
        f"  requests answered         {len(answers) - len(failed)} of {len(answers)}"
        + (f" (failed: HTTP {', '.join(map(str, statuses))})" if failed else ", none lost"),
        f"  alert resolved            {'yes' if after and after.alert == 'inactive' else 'no'}",
        f"  worker restarts           {restarts}"
        + (" (the killed rank's container, restarted to rejoin)" if loss else ""),
    ]
    return "\n".join(lines + (loss.lines() if loss else []))


def _figure(observation: Observation | None, name: str, spec: str) -> str:
    value = getattr(observation.load, name) if observation and observation.load else None
    return "-" if value is None else format(value, spec)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="moe-ep demo", description=__doc__)
    parser.add_argument("--workers", type=int, default=16, help="worker pods (ranks)")
    parser.add_argument("--zipf", type=float, default=1.2, help="prompt token skew (Zipf s)")
    parser.add_argument("--workdir", type=Path, default=default_workdir())
    parser.add_argument("--timeout", type=float, default=420, help="seconds to follow the loop")
    parser.add_argument("--keep", action="store_true", help="leave the cluster running")
    args = parser.parse_args(argv)
    cluster = LocalCluster(
        LocalClusterConfig(
            workdir=args.workdir, gpus=args.workers, prometheus=True, alert_for="15s"
        )
    )
    step = _Steps()
    step("starting the local cluster (control plane, node agent, Prometheus)")
    state = cluster.up(detach=args.keep)
    kubeconfig, prometheus_url = cluster.kubeconfig, state["prometheus"]["url"]
    load = Load(cluster, args.workers, zipf=args.zipf)
    try:
        step("installing the CRD and the operator with the Helm chart")
        cluster.create_namespace(install.SYSTEM_NAMESPACE)
        install.helm_install(kubeconfig, install.operator_values(timer_seconds=2))
        models = cluster.workdir / "models"
        path = write_checkpoint(models, args.workers)
        step(f"wrote a SeedMLP checkpoint to {path} (the hostPath volume the workers read)")
        install.wait_until(lambda: install.operator_ready(kubeconfig), 120, "the operator")
        step(
            f"applying MoEDeployment {NAME}: {args.workers} CPU workers; then "
            f"{4 * args.workers} clients send /v1/completions, prompt tokens Zipf({args.zipf})"
        )
        cluster.create_namespace(NAMESPACE)
        install.apply_document(kubeconfig, NAMESPACE, demo_deployment(args.workers, models))
        milestones = follow(kubeconfig, prometheus_url, load, args.timeout)
        loss = None
        if "after" in milestones and load.generator is not None and args.workers > 1:
            step("killing one worker rank (SIGKILL) under load: the others serve on")
            loss = lose_a_rank(kubeconfig, NAMESPACE, NAME, load.generator, args.workers // 2)
        answers = load.generator.stop() if load.generator is not None else []
        print()
        print(summarise(milestones, answers, _restarts(kubeconfig), loss), flush=True)
        ok = "after" in milestones and (loss is None or loss.failed == 0)
    finally:
        if load.generator is not None:
            load.generator.stop()
        if args.keep:
            print(f"\ncluster kept: export KUBECONFIG={kubeconfig}; moe-ep local down to stop")
        else:
            step("tearing down")
            left = cluster.down()
            if left:
                print(f"processes left behind: {left}", file=sys.stderr)
    return 0 if ok else 1


class _Steps:
    def __init__(self) -> None:
        self.started = time.monotonic()

    def __call__(self, message: str) -> None:
        print(f"[{time.monotonic() - self.started:5.0f}s] {message}", flush=True)


if __name__ == "__main__":
    sys.exit(main())
