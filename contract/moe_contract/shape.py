"""The model shape: the one torch-free description of the MoE transformer a deployment serves.

Part of the operator -> worker contract (with `moe_contract.plan` and `moe_contract.env`). The
operator converts `spec.model` to it and sets it on pods; the worker builds its model from it; the
performance model (`moe_operator.perf`) prices it. Imports nothing beyond the standard library.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass

ARCHITECTURES = ("SeedMLP", "Mixtral", "Qwen3MoE", "Qwen2MoE", "Glm4MoE", "DeepseekV3")
"""SeedMLP: the seed's two-matrix GELU experts; the others: SwiGLU (3 matrices)."""
DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4}

_DENSE = ("dense_layers", "dense_ffn_hidden")
_MLA = ("kv_lora_rank", "q_lora_rank", "rope_head_dim", "v_head_dim")
EXTRA_FIELDS: dict[str, tuple[str, ...]] = {
    "SeedMLP": (),
    "Mixtral": (),
    "Qwen3MoE": (),
    "Qwen2MoE": ("shared_ffn_hidden",),
    "Glm4MoE": (*_DENSE, "shared_ffn_hidden"),
    "DeepseekV3": (*_DENSE, "shared_ffn_hidden", *_MLA),
}
"""The optional size fields each architecture may set (all others stay 0)."""


@dataclass(frozen=True)
class ModelShape:
    """Shape of the MoE transformer. Defaults are a small CPU model; `seed()` gives the seed's."""

    layers: int = 2
    """Transformer blocks with an MoE feed-forward (each with attention): the layers of a plan,
    of the expert counters and of the gate bias."""
    experts: int = 4
    """Logical experts per layer."""
    hidden: int = 64
    """Model (token) dimension D."""
    ffn_hidden: int = 128
    """Expert MLP inner dimension F."""
    heads: int = 4
    """Attention (query) heads H."""
    head_dim: int = 16
    """Dimension per head; heads * head_dim is the attention width."""
    top_k: int = 2
    """Experts each token visits."""
    dtype: str = "float32"
    """bfloat16 | float16 | float32."""
    architecture: str = "SeedMLP"
    """One of ARCHITECTURES."""
    kv_heads: int | None = None
    """Key/value heads (grouped-query attention); None: as many as `heads`."""
    vocab_size: int = 256
    """Token vocabulary of the embedding and the LM head."""
    dense_layers: int = 0
    """Leading transformer blocks whose feed-forward is one dense MLP, run by every rank like
    attention (`first_k_dense_replace`: GLM-4.5, DeepSeek-V3); they come before the `layers`
    MoE blocks and are not part of any plan."""
    dense_ffn_hidden: int = 0
    """Inner dimension of those dense MLPs (SwiGLU); 0 without dense layers."""
    shared_ffn_hidden: int = 0
    """Inner dimension of the shared expert MLP every token visits beside its routed experts
    (all shared experts of a layer as one SwiGLU MLP), held by every rank, never placed or
    counted; 0: none."""
    kv_lora_rank: int = 0
    """Multi-head latent attention (DeepSeek-V3): width of the compressed key/value latent, which
    the KV cache holds per token with the rotary key; 0: standard attention."""
    q_lora_rank: int = 0
    """MLA: width of the query's low-rank projection; 0: queries projected directly."""
    rope_head_dim: int = 0
    """MLA: the rotary part of each query/key head (`head_dim` is the whole query/key head)."""
    v_head_dim: int = 0
    """MLA: dimension of each value head."""

    def __post_init__(self) -> None:
        problems = self.problems()
        if problems:
            raise ValueError("; ".join(problems))

    def problems(self) -> list[str]:
        """What makes this shape unbuildable, each naming the field."""
        found = []
        for name in ("layers", "experts", "hidden", "ffn_hidden", "heads", "head_dim", "top_k"):
            if getattr(self, name) < 1:
                found.append(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.top_k > self.experts:
            found.append(f"top_k {self.top_k} exceeds experts {self.experts}")
        if self.dtype not in DTYPE_BYTES:
            found.append(f"dtype {self.dtype!r} is not bfloat16, float16 or float32")
        if self.architecture not in ARCHITECTURES:
            found.append(f"architecture {self.architecture!r} is not one of {ARCHITECTURES}")
        if self.kv_heads is not None and (self.kv_heads < 1 or self.heads % self.kv_heads):
            found.append(f"kv_heads {self.kv_heads} must divide heads {self.heads}")
        if self.vocab_size < 1:
            found.append(f"vocab_size must be at least 1, got {self.vocab_size}")
        return found + self._extra_problems()

    def _extra_problems(self) -> list[str]:
        values = {name: getattr(self, name) for name in (*_DENSE, "shared_ffn_hidden", *_MLA)}
        return [
            message
            for _, message in extra_problems(
                self.architecture, self.heads, self.head_dim, self.kv_heads, values
            )
        ]

    @classmethod
    def seed(cls) -> ModelShape:
        """The seed workload: 16 layers x 16 experts, 4096 / 16384, 32 x 128 heads, top-2, bf16."""
        return cls(16, 16, 4096, 16384, 32, 128, 2, "bfloat16", vocab_size=32000)

    def replace(self, **changes: object) -> ModelShape:
        return dataclasses.replace(self, **changes)  # type: ignore[arg-type]

    @property
    def total_layers(self) -> int:
        """Every transformer block: the dense ones, then the MoE ones."""
        return self.dense_layers + self.layers

    @property
    def latent_attention(self) -> bool:
        """Multi-head latent attention (DeepSeek-V3's MLA)."""
        return self.kv_lora_rank > 0

    @property
    def key_value_heads(self) -> int:
        return self.heads if self.kv_heads is None else self.kv_heads

    @property
    def dtype_bytes(self) -> int:
        return DTYPE_BYTES[self.dtype]

    @property
    def expert_matrices(self) -> int:
        """Matrices of one expert: 2 (in, out) for SeedMLP, 3 (gate, up, down) for SwiGLU."""
        return 2 if self.architecture == "SeedMLP" else 3

    @property
    def expert_params(self) -> int:
        """Parameters of one expert: the unit a plan places and moves."""
        return self.expert_matrices * self.hidden * self.ffn_hidden

    @property
    def attn_dim(self) -> int:
        """Width of the query projection: heads x head_dim."""
        return self.heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        """Width of each of the key and value projections: kv heads x head_dim."""
        return self.key_value_heads * self.head_dim

    @property
    def attn_params(self) -> int:
        """Q, K, V and O projections of one layer (MLA: its down and up projections)."""
        if not self.latent_attention:
            return 2 * self.hidden * self.attn_dim + 2 * self.hidden * self.kv_dim
        if self.q_lora_rank:
            query = self.hidden * self.q_lora_rank + self.q_lora_rank * self.attn_dim
        else:
            query = self.hidden * self.attn_dim
        nope = self.head_dim - self.rope_head_dim
        latent = self.hidden * (self.kv_lora_rank + self.rope_head_dim)
        up = self.kv_lora_rank * self.heads * (nope + self.v_head_dim)
        return query + latent + up + self.heads * self.v_head_dim * self.hidden

    @property
    def shared_params(self) -> int:
        """Parameters of the shared expert MLP of one MoE layer (held by every rank)."""
        return 3 * self.hidden * self.shared_ffn_hidden

    @property
    def dense_mlp_params(self) -> int:
        """Parameters of the MLP of one dense layer (held by every rank)."""
        return 3 * self.hidden * self.dense_ffn_hidden

    @property
    def kv_bytes_per_token_layer(self) -> int:
        """KV cache bytes per token and layer: K and V, kv heads x head_dim each; under MLA the
        compressed latent and the rotary key."""
        if self.latent_attention:
            return (self.kv_lora_rank + self.rope_head_dim) * self.dtype_bytes
        return 2 * self.kv_dim * self.dtype_bytes

    def differences(self, other: ModelShape) -> list[tuple[str, object, object]]:
        """(field, ours, theirs) for every field where `other` disagrees."""
        return [
            (f.name, getattr(self, f.name), getattr(other, f.name))
            for f in dataclasses.fields(self)
            if getattr(self, f.name) != getattr(other, f.name)
        ]


def extra_problems(
    architecture: str,
    heads: int,
    head_dim: int,
    kv_heads: int | None,
    values: Mapping[str, int],
    names: Mapping[str, str] | None = None,
) -> list[tuple[str, str]]:
    """(field, problem) for the optional sizes `values` (`EXTRA_FIELDS`): set only where the
    architecture has them, and consistent. `names`: how messages name each ModelShape field
    (heads, head_dim, kv_heads and the optional ones; the operator passes its own fields')."""
    n = {f: f for f in ("heads", "head_dim", "kv_heads", *values)} | dict(names or {})
    found = []
    allowed = EXTRA_FIELDS.get(architecture, ())
    for name, value in values.items():
        if value < 0:
            found.append((name, f"{n[name]} must be at least 0, got {value}"))
        elif value and name not in allowed:
            users = " and ".join(a for a, fields in EXTRA_FIELDS.items() if name in fields)
            found.append((name, f"{n[name]} {value} applies to {users} only, not {architecture}"))
    dense, width = values.get("dense_layers", 0), values.get("dense_ffn_hidden", 0)
    if (dense > 0) != (width > 0):
        field = "dense_ffn_hidden" if dense else "dense_layers"
        found.append(
            (
                field,
                f"{n['dense_layers']} {dense} and {n['dense_ffn_hidden']} {width} must both be 0 "
                "or both at least 1",
            )
        )
    if "kv_lora_rank" in allowed:
        found += _mla_problems(architecture, heads, head_dim, kv_heads, values, n)
    return found


def _mla_problems(
    architecture: str,
    heads: int,
    head_dim: int,
    kv_heads: int | None,
    values: Mapping[str, int],
    n: Mapping[str, str],
) -> list[tuple[str, str]]:
    found = [
        (name, f"{n[name]} must be at least 1 for {architecture}, got {values.get(name, 0)}")
        for name in ("kv_lora_rank", "rope_head_dim", "v_head_dim")
        if values.get(name, 0) < 1
    ]
    rope = values.get("rope_head_dim", 0)
    if rope % 2 or rope > head_dim:
        found.append(
            (
                "rope_head_dim",
                f"{n['rope_head_dim']} {rope} must be even and at most {n['head_dim']} "
                f"{head_dim} (the rotary part of each query/key head)",
            )
        )
    if kv_heads not in (None, heads):
        found.append(
            (
                "kv_heads",
                f"{n['kv_heads']} {kv_heads} must equal {n['heads']} {heads}: latent attention "
                "has no key/value heads of its own",
            )
        )
    return found
