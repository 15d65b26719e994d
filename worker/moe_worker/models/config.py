"""What a model is, beyond its shape: the exact details one architecture needs, and the one reader
that builds them from a Hugging Face `config.json`. Torch-free.

`ModelShape` (moe_contract.shape) is the contract with the operator: sizes only. `ModelSpec` adds
what the math needs and the operator does not care about (norm epsilon, RoPE base and layout,
the router's scoring, tied embeddings, context length, EOS ids). A family builds one from a
config.json (`Architecture.parse_config`, always `read_spec` below with the family's
`ConfigReader`) or from a bare shape with its defaults (synthetic weights).

A config the code cannot serve exactly is refused with `UnsupportedConfig` naming the field.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any, Literal

from moe_contract.shape import ModelShape


class UnsupportedConfig(ValueError):
    """A config.json this code cannot serve exactly; the message names the field."""


@dataclass(frozen=True)
class RouterSpec:
    """How the gate turns its logits into a selection and weights (transformers' routers).

    softmax (Mixtral, Qwen2/3-MoE): softmax over all experts, top-K, renormalised by
    `ModelSpec.norm_topk_prob`. sigmoid (GLM-4.5, DeepSeek-V3): a sigmoid score per expert; the
    checkpoint's `e_score_correction_bias` is added for choosing only; experts are chosen within
    the `topk_group` best of `n_group` groups (a group scores the sum of its two best); the
    weights are the chosen unbiased scores, renormalised by `norm_topk_prob` (+1e-20), then
    times `routed_scaling_factor`.
    """

    scoring: Literal["softmax", "sigmoid"] = "softmax"
    n_group: int = 1
    topk_group: int = 1
    routed_scaling_factor: float = 1.0


@dataclass(frozen=True)
class YarnRope:
    """YaRN-scaled RoPE (DeepSeek-V3, Kimi-K2): transformers' `yarn` rope_type parameters."""

    factor: float
    original_max_position: int
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float | None = None
    mscale_all_dim: float | None = None
    attention_factor: float | None = None
    truncate: bool = True

    def cos_sin_factor(self) -> float:
        """What cos and sin are multiplied by (transformers' `attention_factor`)."""
        if self.attention_factor is not None:
            return self.attention_factor
        if self.mscale and self.mscale_all_dim:
            return _yarn_mscale(self.factor, self.mscale) / _yarn_mscale(
                self.factor, self.mscale_all_dim
            )
        return _yarn_mscale(self.factor)

    def softmax_factor(self) -> float:
        """DeepSeek's extra attention scale: mscale(factor, mscale_all_dim) squared."""
        if not self.mscale_all_dim:
            return 1.0
        return _yarn_mscale(self.factor, self.mscale_all_dim) ** 2


def _yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


@dataclass(frozen=True)
class ModelSpec:
    """The full description of one servable model: its shape plus the family's exact details."""

    shape: ModelShape
    rms_norm_eps: float = 1e-6
    """Epsilon of every RMSNorm (layer norms, final norm, Qwen3's q/k norms)."""
    rope_theta: float = 10000.0
    """Base of the rotary position embedding."""
    max_context: int = 4096
    """Most tokens (prompt + generated) one sequence may hold."""
    norm_topk_prob: bool = True
    """Renormalise the top-K gate weights to sum to one (Mixtral always; others by config)."""
    tie_word_embeddings: bool = False
    """The LM head reuses the token embedding matrix."""
    eos_token_ids: tuple[int, ...] = ()
    """Tokens that end a generation (config.json and generation_config.json)."""
    router: RouterSpec = field(default_factory=RouterSpec)
    """The gate's scoring and selection."""
    attention_bias: bool = False
    """Biases on the attention projections (Qwen2-MoE's q/k/v, GLM-4.5's q/k/v; MLA's
    q_a/kv_a/o)."""
    qk_norm: bool = False
    """RMSNorm over each query and key head before RoPE (GLM-4.5's use_qk_norm; Qwen3 always)."""
    partial_rotary_factor: float = 1.0
    """The fraction of each head RoPE turns (its first dimensions; GLM-4.5: 0.5)."""
    rope_interleave: bool = False
    """RoPE on interleaved pairs (x0, x1), (x2, x3), ... (DeepSeek-V3) instead of halves."""
    yarn: YarnRope | None = None
    """YaRN scaling of RoPE (DeepSeek-V3 only), None: unscaled."""

    @property
    def rotary_dim(self) -> int:
        """How many dimensions of each query/key head RoPE turns."""
        if self.shape.latent_attention:
            return self.shape.rope_head_dim
        return int(self.shape.head_dim * self.partial_rotary_factor)

    def replace(self, **changes: object) -> ModelSpec:
        return replace(self, **changes)  # type: ignore[arg-type]


SlidingWindow = Literal["always", "when_used", "never"]


@dataclass(frozen=True)
class ConfigReader:
    """Where a family's config.json keeps the fields every family has, and its defaults."""

    experts: tuple[str, ...]
    """Names of the routed expert count, the first set wins."""
    ffn_hidden: tuple[str, ...]
    """Names of the routed expert width."""
    rms_norm_eps: float
    rope_theta: float
    norm_topk_prob: bool = False
    """`norm_topk_prob` when config.json does not say (the family's transformers default)."""
    norm_topk_fixed: bool = False
    """The family uses `norm_topk_prob` whatever config.json says (Mixtral always renormalises)."""
    sliding_window: SlidingWindow = "never"
    """`sliding_window` caps the context always, only with `use_sliding_window`, or never."""
    required: tuple[tuple[str, object, object], ...] = (("hidden_act", "silu", "silu"),)
    """(field, the one value served, its default when absent) for each field that must be so."""
    yarn: bool = False
    """Whether YaRN-scaled RoPE is served (else any scaled RoPE is refused)."""


def read_spec(
    config: Mapping[str, Any],
    architecture: str,
    reader: ConfigReader,
    sizes: Mapping[str, int] | None = None,
    **details: Any,
) -> ModelSpec:
    """The spec of a config.json: the common fields where `reader` says, the family's extra shape
    `sizes` (dense_layers, ... ; `layers` counts the MoE blocks only) and spec `details`."""
    for name, allowed, default in reader.required:
        require(config, name, allowed, default)
    sizes = dict(sizes or {})
    hidden = int(first_of(config, "hidden_size"))
    heads = int(first_of(config, "num_attention_heads"))
    blocks = int(first_of(config, "num_hidden_layers"))
    dense = sizes.get("dense_layers", 0)
    if not 0 <= dense < blocks:
        raise UnsupportedConfig(
            f"config.json first_k_dense_replace={dense} leaves no MoE layer of {blocks}"
        )
    head_dim = sizes.pop("head_dim", None) or first_of(config, "head_dim", default=hidden // heads)
    kv_heads = sizes.pop("kv_heads", None) or first_of(config, "num_key_value_heads", default=heads)
    shape = shape_from(
        config,
        architecture,
        layers=blocks - dense,
        experts=int(first_of(config, *reader.experts)),
        hidden=hidden,
        ffn_hidden=int(first_of(config, *reader.ffn_hidden)),
        heads=heads,
        head_dim=int(head_dim),
        top_k=int(first_of(config, "num_experts_per_tok")),
        kv_heads=int(kv_heads),
        vocab_size=int(first_of(config, "vocab_size")),
        **sizes,
    )
    norm = reader.norm_topk_prob
    if not reader.norm_topk_fixed and config.get("norm_topk_prob") is not None:
        norm = bool(config["norm_topk_prob"])
    window = {
        "always": config.get("sliding_window"),
        "when_used": config.get("sliding_window") if config.get("use_sliding_window") else None,
        "never": None,
    }[reader.sliding_window]
    theta, yarn = rope_theta(config, reader.rope_theta, allow_yarn=reader.yarn)
    return ModelSpec(
        shape=shape,
        rms_norm_eps=float(first_of(config, "rms_norm_eps", default=reader.rms_norm_eps)),
        rope_theta=theta,
        max_context=context_length(config, window),
        norm_topk_prob=norm,
        tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
        eos_token_ids=token_ids(config.get("eos_token_id")),
        yarn=yarn,
        **details,
    )


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


def rope_parameters(config: Mapping[str, Any]) -> tuple[dict[str, Any], str]:
    """The RoPE parameters as one dict, and the field a scaling came from.

    transformers 5 writes `rope_parameters: {rope_type, rope_theta, partial_rotary_factor, ...}`;
    hub configs written by 4.x have top-level `rope_theta` and `partial_rotary_factor` and
    `rope_scaling` (null when unscaled). A scaled RoPE in either wins over a default one.
    """
    merged: dict[str, Any] = {
        name: config[name]
        for name in ("partial_rotary_factor", "rope_theta")
        if config.get(name) is not None
    }
    kind, where = "default", "rope_parameters"
    for name in ("rope_scaling", "rope_parameters"):
        params = config.get(name)
        if params is None:
            continue
        if not isinstance(params, Mapping):
            raise UnsupportedConfig(f"config.json {name} must be an object, got {params!r}")
        merged.update((k, v) for k, v in params.items() if v is not None)
        this = params.get("rope_type", params.get("type", "default"))
        if this != "default" and kind == "default":
            kind, where = this, name
    merged["rope_type"] = kind
    return merged, where


def rope_theta(
    config: Mapping[str, Any], default: float, *, allow_yarn: bool = False
) -> tuple[float, YarnRope | None]:
    """The RoPE base and its YaRN scaling (where the family serves it); refuses any other scaled
    RoPE (linear, dynamic, llama3, ..., and yarn elsewhere)."""
    params, where = rope_parameters(config)
    kind = params["rope_type"]
    theta = float(params.get("rope_theta", default))
    if kind == "default":
        return theta, None
    if kind != "yarn" or not allow_yarn:
        served = "unscaled or yarn RoPE" if allow_yarn else "unscaled RoPE"
        raise UnsupportedConfig(
            f"config.json {where}: rope_type {kind!r} is not supported (only {served})"
        )
    try:
        yarn = YarnRope(
            factor=float(params["factor"]),
            original_max_position=int(params["original_max_position_embeddings"]),
            beta_fast=float(params.get("beta_fast") or 32.0),
            beta_slow=float(params.get("beta_slow") or 1.0),
            mscale=params.get("mscale"),
            mscale_all_dim=params.get("mscale_all_dim"),
            attention_factor=params.get("attention_factor"),
            truncate=bool(params.get("truncate", True)),
        )
    except KeyError as missing:
        raise UnsupportedConfig(f"config.json {where}: yarn needs {missing.args[0]}") from None
    return theta, yarn


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
