"""What every architecture shares: expert weights, routing, and the `Architecture` interface a
family implements in its own file (config parsing, checkpoint names, expert forward, attention).

The experts are never part of the model's nn.Module: each MoE layer calls an injected `MoEFn`,
which runs them locally (`LocalExperts`) or over all-to-all (`moe_worker.ep.engine.EPEngine`). One
`Routing` type and one combine (`weighted_sum`) serve every layout, so all of them round alike.

Legend: N tokens, D hidden, F expert ffn hidden, E experts, K top-k.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

import torch
from torch import Tensor

from moe_contract.shape import ModelShape
from moe_worker.models.config import ModelSpec
from moe_worker.models.routing import Reroutes, Selection, price, select

if TYPE_CHECKING:
    from moe_worker.models.grouped import SlotGroups
    from moe_worker.models.layers import Attention

__all__ = [
    "DTYPES",
    "Architecture",
    "ExpertWeights",
    "GateBias",
    "MoEFn",
    "PriceCounters",
    "Reroutes",
    "Routing",
    "generator_for",
    "route",
    "route_priced",
    "torch_dtype",
    "weighted_sum",
]

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def torch_dtype(shape: ModelShape) -> torch.dtype:
    return DTYPES[shape.dtype]


def generator_for(seed: int, name: str) -> torch.Generator:
    """A CPU generator keyed by (seed, name); stable across processes and Python hash seeds."""
    digest = hashlib.sha256(f"{seed}/{name}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))


@dataclass(frozen=True)
class Routing:
    """The gate's decision for N tokens: which K experts each visits and with what weight."""

    topk_ids_NK: Tensor
    topk_weights_NK: Tensor


class MoEFn(Protocol):
    """Runs the experts of `layer`: x [N, D] and its routing -> combined output [N, D]."""

    def __call__(self, layer: int, x_ND: Tensor, routing: Routing) -> Tensor: ...


def weighted_sum(y_NKD: Tensor, weights_NK: Tensor) -> Tensor:
    """The combine step shared by every layout, so all of them round identically.

    One batched [1, K] x [K, D] product per token: no [N, K, D] temporary (the multiply then
    sum it replaces cost a third more CPU time at the bench's shapes)."""
    w_N1K = weights_NK.unsqueeze(1).to(y_NKD.dtype)
    return torch.bmm(w_N1K, y_NKD).squeeze(1)


@dataclass(frozen=True)
class ExpertWeights:
    """One expert: all of its matrices, in its family's order (`Architecture.expert_matrices`).

    The unit a plan places and moves: `flat()` is one contiguous buffer for a single
    point-to-point message, `from_flat()` its inverse given the family's matrix shapes.
    """

    matrices: tuple[Tensor, ...]

    def to(self, device: torch.device | str, dtype: torch.dtype) -> ExpertWeights:
        return ExpertWeights(tuple(m.to(device, dtype) for m in self.matrices))

    def flat(self) -> Tensor:
        return torch.cat([m.reshape(-1) for m in self.matrices])

    @classmethod
    def from_flat(cls, buffer: Tensor, shapes: Sequence[tuple[int, int]]) -> ExpertWeights:
        sizes = [rows * cols for rows, cols in shapes]
        if buffer.numel() != sum(sizes):
            raise ValueError(f"expert buffer has {buffer.numel()} values, shapes need {sum(sizes)}")
        parts = buffer.split(sizes)
        return cls(tuple(p.view(shape) for p, shape in zip(parts, shapes, strict=True)))


def route(
    logits_NE: Tensor,
    top_k: int,
    *,
    normalize: bool = True,
    gate_bias_E: Tensor | None = None,
    max_margin: float | None = None,
) -> Routing:
    """Top-K of the fp32 softmax over all experts.

    `gate_bias_E` moves the selection only, and only for tokens whose K-th and (K+1)-th
    probabilities are closer than `max_margin` (None: every token; see `models.routing`); the
    weights are the unbiased probabilities of the chosen experts, renormalised over the top-K
    when `normalize` (Mixtral; Qwen3 norm_topk_prob). Weights stay fp32: the combine casts them,
    as transformers multiplies fp32 weights in.
    """
    probs_NE = torch.softmax(logits_NE.float(), dim=-1)
    selection = select(probs_NE, top_k, gate_bias_E, max_margin)
    return _weighted(probs_NE, selection, normalize)


def route_priced(
    logits_NE: Tensor,
    top_k: int,
    *,
    normalize: bool = True,
    gate_bias_E: Tensor | None = None,
    max_margin: float | None = None,
) -> tuple[Routing, Reroutes]:
    """`route`, and what the bias cost: rerouted assignments and lost gate probability per token
    (zeros without a bias), for the per-layer `moe_gate_rerouted_*` counters."""
    probs_NE = torch.softmax(logits_NE.float(), dim=-1)
    selection = select(probs_NE, top_k, gate_bias_E, max_margin)
    return _weighted(probs_NE, selection, normalize), price(probs_NE, selection)


class PriceCounters:
    """What the gate bias cost, per layer, summed over every token this rank routed under one:
    rerouted top-K assignments and the gate probability they lost. Never reset (they back the
    `moe_gate_rerouted_*` counters); kept on the tokens' device, so adding to them never makes
    the host wait, and read whole at scrape time."""

    def __init__(self, num_layers: int, device: torch.device | str = "cpu") -> None:
        self.rerouted_L = torch.zeros(num_layers, dtype=torch.int64, device=device)
        self.lost_weight_L = torch.zeros(num_layers, dtype=torch.float64, device=device)

    def add(self, layer: int, reroutes: Reroutes) -> None:
        self.rerouted_L[layer] += reroutes.rerouted_N.sum()
        self.lost_weight_L[layer] += reroutes.lost_weight_N.sum().double()

    def read(self) -> tuple[list[int], list[float]]:
        """(rerouted assignments [L], lost gate probability [L]) so far."""
        return self.rerouted_L.tolist(), self.lost_weight_L.tolist()


@dataclass(frozen=True)
class GateBias:
    """A plan's gate bias as the model applies it: the values, the guard, where the price goes.

    A bare bias tensor (tests, the single-process generator) is the same with no guard and
    nothing counted."""

    bias_LE: Tensor
    """[L, E] fp32, added to the gate probabilities for selection only."""
    max_margin: float | None = None
    """The plan's gateMaxMargin (None: the bias acts on every token)."""
    counters: PriceCounters | None = None
    """Where each layer's price is added (None: not counted)."""

    @classmethod
    def of(cls, gate: GateBias | Tensor | None) -> GateBias | None:
        return cls(gate) if isinstance(gate, Tensor) else gate

    def route(self, layer: int, logits_NE: Tensor, top_k: int, *, normalize: bool) -> Routing:
        """The layer's routing under this bias; its price added to `counters`."""
        bias_E, margin = self.bias_LE[layer], self.max_margin
        if self.counters is None:
            return route(
                logits_NE, top_k, normalize=normalize, gate_bias_E=bias_E, max_margin=margin
            )
        routing, reroutes = route_priced(
            logits_NE, top_k, normalize=normalize, gate_bias_E=bias_E, max_margin=margin
        )
        self.counters.add(layer, reroutes)
        return routing


def _weighted(probs_NE: Tensor, selection: Selection, normalize: bool) -> Routing:
    weights_NK = torch.gather(probs_NE, 1, selection.topk_ids_NK)
    if normalize:
        weights_NK = weights_NK / weights_NK.sum(-1, keepdim=True)
    return Routing(selection.topk_ids_NK, weights_NK)


class Architecture:
    """One model family. Subclasses (one file each) fill in the class attributes and methods.

    Parameter names used here are the dense module's own (`MoETransformer.state_dict()` keys);
    `checkpoint_keys` maps them to the names a checkpoint stores them under.
    """

    name: ClassVar[str]
    """The `ModelShape.architecture` value."""
    hf_architectures: ClassVar[tuple[str, ...]]
    """config.json `architectures` entries (and `model_type`) this family reads."""
    expert_matrices: ClassVar[tuple[str, ...]]
    """Names of one expert's matrices, in `ExpertWeights` order."""

    def parse_config(self, config: Mapping[str, Any]) -> ModelSpec:
        """A spec from a Hugging Face config.json; UnsupportedConfig for what cannot be exact."""
        raise NotImplementedError

    def to_config(self, spec: ModelSpec) -> dict[str, Any]:
        """A config.json for `spec`, for families whose checkpoints we write (SeedMLP)."""
        raise NotImplementedError(f"{self.name} checkpoints come from Hugging Face, not from us")

    def default_spec(self, shape: ModelShape, max_context: int = 4096) -> ModelSpec:
        """The spec of a synthetic model of `shape` (no checkpoint): the family's defaults."""
        raise NotImplementedError

    def expert_shapes(self, shape: ModelShape) -> tuple[tuple[int, int], ...]:
        """[rows, cols] of each expert matrix, in `expert_matrices` order."""
        raise NotImplementedError

    def expert_forward(self, x_ND: Tensor, weights: ExpertWeights) -> Tensor:
        """One expert on its tokens: [N, D] -> [N, D]."""
        raise NotImplementedError

    def grouped_forward(self, x_ND: Tensor, stacks: Sequence[Tensor], groups: SlotGroups) -> Tensor:
        """Every local slot's expert on its rows at once: rows grouped by slot [N, D] -> [N, D].

        `stacks` holds one tensor per `expert_matrices` entry, slot first ([S, rows, cols]);
        slot s on its rows computes exactly what `expert_forward` does for that expert.
        """
        raise NotImplementedError

    def attention(self, spec: ModelSpec) -> Attention:
        """The family's attention module for one layer."""
        raise NotImplementedError

    def router_keys(self, layer: int) -> tuple[str, ...]:
        """Checkpoint names of the layer's router (gate) weight [E, D], the first found wins."""
        raise NotImplementedError

    def checkpoint_keys(self, name: str, spec: ModelSpec) -> tuple[str, ...]:
        """Checkpoint names a dense parameter may be stored under, the first found wins.

        The Hugging Face layout: everything below `model.` except the LM head, which is the
        embedding when tied, and the router, whose place differs by family.
        """
        if name == "lm_head.weight":
            return ("model.embed_tokens.weight",) if spec.tie_word_embeddings else (name,)
        router = re.fullmatch(r"layers\.(\d+)\.gate\.weight", name)
        if router:
            return self.router_keys(int(router[1]))
        return (f"model.{name}",)

    def expert_keys(self, layer: int, expert: int) -> tuple[str, ...]:
        """Per-expert checkpoint names (the hub format), one per matrix."""
        raise NotImplementedError

    def fused_expert_keys(self, layer: int) -> tuple[str, ...] | None:
        """Names of the layer's stacked expert tensors ([E, ...] each), if the family has them."""
        return None

    def expert_from_fused(self, slices: Sequence[Tensor]) -> ExpertWeights:
        """One expert from its [e] slices of `fused_expert_keys`."""
        raise NotImplementedError(f"{self.name} has no fused expert format")

    def synthetic_expert_name(self, layer: int, expert: int, matrix: str) -> str:
        """The name seeding a synthetic expert matrix (the seed model's `expert_key` scheme)."""
        return f"layers.{layer}.experts.{expert}.{matrix}"
