"""The registry of architectures: one file per family, looked up by `ModelShape.architecture` or
by a Hugging Face config.json. Adding a family (e.g. OLMoE) is one more file and one entry here.

SeedMLP, Mixtral, Qwen3-MoE: routed experts only. Qwen2-MoE: plus a gated shared expert.
GLM-4.5 and DeepSeek-V3 (`deepseek_moe`): dense first layers, shared experts, the sigmoid router
with its correction bias and groups; DeepSeek-V3 under multi-head latent attention (`mla`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from moe_worker.models.base import (
    Architecture,
    ExpertWeights,
    GateBias,
    MoEFn,
    PriceCounters,
    Routing,
    route,
    route_priced,
)
from moe_worker.models.config import ModelSpec, UnsupportedConfig
from moe_worker.models.deepseek_v3 import DeepseekV3
from moe_worker.models.experts import LocalExperts
from moe_worker.models.glm4_moe import Glm4MoE
from moe_worker.models.mixtral import Mixtral
from moe_worker.models.qwen2_moe import Qwen2MoE
from moe_worker.models.qwen3_moe import Qwen3MoE
from moe_worker.models.seed_mlp import SeedMLP
from moe_worker.models.transformer import MoETransformer

ARCHITECTURES: dict[str, Architecture] = {
    a.name: a for a in (SeedMLP(), Mixtral(), Qwen3MoE(), Qwen2MoE(), Glm4MoE(), DeepseekV3())
}

__all__ = [
    "ARCHITECTURES",
    "Architecture",
    "ExpertWeights",
    "GateBias",
    "LocalExperts",
    "MoEFn",
    "MoETransformer",
    "ModelSpec",
    "PriceCounters",
    "Routing",
    "UnsupportedConfig",
    "architecture",
    "parse_hf_config",
    "route",
    "route_priced",
]


def architecture(name: str) -> Architecture:
    """The family serving `ModelShape.architecture == name`."""
    try:
        return ARCHITECTURES[name]
    except KeyError:
        raise ValueError(f"architecture {name!r} is not one of {sorted(ARCHITECTURES)}") from None


def parse_hf_config(config: Mapping[str, Any]) -> tuple[Architecture, ModelSpec]:
    """The family named by a config.json (`architectures`, else `model_type`) and its spec."""
    if config.get("quantization_config"):
        method = config["quantization_config"].get("quant_method", "?")
        raise UnsupportedConfig(
            f"config.json quantization_config ({method}) is not supported: only unquantized "
            "bfloat16 / float16 / float32 weights"
        )
    names = [*(config.get("architectures") or []), config.get("model_type")]
    for arch in ARCHITECTURES.values():
        if any(name in arch.hf_architectures for name in names):
            return arch, arch.parse_config(config)
    known = sorted(n for a in ARCHITECTURES.values() for n in a.hf_architectures)
    raise UnsupportedConfig(
        f"config.json architectures={config.get('architectures')!r} "
        f"model_type={config.get('model_type')!r} is not one of {known}"
    )
