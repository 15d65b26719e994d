"""Cross-field rules: every bad spec names the field and the fix; every good one passes."""

from __future__ import annotations

import tracemalloc
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from moe_contract.plan import MAX_PLAN_VERSION, Plan
from moe_operator.api import MoEDeploymentSpec
from moe_operator.manifests.children import plan_shape
from moe_operator.validation import parse_spec, plan_bytes_bound

ROOT = Path(__file__).resolve().parents[2]
CPU = {"worker": {"backend": "gloo", "device": "cpu", "gpusPerPod": 0}}

BAD_SPECS: list[tuple[str, dict[str, Any], str]] = [
    ("topK above experts", {"model": {"topK": 17}}, "model.topK"),
    ("TP not dividing heads", {"parallelism": {"tensor": 3}}, "parallelism.tensor"),
    ("PP not dividing layers", {"parallelism": {"pipeline": 3}}, "parallelism.pipeline"),
    ("too few slots", {"parallelism": {"expert": 8}}, "placement.slotsPerRank"),
    ("Replace without spare slots", {"rebalancing": {"method": "Replace"}}, "rebalancing.method"),
    ("nccl on cpu", {"worker": {"device": "cpu", "gpusPerPod": 0}}, "worker.backend"),
    ("cuda without GPUs", {"worker": {"gpusPerPod": 0}}, "worker.gpusPerPod"),
    ("port clash", {"worker": {"port": 29500}}, "worker.masterPort"),
    (
        "reserved env",
        {"worker": {"extraEnv": [{"name": "MOE_RANK", "value": "3"}]}},
        "worker.extraEnv",
    ),
    ("prometheus without url", {"metrics": {"source": "Prometheus"}}, "metrics.prometheusUrl"),
    # issue 11, item 5: worker settings the operator owns cannot be overridden
    ("flag the operator sets", {"worker": {"extraArgs": ["--layers", "3"]}}, "worker.extraArgs[0]"),
    (
        "token file override",
        {"worker": {"extraArgs": ["--zipf", "1", "--token-file=/etc/hostname"]}},
        "worker.extraArgs[2]",
    ),
    ("flag without value", {"worker": {"extraArgs": ["--zipf"]}}, "worker.extraArgs[0]"),
    ("a bare word", {"worker": {"extraArgs": ["serve"]}}, "worker.extraArgs[0]"),
    (
        "interpreter path",
        {"worker": {"extraEnv": [{"name": "PYTHONPATH", "value": "/tmp/x"}]}},
        "worker.extraEnv",
    ),
    (
        "preloaded library",
        {"worker": {"extraEnv": [{"name": "LD_PRELOAD", "value": "/tmp/x.so"}]}},
        "worker.extraEnv",
    ),
    # issue 11, item 7: what Kubernetes would refuse in the pod template
    (
        "env name with a space",
        {"worker": {"extraEnv": [{"name": "MY VAR", "value": "1"}]}},
        "worker.extraEnv[0].name",
    ),
    (
        "env name with a digit first",
        {"worker": {"extraEnv": [{"name": "1VAR", "value": "1"}]}},
        "worker.extraEnv[0].name",
    ),
    (
        "node selector key",
        {"worker": {"nodeSelector": {"gpu type": "h100"}}},
        "worker.nodeSelector",
    ),
    (
        "node selector value",
        {"worker": {"nodeSelector": {"gpu": "h" * 64}}},
        "worker.nodeSelector.gpu",
    ),
    (
        "taint key",
        {"worker": {"tolerations": [{"key": "-bad", "operator": "Exists"}]}},
        "worker.tolerations[0].key",
    ),
    (
        "quantity",
        {"worker": {"resources": {"requests": {"memory": "lots"}}}},
        "worker.resources.requests.memory",
    ),
    (
        "negative quantity",
        {"worker": {"resources": {"limits": {"cpu": "-1"}}}},
        "worker.resources.limits.cpu",
    ),
    (
        "request above limit",
        {"worker": {"resources": {"requests": {"cpu": "2"}, "limits": {"cpu": "1500m"}}}},
        "worker.resources.requests.cpu",
    ),
    (
        "resource name",
        {"worker": {"resources": {"requests": {"gpu": "1"}}}},
        "worker.resources.requests",
    ),
    # issue 11, item 8: the operator only ever queries http(s) hosts
    (
        "prometheus url scheme",
        {"metrics": {"source": "Prometheus", "prometheusUrl": "file:///etc/passwd"}},
        "metrics.prometheusUrl",
    ),
    (
        "prometheus url credentials",
        {"metrics": {"source": "Prometheus", "prometheusUrl": "http://u:p@prom:9090"}},
        "metrics.prometheusUrl",
    ),
    # issue 21, item 5: PerLayer keeps the per-expert counters out of Prometheus
    (
        "per-layer series from prometheus",
        {
            "metrics": {
                "source": "Prometheus",
                "prometheusUrl": "http://prom:9090",
                "expertSeries": "PerLayer",
            }
        },
        "metrics.expertSeries",
    ),
    # issue 11, item 3: products within per-field limits that no ConfigMap could hold
    (
        "oversized plan",
        {"model": {"layers": 1024, "expertsPerLayer": 1024}, "parallelism": {"expert": 4096}},
        "parallelism.expert",
    ),
    (
        "oversized gate bias",
        {"model": {"layers": 1024, "expertsPerLayer": 1024}, "parallelism": {"expert": 1024}},
        "model.expertsPerLayer",
    ),
    # serving: the model's attention layout, its weights and the API
    ("kv heads not dividing heads", {"model": {"keyValueHeads": 5}}, "model.keyValueHeads"),
    ("odd head dim (RoPE)", {"model": {"headDim": 15}}, "model.headDim"),
    ("unknown architecture", {"model": {"architecture": "GPT2"}}, "model.architecture"),
    ("api port clash", {"worker": {"apiPort": 8080}}, "worker.apiPort"),
    ("api port on rendezvous", {"worker": {"apiPort": 29500}}, "worker.apiPort"),
    (
        "api keys secret name",
        {"worker": {"apiKeys": {"secretName": "My_Keys"}}},
        "worker.apiKeys.secretName",
    ),
    ("api keys key", {"worker": {"apiKeys": {"key": "a/b"}}}, "worker.apiKeys.key"),
    (
        "checkpoint type without one",
        {"model": {"source": {"type": "Checkpoint"}}},
        "model.source.checkpoint",
    ),
    (
        "a checkpoint that is not served",
        {"model": {"source": {"checkpoint": {"volume": {"hostPath": {"path": "/m"}}}}}},
        "model.source.type",
    ),
    (
        "checkpoint without a volume",
        {"model": {"source": {"type": "Checkpoint", "checkpoint": {"path": "m"}}}},
        "model.source.checkpoint.volume",
    ),
    ("wrong type", {"model": {"layers": "many"}}, "model.layers"),
    ("unknown field", {"model": {"experts": 8}}, "model.experts"),
    (
        "out of range",
        {"rebalancing": {"imbalanceThreshold": 0.5}},
        "rebalancing.imbalanceThreshold",
    ),
]

CHECKPOINT_VOLUME = "model.source.checkpoint.volume"
BAD_CHECKPOINTS: list[tuple[str, dict[str, Any], str, str]] = [
    ("no source", {}, "", CHECKPOINT_VOLUME),
    (
        "two sources",
        {"hostPath": {"path": "/m"}, "nfs": {"server": "nas", "path": "/m"}},
        "",
        CHECKPOINT_VOLUME,
    ),
    ("emptyDir", {"emptyDir": {}}, "", f"{CHECKPOINT_VOLUME}.emptyDir"),
    ("configMap", {"configMap": {"name": "weights"}}, "", f"{CHECKPOINT_VOLUME}.configMap"),
    ("gitRepo", {"gitRepo": {"repository": "x"}}, "", f"{CHECKPOINT_VOLUME}.gitRepo"),
    ("misspelt source", {"persistentVolumClaim": {"claimName": "m"}}, "", CHECKPOINT_VOLUME),
    ("source not an object", {"csi": "driver"}, "", f"{CHECKPOINT_VOLUME}.csi"),
    (
        "writable claim",
        {"persistentVolumeClaim": {"claimName": "models", "readOnly": False}},
        "",
        f"{CHECKPOINT_VOLUME}.persistentVolumeClaim.readOnly",
    ),
    (
        "writable csi",
        {"csi": {"driver": "x.csi.io", "readOnly": False}},
        "",
        f"{CHECKPOINT_VOLUME}.csi.readOnly",
    ),
    (
        "claim name",
        {"persistentVolumeClaim": {"claimName": "Models"}},
        "",
        f"{CHECKPOINT_VOLUME}.persistentVolumeClaim.claimName",
    ),
    (
        "relative host path",
        {"hostPath": {"path": "models"}},
        "",
        f"{CHECKPOINT_VOLUME}.hostPath.path",
    ),
    (
        "a host path that creates",
        {"hostPath": {"path": "/m", "type": "DirectoryOrCreate"}},
        "",
        f"{CHECKPOINT_VOLUME}.hostPath.type",
    ),
    (
        "path out of the volume",
        {"hostPath": {"path": "/m"}},
        "a/../../etc",
        "model.source.checkpoint.path",
    ),
    (
        "path outside the mount",
        {"hostPath": {"path": "/m"}},
        "/data/mixtral",
        "model.source.checkpoint.path",
    ),
    ("path with a newline", {"hostPath": {"path": "/m"}}, "a\nb", "model.source.checkpoint.path"),
]


def _checkpoint(volume: dict[str, Any], path: str = "") -> dict[str, Any]:
    return {
        "model": {"source": {"type": "Checkpoint", "checkpoint": {"volume": volume, "path": path}}}
    }


@pytest.mark.parametrize(
    ("why", "volume", "path", "field"), BAD_CHECKPOINTS, ids=[case[0] for case in BAD_CHECKPOINTS]
)
def test_bad_checkpoints_are_refused_naming_the_field(
    why: str, volume: dict[str, Any], path: str, field: str
) -> None:
    parsed, problems = parse_spec(_checkpoint(volume, path))
    assert parsed is None
    assert [problem.field for problem in problems] == [field], problems


@pytest.mark.parametrize(
    ("volume", "path", "mounted"),
    [
        (
            {"persistentVolumeClaim": {"claimName": "models"}},
            "mixtral-8x7b",
            "/models/mixtral-8x7b",
        ),
        ({"hostPath": {"path": "/srv/models", "type": "Directory"}}, "", "/models"),
        ({"nfs": {"server": "nas.lan", "path": "/export"}}, "/models/a/./b/", "/models/a/b"),
        (
            {"csi": {"driver": "blob.csi.azure.com", "volumeAttributes": {"x": "y"}}},
            "models/x",
            "/models/models/x",
        ),
        ({"ephemeral": {"volumeClaimTemplate": {"spec": {}}}}, "/models", "/models"),
    ],
)
def test_sound_checkpoints_pass_and_resolve_inside_the_mount(
    volume: dict[str, Any], path: str, mounted: str
) -> None:
    parsed, problems = parse_spec(_checkpoint(volume, path))
    assert problems == [] and parsed is not None
    checkpoint = parsed.model.source.checkpoint
    assert checkpoint is not None and checkpoint.mounted_path() == mounted
    kinds = checkpoint.volume.kinds()  # as written, plus the typed sources' defaults
    assert kinds.keys() == volume.keys()
    assert all(kinds[kind].items() >= fields.items() for kind, fields in volume.items())


def test_the_kv_heads_fix_names_a_divisor() -> None:
    _, problems = parse_spec({"model": {"attentionHeads": 32, "keyValueHeads": 6}})
    (problem,) = problems
    assert "such as 4" in problem.message


def test_a_grouped_query_mixtral_passes_and_declares_every_field() -> None:
    model = {
        "architecture": "Mixtral",
        "attentionHeads": 32,
        "keyValueHeads": 8,
        "vocabSize": 32000,
    }
    parsed, problems = parse_spec({"model": model})
    assert problems == [] and parsed is not None
    shape = parsed.model.to_shape()
    assert (shape.architecture, shape.kv_heads, shape.vocab_size) == ("Mixtral", 8, 32000)
    # 0 means as many as attentionHeads, and is declared so: a checkpoint must agree.
    plain = MoEDeploymentSpec.model_validate({"model": {"attentionHeads": 4, "headDim": 16}})
    assert plain.model.to_shape().kv_heads == 4


@pytest.mark.parametrize(("why", "spec", "field"), BAD_SPECS, ids=[case[0] for case in BAD_SPECS])
def test_bad_specs_are_refused_naming_the_field(why: str, spec: dict[str, Any], field: str) -> None:
    parsed, problems = parse_spec(spec)
    assert parsed is None
    assert field in [problem.field for problem in problems], problems
    assert all(str(problem).startswith("spec.") for problem in problems)
    assert all(problem.message for problem in problems)


def test_defaults_are_valid() -> None:
    parsed, problems = parse_spec({})
    assert problems == [] and parsed is not None


def test_all_problems_are_reported_at_once() -> None:
    _, problems = parse_spec({"model": {"topK": 20}, "worker": {"port": 29500}})
    assert {problem.field for problem in problems} == {"model.topK", "worker.masterPort"}


def test_slots_fix_names_the_value_that_works() -> None:
    _, problems = parse_spec({"parallelism": {"expert": 6}})
    (problem,) = problems
    assert "raise slotsPerRank to 3" in problem.message  # ceil(16 / 6)
    parsed, after = parse_spec({"parallelism": {"expert": 6}, "placement": {"slotsPerRank": 3}})
    assert after == [] and parsed is not None


@given(
    experts=st.integers(1, 64),
    ranks=st.integers(1, 32),
    slots=st.integers(1, 8),
    top_k=st.integers(1, 8),
)
def test_capacity_and_topk_rules_match_arithmetic(
    experts: int, ranks: int, slots: int, top_k: int
) -> None:
    spec = {
        **CPU,
        "model": {"expertsPerLayer": experts, "topK": top_k},
        "parallelism": {"expert": ranks},
        "placement": {"slotsPerRank": slots},
    }
    parsed, problems = parse_spec(spec)
    fits = ranks * slots >= experts and top_k <= experts
    assert (parsed is not None) == fits, problems


def test_user_flags_pass_in_both_spellings() -> None:
    args = ["--traffic-batch", "2", "--zipf=1.5", "--seed", "7", "--switch-timeout", "30"]
    parsed, problems = parse_spec({"worker": {"extraArgs": args}})
    assert problems == [] and parsed is not None


@pytest.mark.parametrize(
    ("args", "where", "said"),
    [
        # issue 19, item 8: each crash-looped every pod with argparse's usage text
        (["--seed", "abc"], "worker.extraArgs[1]", "--seed 'abc' is not an integer"),
        (["--seed", "1 --token-file x"], "worker.extraArgs[1]", "--seed '1 --token-file x' is"),
        (["--zipf=1", "--switch-timeout", "-5"], "worker.extraArgs[2]", "--switch-timeout '-5'"),
        (["--switch-timeout=inf"], "worker.extraArgs[0]", "must be > 0 and <= 86400"),
        (["--background-switch", "maybe"], "worker.extraArgs[1]", "is not a boolean"),
        (["--traffic-interval", "0"], "worker.extraArgs[1]", "must be > 0"),
        (["--seed", "-1"], "worker.extraArgs[1]", "--seed '-1': must be >= 0"),
    ],
)
def test_user_flag_values_the_worker_would_refuse_are_refused_naming_the_flag(
    args: list[str], where: str, said: str
) -> None:
    parsed, problems = parse_spec({"worker": {"extraArgs": args}})
    assert parsed is None
    assert [p.field for p in problems] == [where] and said in problems[0].message


def test_a_sound_pod_template_passes() -> None:
    worker = {
        **CPU["worker"],
        "extraEnv": [{"name": "OMP_NUM_THREADS", "value": "1"}, {"name": "_x1", "value": ""}],
        "nodeSelector": {"nvidia.com/gpu.product": "H100-SXM", "zone": ""},
        "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
        "resources": {
            "requests": {"cpu": "500m", "memory": "1.5Gi", "example.com/nic": "1"},
            "limits": {"cpu": "2", "memory": "2e9", "example.com/nic": "1"},
        },
    }
    parsed, problems = parse_spec({"worker": worker})
    assert problems == [] and parsed is not None


@pytest.mark.parametrize(
    ("name", "ok"),
    [
        ("cpu-small", True),
        ("a" * 52, True),
        ("a" * 53, False),  # controller-revision-hash=<name>-<10 chars> is a label value <= 63
        ("with.dots", False),  # the Service <name>-workers must be a DNS-1035 label
        ("9lives", False),
        ("Upper", False),
    ],
)
def test_the_name_must_fit_every_child(name: str, ok: bool) -> None:
    parsed, problems = parse_spec(
        {"updateStrategy": {"maxSurge": 0, "maxUnavailable": 1}}, name=name
    )
    assert (parsed is not None) == ok, problems
    if not ok:
        assert [str(problem).split(":")[0] for problem in problems] == ["metadata.name"]


@pytest.mark.parametrize(
    ("spec", "ok"),
    [
        ({}, False),  # maxSurge 1: a second group's StatefulSet <name>-g1 may exist
        ({"updateStrategy": {"maxSurge": 0, "maxUnavailable": 1}}, True),
        ({"replicas": 2, "updateStrategy": {"maxSurge": 0, "maxUnavailable": 1}}, False),
    ],
)
def test_a_name_of_52_characters_fits_one_group_only(spec: dict, ok: bool) -> None:
    parsed, problems = parse_spec(spec, name="a" * 52)
    assert (parsed is not None) == ok, problems
    assert parse_spec(spec, name="a" * 48)[0] is not None
    if not ok:
        assert "<name>-g<k>" in str(problems[0]) and "metadata.name" in str(problems[0])


def test_an_update_must_be_able_to_progress() -> None:
    parsed, problems = parse_spec({"updateStrategy": {"maxSurge": 0, "maxUnavailable": 0}})
    assert parsed is None
    assert str(problems[0]).startswith("spec.updateStrategy: ")


def test_refusing_an_oversized_spec_builds_nothing() -> None:
    """The issue's spec: 1024 x 1024 x 4096 made the operator grow by 770 MB. Refusing it must
    not build the plan (or anything of its size) first."""
    spec = {"model": {"layers": 1024, "expertsPerLayer": 1024}, "parallelism": {"expert": 4096}}
    tracemalloc.start()
    try:
        parsed, problems = parse_spec(spec, name="huge")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert parsed is None and problems
    assert peak < 2 * 1024 * 1024, f"refusing took {peak} bytes"


@settings(max_examples=60)
@given(
    layers=st.integers(1, 6),
    experts=st.integers(1, 40),
    ranks=st.integers(1, 12),
    slots=st.integers(1, 4),
    bias=st.lists(st.floats(-1, 1, allow_nan=False), min_size=1, max_size=5),
)
def test_plan_size_bound_is_an_upper_bound(
    layers: int, experts: int, ranks: int, slots: int, bias: list[float]
) -> None:
    if ranks * slots < experts:
        return
    spec = MoEDeploymentSpec.model_validate(
        {
            "model": {"layers": layers, "expertsPerLayer": experts, "topK": 1},
            "parallelism": {"expert": ranks},
            "placement": {"slotsPerRank": slots},
        }
    )
    table, gate = plan_bytes_bound(spec)
    plan = plan_shape(spec).round_robin(MAX_PLAN_VERSION)
    assert len(plan.to_json()) <= table
    worst = [[-1.2345678901234567e-300, *bias][e % (len(bias) + 1)] for e in range(experts)]
    biased = Plan.model_validate({**plan.to_document(), "gateBias": [worst] * layers})
    assert len(biased.to_json()) <= table + gate


@pytest.mark.parametrize(
    "sample", sorted((ROOT / "manifests" / "samples").glob("*.yaml")), ids=lambda path: path.name
)
def test_every_sample_passes(sample: Path) -> None:
    document = yaml.safe_load(sample.read_text())
    parsed, problems = parse_spec(document["spec"], name=document["metadata"]["name"])
    assert problems == [] and parsed is not None


def test_max_slots_per_rank_below_slots_per_rank_is_refused_with_the_fix() -> None:
    parsed, problems = parse_spec({"placement": {"slotsPerRank": 2, "maxSlotsPerRank": 1}})
    assert parsed is None
    (problem,) = [p for p in problems if p.field == "placement.maxSlotsPerRank"]
    assert "below slotsPerRank 2" in problem.message and "0 (the default" in problem.message


def test_replace_may_rely_on_slots_it_can_add() -> None:
    refused, problems = parse_spec({"rebalancing": {"method": "Replace"}})
    assert refused is None and "placement.maxSlotsPerRank" in problems[0].message
    parsed, problems = parse_spec(
        {"rebalancing": {"method": "Replace"}, "placement": {"maxSlotsPerRank": 2}}
    )
    assert problems == [] and parsed is not None
    assert parsed.placement.most_slots_per_rank == 2


@pytest.mark.parametrize(
    ("gating", "field"),
    [
        ({"maxMargin": 1.5}, "rebalancing.gating.maxMargin"),
        ({"maxReroutedFraction": -0.1}, "rebalancing.gating.maxReroutedFraction"),
        ({"damping": 1.0}, "rebalancing.gating.damping"),
        ({"gateBiasRate": 0.01}, "rebalancing.gating.gateBiasRate"),  # v1alpha1: moved, not kept
    ],
)
def test_gating_settings_out_of_range_name_their_field(gating: dict, field: str) -> None:
    parsed, problems = parse_spec({"rebalancing": {"gating": gating}})
    assert parsed is None and field in [problem.field for problem in problems]


def test_the_old_top_level_gate_bias_fields_are_refused() -> None:
    parsed, problems = parse_spec({"rebalancing": {"maxGateBias": 0.1}})
    assert parsed is None and problems[0].field == "rebalancing.maxGateBias"


DEEPSEEK_V3_MODEL = {
    "architecture": "DeepseekV3",
    "layers": 58,
    "expertsPerLayer": 256,
    "hiddenSize": 7168,
    "ffnHiddenSize": 2048,
    "attentionHeads": 128,
    "headDim": 192,
    "topK": 8,
    "denseLayers": 3,
    "denseFfnHiddenSize": 18432,
    "sharedFfnHiddenSize": 2048,
    "kvLoraRank": 512,
    "qLoraRank": 1536,
    "ropeHeadDim": 64,
    "vHeadDim": 128,
}


def test_the_issue_24_families_are_accepted_with_their_sizes() -> None:
    spec, problems = parse_spec(
        {
            "model": DEEPSEEK_V3_MODEL,
            "parallelism": {"expert": 16},
            "placement": {"slotsPerRank": 16},
        }
    )
    assert problems == [] and spec is not None
    shape = spec.model.to_shape()
    assert (shape.total_layers, shape.kv_lora_rank, shape.dense_ffn_hidden) == (61, 512, 18432)
    assert plan_shape(spec).layers == 58  # plans hold the MoE layers only
    glm = {"architecture": "Glm4MoE", "denseLayers": 3, "denseFfnHiddenSize": 12288}
    qwen2 = {"architecture": "Qwen2MoE", "sharedFfnHiddenSize": 5632}
    for model in (glm | {"sharedFfnHiddenSize": 1536, "keyValueHeads": 8}, qwen2):
        assert parse_spec({"model": model})[1] == []


@pytest.mark.parametrize(
    ("model", "field", "words"),
    [
        ({"architecture": "Mixtral", "kvLoraRank": 512}, "model.kvLoraRank", "DeepseekV3 only"),
        (
            {"architecture": "Qwen2MoE", "denseLayers": 1, "denseFfnHiddenSize": 64},
            "model.denseLayers",
            "Glm4MoE and DeepseekV3 only",
        ),
        (
            {"architecture": "Glm4MoE", "denseLayers": 3},
            "model.denseFfnHiddenSize",
            "both be 0 or both at least 1",
        ),
        ({**DEEPSEEK_V3_MODEL, "kvLoraRank": 0}, "model.kvLoraRank", "at least 1"),
        ({**DEEPSEEK_V3_MODEL, "ropeHeadDim": 63}, "model.ropeHeadDim", "must be even"),
        (
            {**DEEPSEEK_V3_MODEL, "keyValueHeads": 8},
            "model.keyValueHeads",
            "must equal attentionHeads 128",
        ),
    ],
)
def test_sizes_an_architecture_lacks_or_contradicts_name_the_field(
    model: dict[str, Any], field: str, words: str
) -> None:
    spec, problems = parse_spec({"model": model})
    assert spec is None
    assert any(p.field == field and words in p.message for p in problems), problems
