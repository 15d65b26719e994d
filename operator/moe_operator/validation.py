"""Cross-field rules the CRD's OpenAPI schema cannot express on Kubernetes 1.20 (no CEL there).

Pure: a spec dict in, a list of problems out, each naming the field and the fix. The schema has
already checked types, ranges and enums when the object came through the API server; parsing
here repeats that so the operator is safe with objects written before a schema change.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError

from moe_operator.api import MoEDeploymentSpec

RESERVED_ENV_PREFIX = "MOE_"


@dataclass(frozen=True)
class SpecProblem:
    field: str
    message: str

    def __str__(self) -> str:
        return f"spec.{self.field}: {self.message}"


def parse_spec(raw: dict[str, Any]) -> tuple[MoEDeploymentSpec | None, list[SpecProblem]]:
    """Parse and check a spec; returns the model only when there is no problem at all."""
    try:
        spec = MoEDeploymentSpec.model_validate(raw)
    except ValidationError as error:
        return None, [
            SpecProblem(".".join(str(part) for part in item["loc"]), item["msg"])
            for item in error.errors()
        ]
    problems = cross_field_problems(spec)
    return (spec if not problems else None), problems


def cross_field_problems(spec: MoEDeploymentSpec) -> list[SpecProblem]:
    """Every rule that spans fields, in the order a user would fix them."""
    model, layout, worker = spec.model, spec.parallelism, spec.worker
    problems: list[SpecProblem] = []

    def need(condition: bool, field: str, message: str) -> None:
        if not condition:
            problems.append(SpecProblem(field, message))

    need(
        model.top_k <= model.experts_per_layer,
        "model.topK",
        f"topK {model.top_k} exceeds expertsPerLayer {model.experts_per_layer}; "
        "lower topK or add experts",
    )
    need(
        model.attention_heads % layout.tensor == 0,
        "parallelism.tensor",
        f"tensor {layout.tensor} must divide model.attentionHeads {model.attention_heads}",
    )
    need(
        model.ffn_hidden_size % layout.tensor == 0,
        "parallelism.tensor",
        f"tensor {layout.tensor} must divide model.ffnHiddenSize {model.ffn_hidden_size}",
    )
    need(
        model.layers % layout.pipeline == 0,
        "parallelism.pipeline",
        f"pipeline {layout.pipeline} must divide model.layers {model.layers}",
    )
    slots = layout.expert * spec.placement.slots_per_rank
    need(
        slots >= model.experts_per_layer,
        "placement.slotsPerRank",
        f"{layout.expert} expert ranks x {spec.placement.slots_per_rank} slots = {slots} "
        f"cannot hold {model.experts_per_layer} experts; raise slotsPerRank to "
        f"{-(-model.experts_per_layer // layout.expert)} or parallelism.expert",
    )
    need(
        layout.tensor == 1 and layout.pipeline == 1,
        "parallelism",
        "the serving runtime is expert-parallel only: set tensor 1 and pipeline 1 "
        "(the TP x PP layout exists for `moe-worker bench` comparisons)",
    )
    placement = spec.placement
    most = placement.most_slots_per_rank
    need(
        most >= placement.slots_per_rank,
        "placement.maxSlotsPerRank",
        f"maxSlotsPerRank {most} is below slotsPerRank {placement.slots_per_rank}; set it to at "
        "least slotsPerRank, or to 0 (the default: slotsPerRank)",
    )
    need(
        spec.rebalancing.method != "Replace" or layout.expert * most > model.experts_per_layer,
        "rebalancing.method",
        "Replace needs spare slots (parallelism.expert x placement.maxSlotsPerRank > "
        "model.expertsPerLayer); raise placement.maxSlotsPerRank if the GPUs have memory to "
        "spare (`moe-ep perf` prints what a slot costs), or use GatingBias or Auto",
    )
    need(
        worker.backend != "nccl" or worker.device == "cuda",
        "worker.backend",
        "nccl needs device cuda; use backend gloo for device cpu",
    )
    need(
        worker.device != "cuda" or worker.gpus_per_pod >= 1,
        "worker.gpusPerPod",
        "device cuda needs at least one GPU per pod; set gpusPerPod 1 or device cpu",
    )
    need(
        worker.port != worker.master_port,
        "worker.masterPort",
        f"masterPort {worker.master_port} collides with port; choose another",
    )
    reserved = [env.name for env in worker.extra_env if env.name.startswith(RESERVED_ENV_PREFIX)]
    need(
        not reserved,
        "worker.extraEnv",
        f"{', '.join(reserved)} are set by the operator; remove them or use another name",
    )
    need(
        spec.metrics.source != "Prometheus"
        or spec.metrics.prometheus_url.startswith(("http://", "https://")),
        "metrics.prometheusUrl",
        "source Prometheus needs prometheusUrl, e.g. http://prometheus.monitoring:9090",
    )
    return problems
