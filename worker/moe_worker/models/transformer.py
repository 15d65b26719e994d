"""The dense (replicated) part of an MoE language model, for any registered architecture.

Per layer: RMSNorm -> attention over the KV cache -> residual -> RMSNorm -> router -> `MoEFn`
(the experts, outside this module) -> residual; then a final RMSNorm and the LM head. Parameter
names follow the Hugging Face layout below `model.` (`layers.{i}.self_attn.q_proj.weight`), the
router being `layers.{i}.gate.weight`; each family maps them to its checkpoint names.

A step with no tokens still calls the MoEFn of every layer, in order: under expert parallelism a
rank without sequences must still join every all-to-all.

Legend: N tokens in the step, B sequences, D hidden, E experts, L layers, V vocabulary.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from moe_worker.models.base import Architecture, GateBias, MoEFn, Routing, route
from moe_worker.models.config import ModelSpec
from moe_worker.models.kv_cache import KVCache, StepBatch, StepMeta
from moe_worker.models.layers import RMSNorm, rope_cos_sin


class DecoderLayer(nn.Module):
    def __init__(self, arch: Architecture, spec: ModelSpec) -> None:
        super().__init__()
        s = spec.shape
        self.input_layernorm = RMSNorm(s.hidden, spec.rms_norm_eps)
        self.self_attn = arch.attention(spec)
        self.post_attention_layernorm = RMSNorm(s.hidden, spec.rms_norm_eps)
        self.gate = nn.Linear(s.hidden, s.experts, bias=False)


class MoETransformer(nn.Module):
    """Token ids in, logits out; experts come from the `MoEFn` given to `forward`."""

    def __init__(self, arch: Architecture, spec: ModelSpec) -> None:
        super().__init__()
        s = spec.shape
        self.arch, self.spec = arch, spec
        self.embed_tokens = nn.Embedding(s.vocab_size, s.hidden)
        self.layers = nn.ModuleList(DecoderLayer(arch, spec) for _ in range(s.layers))
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
        x_ND, rope = self.embed(batch)
        for index in range(len(self.layers)):
            h_ND, r_ND, routing = self.before_experts(index, x_ND, rope, cache, meta, gate)
            x_ND = h_ND + moe(index, r_ND, routing)
        return self.logits(x_ND, batch, all_positions)

    # The three pieces of `forward`, for runtimes that interleave micro-batches between the
    # attention and the experts of a layer (`moe_worker.ep.two_batch`); same operations, same order.

    def embed(self, batch: StepBatch) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        """Token embeddings [N, D] and the step's rotary cos/sin."""
        x_ND = self.embed_tokens(batch.token_ids_N)
        s = self.spec.shape
        rope = rope_cos_sin(batch.positions_N, s.head_dim, self.spec.rope_theta, x_ND.dtype)
        return x_ND, rope

    def before_experts(
        self,
        index: int,
        x_ND: Tensor,
        rope: tuple[Tensor, Tensor],
        cache: KVCache,
        meta: StepMeta,
        gate: GateBias | Tensor | None,
    ) -> tuple[Tensor, Tensor, Routing]:
        """Layer `index` up to its experts: the residual stream after attention [N, D], the
        normalised input of the experts [N, D], and the router's choice."""
        layer = self.layers[index]
        assert isinstance(layer, DecoderLayer)
        h_ND = x_ND + layer.self_attn(layer.input_layernorm(x_ND), rope, cache, index, meta)
        r_ND = layer.post_attention_layernorm(h_ND)
        logits_NE, top_k = layer.gate(r_ND), self.spec.shape.top_k
        bias = GateBias.of(gate)
        if bias is None:
            routing = route(logits_NE, top_k, normalize=self.spec.norm_topk_prob)
        else:
            routing = bias.route(index, logits_NE, top_k, normalize=self.spec.norm_topk_prob)
        return h_ND, r_ND, routing

    def logits(self, x_ND: Tensor, batch: StepBatch, all_positions: bool = False) -> Tensor:
        """fp32 logits at each sequence's last new token [B, V] (every token [N, V] if asked)."""
        if not all_positions:
            x_ND = x_ND[batch.last_index_B()]
        return self.lm_head(self.norm(x_ND)).float()


def materialize(model: MoETransformer, device: torch.device | str) -> MoETransformer:
    """Storage for a model built on the meta device (no wasted random init); ties re-applied."""
    model = model.to_empty(device=device)
    if model.spec.tie_word_embeddings:
        model.lm_head.weight = model.embed_tokens.weight
    return model
