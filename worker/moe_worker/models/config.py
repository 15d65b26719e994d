"""What a model is, beyond its shape: the exact details one architecture needs, and the helpers that
read them from a Hugging Face `config.json`. Torch-free.

`ModelShape` (moe_contract.shape) is the contract with the operator: sizes only. `ModelSpec` adds
what the math needs and the operator does not care about (norm epsilon, RoPE base, router
renormalisation, tied embeddings, context length, EOS ids). A family builds one from a config.json
(`Architecture.parse_config`) or from a bare shape with its defaults (synthetic weights).

A config the code cannot serve exactly is refused with `UnsupportedConfig` naming the field.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

from moe_contract.shape import ModelShape


class UnsupportedConfig(ValueError):
    """A config.json this code cannot serve exactly; the message names the field."""


@dataclass(frozen=True)
class ModelSpec:
    """The full description of one servable model: its shape plus the family's exact details."""

    shape: ModelShape
    rms_norm_eps: float = 1e-6
    """Epsilon of every RMSNorm (layer norms, final norm, Qwen3's q/k norms)."""
    rope_theta: float = 10000.0
    """Base of the rotary position embedding (default RoPE, rotate-half layout)."""
    max_context: int = 4096
    """Most tokens (prompt + generated) one sequence may hold."""
    norm_topk_prob: bool = True
    """Renormalise the top-K gate weights to sum to one (Mixtral always; Qwen3 by config)."""
    tie_word_embeddings: bool = False
    """The LM head reuses the token embedding matrix."""
    eos_token_ids: tuple[int, ...] = ()
    """Tokens that end a generation (config.json and generation_config.json)."""

    def replace(self, **changes: object) -> ModelSpec:
        return replace(self, **changes)  # type: ignore[arg-type]


_MISSING = object()


def first_of(config: Mapping[str, Any], *names: str, default: Any = _MISSING) -> Any:
    """The first of `names` set (not null) in `config`; without a default, refuse if none is."""
    for name in names:
        if config.get(name) is not None:
            return config[name]
    if default is _MISSING:
        raise UnsupportedConfig(f"config.json has no {' or '.join(names)}")
    return default


def require(config: Mapping[str, Any], name: str, allowed: object, default: object) -> None:
    """Refuse a config whose `name` is set to anything but `allowed` (absent means `default`)."""
    value = config.get(name, default)
    if value is None:
        value = default
    if value != allowed:
        raise UnsupportedConfig(
            f"config.json {name}={value!r} is not supported (only {allowed!r} is served exactly)"
        )


def rope_theta(config: Mapping[str, Any], default: float) -> float:
    """The RoPE base; refuses any scaled RoPE (yarn, linear, dynamic, llama3, ...).

    transformers 5 writes `rope_parameters: {rope_type, rope_theta}`; hub configs written by 4.x
    have top-level `rope_theta` and `rope_scaling` (null when unscaled).
    """
    for name in ("rope_parameters", "rope_scaling"):
        params = config.get(name)
        if params is None:
            continue
        if not isinstance(params, Mapping):
            raise UnsupportedConfig(f"config.json {name} must be an object, got {params!r}")
        kind = params.get("rope_type", params.get("type", "default"))
        if kind != "default":
            raise UnsupportedConfig(
                f"config.json {name}: rope_type {kind!r} is not supported (only unscaled RoPE)"
            )
        if params.get("rope_theta") is not None:
            return float(params["rope_theta"])
    return float(first_of(config, "rope_theta", default=default))


def context_length(config: Mapping[str, Any], sliding_window: int | None) -> int:
    """max_position_embeddings, capped at the sliding window if there is one.

    A token attends to the `sliding_window` most recent positions, itself included; a sequence no
    longer than the window therefore never loses a key, so capping the context serves the model
    exactly with full attention.
    """
    longest = int(first_of(config, "max_position_embeddings"))
    return min(longest, int(sliding_window)) if sliding_window else longest


def token_ids(value: Any) -> tuple[int, ...]:
    """An `eos_token_id` value (null, an int or a list) as a tuple."""
    if value is None:
        return ()
    if isinstance(value, int):
        return (value,)
    return tuple(int(v) for v in value)


def dtype_name(config: Mapping[str, Any]) -> str:
    """The checkpoint dtype (`dtype` in transformers 5, `torch_dtype` before); float32 if unset."""
    return str(first_of(config, "dtype", "torch_dtype", default="float32"))


def shape_from(config: Mapping[str, Any], architecture: str, **sizes: int) -> ModelShape:
    """A ModelShape from config.json sizes; what ModelShape refuses is refused as a config error.

    `kv_heads` is stored as None when it equals `heads`, the form a deployment declares it in.
    """
    kv_heads = sizes.pop("kv_heads")
    try:
        return ModelShape(
            architecture=architecture,
            dtype=dtype_name(config),
            kv_heads=None if kv_heads == sizes["heads"] else kv_heads,
            **sizes,
        )
    except ValueError as error:
        raise UnsupportedConfig(f"config.json: {error}") from None
