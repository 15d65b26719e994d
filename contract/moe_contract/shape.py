"""The model shape: the one torch-free description of the MoE transformer a deployment serves.

Part of the operator -> worker contract (with `moe_contract.plan` and `moe_contract.env`). The
operator converts `spec.model` to it and sets it on pods; the worker builds its model from it; the
performance model (`moe_operator.perf`) prices it. Imports nothing beyond the standard library.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

ARCHITECTURES = ("SeedMLP", "Mixtral", "Qwen3MoE")
"""SeedMLP: the seed's two-matrix GELU experts; Mixtral and Qwen3MoE: SwiGLU (3 matrices)."""
DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4}


@dataclass(frozen=True)
class ModelShape:
    """Shape of the MoE transformer. Defaults are a small CPU model; `seed()` gives the seed's."""

    layers: int = 2
    """Transformer blocks, each with attention and an MoE feed-forward."""
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
    """SeedMLP | Mixtral | Qwen3MoE."""
    kv_heads: int | None = None
    """Key/value heads (grouped-query attention); None: as many as `heads`."""
    vocab_size: int = 256
    """Token vocabulary of the embedding and the LM head."""

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
        return found

    @classmethod
    def seed(cls) -> ModelShape:
        """The seed workload: 16 layers x 16 experts, 4096 / 16384, 32 x 128 heads, top-2, bf16."""
        return cls(16, 16, 4096, 16384, 32, 128, 2, "bfloat16", vocab_size=32000)

    def replace(self, **changes: object) -> ModelShape:
        return dataclasses.replace(self, **changes)  # type: ignore[arg-type]

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
        """Q, K, V and O projections of one layer."""
        return 2 * self.hidden * self.attn_dim + 2 * self.hidden * self.kv_dim

    @property
    def kv_bytes_per_token_layer(self) -> int:
        """KV cache bytes per token and layer: K and V, kv heads x head_dim each."""
        return 2 * self.kv_dim * self.dtype_bytes

    def differences(self, other: ModelShape) -> list[tuple[str, object, object]]:
        """(field, ours, theirs) for every field where `other` disagrees."""
        return [
            (f.name, getattr(self, f.name), getattr(other, f.name))
            for f in dataclasses.fields(self)
            if getattr(self, f.name) != getattr(other, f.name)
        ]
