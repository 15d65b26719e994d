"""The dense (replicated) part of an MoE language model, for any registered architecture.

Per block: RMSNorm -> attention over the KV cache -> residual -> RMSNorm -> feed-forward ->
residual; then a final RMSNorm and the LM head. The feed-forward of the first
`shape.dense_layers` blocks is a dense MLP (`mlp`); every later block is an MoE layer: router
(`gate`) -> `MoEFn` (the routed experts, outside this module) plus, where the family has them,
its shared experts (`mlp`, every rank holds them) -> residual. Parameter names follow the Hugging
Face layout below `model.` (`layers.{i}.self_attn.q_proj.weight`), the router being
`layers.{i}.gate.weight`; each family maps them to its checkpoint names.

MoE layers are numbered apart from blocks: MoE layer l is block `dense_layers + l`. The plan, the
expert counters, the gate bias and every `MoEFn` call use the MoE layer.

A step with no tokens still calls the MoEFn of every MoE layer, in order: under expert
parallelism a rank without sequences must still join every all-to-all.

Legend: N tokens in the step, B sequences, D hidden, E experts, V vocabulary.
"""

from __future__ import annotations

from collections.abc import Callable, Generator
from typing import Any

import torch
from torch import Tensor, nn

from moe_worker.models.base import Architecture, GateBias, MoEFn, Routing, route
from moe_worker.models.config import ModelSpec
from moe_worker.models.kv_cache import KVCache, StepBatch, StepMeta
from moe_worker.models.layers import RMSNorm, rope_cos_sin
from moe_worker.models.mlp import Router

MoESteps = Callable[[int, Tensor, Routing], Generator[Any, None, Tensor]]
"""An MoE layer as a generator: (MoE layer, x [N, D], routing) -> its output [N, D], yielding
wherever it lets another micro-batch run (`moe_worker.ep.two_batch`)."""


class DecoderLayer(nn.Module):
    """One block. `gate` exists in MoE layers only; `mlp` is the dense layer's MLP, or the MoE
    layer's shared experts, or absent."""

    def __init__(self, arch: Architecture, spec: ModelSpec, block: int) -> None:
        super().__init__()
        s = spec.shape
        self.is_moe = block >= s.dense_layers
        self.input_layernorm = RMSNorm(s.hidden, spec.rms_norm_eps)
        self.self_attn = arch.attention(spec)
        self.post_attention_layernorm = RMSNorm(s.hidden, spec.rms_norm_eps)
        if self.is_moe:
            self.gate = Router(s.hidden, s.experts, sigmoid=spec.router.scoring == "sigmoid")
        mlp = arch.mlp(spec, moe=self.is_moe)
        if mlp is not None:
            self.mlp = mlp


class MoETransformer(nn.Module):
    """Token ids in, logits out; experts come from the `MoEFn` given to `forward`."""

    def __init__(self, arch: Architecture, spec: ModelSpec) -> None:
        super().__init__()
        s = spec.shape
        self.arch, self.spec = arch, spec
        self.embed_tokens = nn.Embedding(s.vocab_size, s.hidden)
        self.layers = nn.ModuleList(DecoderLayer(arch, spec, i) for i in range(s.total_layers))
        self.norm = RMSNorm(s.hidden, spec.rms_norm_eps)
        self.lm_head = nn.Linear(s.hidden, s.vocab_size, bias=False)
        if spec.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

    def forward(
        self,
        batch: StepBatch,
        cache: KVCache,
        moe: MoEFn,
        gate: GateBias | Tensor | None = None,
        *,
        meta: StepMeta | None = None,
        all_positions: bool = False,
    ) -> Tensor:
        """fp32 logits at the last new token of each sequence [B, V] (every token [N, V] if
        `all_positions`). Writes the step's K/V into `cache`.

        `gate`: the plan's gate bias (a bare [L, E] tensor: unguarded, uncounted), or None.
        `meta` is `cache.prepare(batch)`, done here if not given; an EP rank prepares it before
        the collective step, so that a full cache cannot fail between two all-to-alls.
        """
        meta = cache.prepare(batch) if meta is None else meta
        return _finish(self.forward_steps(_direct(moe), batch, cache, meta, gate, all_positions))

    def forward_steps(
        self,
        moe_steps: MoESteps,
        batch: StepBatch,
        cache: KVCache,
        meta: StepMeta,
        gate: GateBias | Tensor | None,
        all_positions: bool = False,
    ) -> Generator[Any, None, Tensor]:
        """`forward` as a generator yielding inside its MoE layers (two-batch overlap)."""
        x_ND, rope = self.embed(batch)
        for index in range(len(self.layers)):
            h_ND, r_ND, routing = self.before_experts(index, x_ND, rope, cache, meta, gate)
            routed_ND = None
            if routing is not None:
                routed_ND = yield from moe_steps(self.moe_layer(index), r_ND, routing)
            x_ND = self.after_experts(index, h_ND, r_ND, routed_ND)
        return self.logits(x_ND, batch, all_positions)

    def moe_layer(self, block: int) -> int:
        """The MoE layer of an MoE block (its index in the plan)."""
        return block - self.spec.shape.dense_layers

    def embed(self, batch: StepBatch) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        """Token embeddings [N, D] and the step's rotary cos/sin."""
        x_ND = self.embed_tokens(batch.token_ids_N)
        spec = self.spec
        rope = rope_cos_sin(
            batch.positions_N, spec.rotary_dim, spec.rope_theta, x_ND.dtype, yarn=spec.yarn
        )
        return x_ND, rope

    def before_experts(
        self,
        index: int,
        x_ND: Tensor,
        rope: tuple[Tensor, Tensor],
        cache: KVCache,
        meta: StepMeta,
        gate: GateBias | Tensor | None,
    ) -> tuple[Tensor, Tensor, Routing | None]:
        """Block `index` up to its experts: the residual stream after attention [N, D], the
        normalised input of the feed-forward [N, D], and the router's choice (None: a dense
        block, no experts)."""
        layer = self.layers[index]
        assert isinstance(layer, DecoderLayer)
        h_ND = x_ND + layer.self_attn(layer.input_layernorm(x_ND), rope, cache, index, meta)
        r_ND = layer.post_attention_layernorm(h_ND)
        if not layer.is_moe:
            return h_ND, r_ND, None
        router, spec = layer.gate, self.spec
        assert isinstance(router, Router)
        logits_NE, top_k, bias = router(r_ND), spec.shape.top_k, GateBias.of(gate)
        options: dict[str, Any] = {
            "normalize": spec.norm_topk_prob,
            "router": spec.router,
            "correction_E": router.correction_E,
        }
        if bias is None:
            return h_ND, r_ND, route(logits_NE, top_k, **options)
        return h_ND, r_ND, bias.route(self.moe_layer(index), logits_NE, top_k, **options)

    def after_experts(
        self, index: int, h_ND: Tensor, r_ND: Tensor, routed_ND: Tensor | None
    ) -> Tensor:
        """The residual stream after block `index`: its routed experts' output (None in a dense
        block) plus its dense MLP or shared experts, added as transformers adds them."""
        layer = self.layers[index]
        mlp = getattr(layer, "mlp", None)
        if routed_ND is None:
            assert mlp is not None, f"dense block {index} has no MLP"
            return h_ND + mlp(r_ND)
        if mlp is None:
            return h_ND + routed_ND
        return h_ND + (routed_ND + mlp(r_ND))

    def logits(self, x_ND: Tensor, batch: StepBatch, all_positions: bool = False) -> Tensor:
        """fp32 logits at each sequence's last new token [B, V] (every token [N, V] if asked)."""
        if not all_positions:
            x_ND = x_ND[batch.last_index_B()]
        return self.lm_head(self.norm(x_ND)).float()

    def keep_fp32_(self) -> MoETransformer:
        """Sigmoid routers back to fp32 after a cast of the whole model (see `Router`)."""
        for module in self.modules():
            if isinstance(module, Router) and module.keep_fp32:
                module.float()
        return self


def _direct(moe: MoEFn) -> MoESteps:
    """A plain MoEFn as an MoE-layer generator that never yields."""

    def steps(layer: int, x_ND: Tensor, routing: Routing) -> Generator[Any, None, Tensor]:
        y_ND = moe(layer, x_ND, routing)
        yield from ()
        return y_ND

    return steps


def _finish(steps: Generator[Any, None, Tensor]) -> Tensor:
    """Run a forward generator to its end."""
    while True:
        try:
            next(steps)
        except StopIteration as done:
            return done.value  # type: ignore[no-any-return]


def materialize(model: MoETransformer, device: torch.device | str) -> MoETransformer:
    """Storage for a model built on the meta device (no wasted random init); ties re-applied."""
    model = model.to_empty(device=device)
    if model.spec.tie_word_embeddings:
        model.lm_head.weight = model.embed_tokens.weight
    return model
