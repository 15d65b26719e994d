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
from torch import Tensor, nn

from moe_contract.shape import ModelShape
from moe_worker.models.config import ConfigReader, ModelSpec, RouterSpec, read_spec
from moe_worker.models.layers import Attention
from moe_worker.models.routing import (
    Reroutes,
    Selection,
    group_limited,
    price,
    select,
    select_scores,
)

if TYPE_CHECKING:
    from moe_worker.models.grouped import SlotGroups

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


SOFTMAX = RouterSpec()


def route(
    logits_NE: Tensor,
    top_k: int,
    *,
    normalize: bool = True,
    gate_bias_E: Tensor | None = None,
    max_margin: float | None = None,
    router: RouterSpec = SOFTMAX,
    correction_E: Tensor | None = None,
) -> Routing:
    """The gate's choice, as transformers computes it for `router` (see `RouterSpec`).

    softmax: top-K of the fp32 softmax over all experts, weights the chosen probabilities,
    renormalised over the top-K when `normalize` (Mixtral; Qwen norm_topk_prob). sigmoid: the
    fp32 sigmoid scores plus the checkpoint's `correction_E`, top-K within the best groups,
    weights the chosen unbiased scores (renormalised when `normalize`) times the scaling factor.

    `gate_bias_E` (the plan's) moves the selection only, added to the probabilities (softmax) or
    to the correction bias (sigmoid), and only for tokens whose K-th and (K+1)-th selection
    scores are closer than `max_margin` (None: every token; see `models.routing`); the weights
    stay those of the unbiased scores. Weights stay fp32: the combine casts them, as
    transformers multiplies fp32 weights in.
    """
    return _route(logits_NE, top_k, normalize, gate_bias_E, max_margin, router, correction_E)[0]


def route_priced(
    logits_NE: Tensor,
    top_k: int,
    *,
    normalize: bool = True,
    gate_bias_E: Tensor | None = None,
    max_margin: float | None = None,
    router: RouterSpec = SOFTMAX,
    correction_E: Tensor | None = None,
) -> tuple[Routing, Reroutes]:
    """`route`, and what the bias cost: rerouted assignments and lost gate probability (sigmoid
    scores for a sigmoid router) per token (zeros without a bias), for the per-layer
    `moe_gate_rerouted_*` counters."""
    routing, selection, scores_NE = _route(
        logits_NE, top_k, normalize, gate_bias_E, max_margin, router, correction_E
    )
    return routing, price(scores_NE, selection)


def _route(
    logits_NE: Tensor,
    top_k: int,
    normalize: bool,
    gate_bias_E: Tensor | None,
    max_margin: float | None,
    router: RouterSpec,
    correction_E: Tensor | None,
) -> tuple[Routing, Selection, Tensor]:
    """The routing, its selection and the scores a price is counted in."""
    if router.scoring == "softmax":
        probs_NE = torch.softmax(logits_NE.float(), dim=-1)
        selection = select(probs_NE, top_k, gate_bias_E, max_margin)
        return _weighted(probs_NE, selection, normalize), selection, probs_NE
    scores_NE = logits_NE.float().sigmoid()
    choice_NE = scores_NE if correction_E is None else scores_NE + correction_E.float()
    own_NE = group_limited(choice_NE, router.n_group, router.topk_group)
    biased_NE = None
    if gate_bias_E is not None:
        biased_NE = group_limited(
            choice_NE + gate_bias_E.float(), router.n_group, router.topk_group
        )
    selection = select_scores(own_NE, top_k, biased_NE, max_margin)
    weights_NK = torch.gather(scores_NE, 1, selection.topk_ids_NK)
    if normalize:
        weights_NK = weights_NK / (weights_NK.sum(-1, keepdim=True) + 1e-20)
    weights_NK = weights_NK * router.routed_scaling_factor
    return Routing(selection.topk_ids_NK, weights_NK), selection, scores_NE


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
    """[L, E] fp32 (L: the MoE layers), added to the gate probabilities (a sigmoid router: to
    its correction bias) for selection only."""
    max_margin: float | None = None
    """The plan's gateMaxMargin (None: the bias acts on every token)."""
    counters: PriceCounters | None = None
    """Where each layer's price is added (None: not counted)."""

    @classmethod
    def of(cls, gate: GateBias | Tensor | None) -> GateBias | None:
        return cls(gate) if isinstance(gate, Tensor) else gate

    def route(
        self,
        layer: int,
        logits_NE: Tensor,
        top_k: int,
        *,
        normalize: bool,
        router: RouterSpec = SOFTMAX,
        correction_E: Tensor | None = None,
    ) -> Routing:
        """The MoE layer's routing under this bias; its price added to `counters`."""
        bias_E, margin = self.bias_LE[layer], self.max_margin
        routing, selection, scores_NE = _route(
            logits_NE, top_k, normalize, bias_E, margin, router, correction_E
        )
        if self.counters is not None:
            self.counters.add(layer, price(scores_NE, selection))
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

    config_reader: ClassVar[ConfigReader]
    """Where the family's config.json keeps the common fields, and its defaults."""

    def parse_config(self, config: Mapping[str, Any]) -> ModelSpec:
        """A spec from a Hugging Face config.json; UnsupportedConfig for what cannot be exact.

        The same for every family: `check_config`, then `read_spec` with the family's reader,
        its extra shape sizes (`config_sizes`) and spec details (`config_details`)."""
        self.check_config(config)
        return read_spec(
            config,
            self.name,
            self.config_reader,
            self.config_sizes(config),
            **self.config_details(config),
        )

    def check_config(self, config: Mapping[str, Any]) -> None:
        """Refuse what the reader's `required` fields cannot say (UnsupportedConfig)."""

    def config_sizes(self, config: Mapping[str, Any]) -> dict[str, int]:
        """The family's ModelShape sizes beyond the common ones (dense layers, MLA, ...)."""
        return {}

    def config_details(self, config: Mapping[str, Any]) -> dict[str, Any]:
        """The family's ModelSpec fields beyond the common ones (router, attention details)."""
        return {}

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

    def attention(self, spec: ModelSpec) -> nn.Module:
        """The family's attention module for one layer: forward(x, rope, cache, block, meta)."""
        return Attention(spec)

    def mlp(self, spec: ModelSpec, *, moe: bool) -> nn.Module | None:
        """The dense feed-forward every rank holds in a block: a dense block's MLP, or an MoE
        block's shared experts (added to its routed experts' output); None: nothing."""
        return None

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
        router = re.fullmatch(r"layers\.(\d+)\.gate\.(\w+)", name)
        if router and router[2] == "weight":
            return self.router_keys(int(router[1]))
        if router:  # the sigmoid routers' e_score_correction_bias
            return (f"model.layers.{router[1]}.mlp.gate.{router[2]}",)
        return (f"model.{name}",)

    def expert_keys(self, layer: int, expert: int) -> tuple[str, ...]:
        """Per-expert checkpoint names (the hub format), one per matrix; `layer` is the block."""
        raise NotImplementedError

    def fused_expert_keys(self, layer: int) -> tuple[str, ...] | None:
        """Names of the block's stacked expert tensors ([E, ...] each), if the family has them."""
        return None

    def expert_from_fused(self, slices: Sequence[Tensor]) -> ExpertWeights:
        """One expert from its [e] slices of `fused_expert_keys`."""
        raise NotImplementedError(f"{self.name} has no fused expert format")

    def synthetic_expert_name(self, layer: int, expert: int, matrix: str) -> str:
        """The name seeding a synthetic expert matrix (the seed model's `expert_key` scheme)."""
        return f"layers.{layer}.experts.{expert}.{matrix}"
