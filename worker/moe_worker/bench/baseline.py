"""The seed's baseline layout of the same model and weights: tensor parallel x pipeline parallel.

Megatron-style: attention is column-parallel over heads (q/k/v rows) and row-parallel on the output
projection (o_proj columns); every expert is column-parallel on its ffn dimension (the rows of its
input matrices) and row-parallel back (the columns of its last matrix); one all-reduce over the TP
group after each row-parallel part. All experts of a layer sit on every TP rank (colocated, seed
section 2.3). Pipeline stages own contiguous layer ranges and pass micro-batches point to point
(GPipe-style fill and drain). A forward is a prefill of whole prompts into a fresh KV cache.

Rank layout: rank = stage * tp + tp_rank. Every rank calls `TPPPModel(...)` (it creates the groups).

Legend: N tokens, B sequences, D hidden, V vocabulary.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist
from torch import Tensor

from moe_worker.models import ExpertWeights, LocalExperts, route
from moe_worker.models.kv_cache import KVCache, StepBatch, StepMeta
from moe_worker.models.layers import Attention, rope_cos_sin
from moe_worker.models.transformer import DecoderLayer
from moe_worker.models.weights import WeightSource, build_model, serving_dtype


def tp_expert(weights: ExpertWeights, tp: int, index: int) -> ExpertWeights:
    """This TP rank's part of one expert: rows of its input matrices (all but the last, [F, D]),
    columns of its output matrix (the last, [D, F]); the partial outputs sum to the expert's."""
    *inputs, output = weights.matrices
    rows = [m.tensor_split(tp, dim=0)[index].contiguous() for m in inputs]
    return ExpertWeights((*rows, output.tensor_split(tp, dim=1)[index].contiguous()))


class TPPPModel:
    """This rank's stage of the TP x PP layout."""

    def __init__(
        self,
        source: WeightSource,
        *,
        tp: int,
        pp: int,
        device: torch.device | str = "cpu",
        dtype: torch.dtype | None = None,
    ) -> None:
        rank, world = dist.get_rank(), dist.get_world_size()
        s = source.spec.shape
        if tp * pp != world:
            raise ValueError(f"tp {tp} x pp {pp} != world size {world}")
        if s.heads % tp or s.key_value_heads % tp or s.ffn_hidden % tp:
            raise ValueError(f"heads, kv heads and ffn ({s.ffn_hidden}) must divide by tp {tp}")
        self.spec, self.arch, self.tp, self.pp = source.spec, source.arch, tp, pp
        self.stage, self.tp_rank = divmod(rank, tp)
        self.device, self.dtype = torch.device(device), serving_dtype(source, dtype)
        groups = [dist.new_group(list(range(i * tp, (i + 1) * tp))) for i in range(pp)]
        self.tp_group = groups[self.stage]
        self.layer_ids = torch.arange(s.layers).tensor_split(pp)[self.stage].tolist()
        self.dense = build_model(source, self.device, self.dtype)  # norms, gates, embeddings
        local = s.replace(heads=s.heads // tp, kv_heads=s.key_value_heads // tp)
        self.local_shape = local
        self.attention = [self._tp_attention(i) for i in self.layer_ids]
        experts = [
            [tp_expert(source.expert(i, e), tp, self.tp_rank) for e in range(s.experts)]
            for i in self.layer_ids
        ]
        self.experts = LocalExperts(
            self.arch, [[w.to(self.device, self.dtype) for w in layer] for layer in experts]
        )

    def _tp_attention(self, layer: int) -> Attention:
        full = self.dense.layers[layer].self_attn
        hd, i = self.spec.shape.head_dim, self.tp_rank
        q_rows = slice(i * self.local_shape.heads * hd, (i + 1) * self.local_shape.heads * hd)
        kv = self.local_shape.key_value_heads * hd
        kv_rows = slice(i * kv, (i + 1) * kv)
        state = {
            name: value
            for name, value in full.state_dict().items()
            if not name.endswith("_proj.weight")  # per-head norms (Qwen3) are shared
        }
        state["q_proj.weight"] = full.q_proj.weight[q_rows]
        state["k_proj.weight"] = full.k_proj.weight[kv_rows]
        state["v_proj.weight"] = full.v_proj.weight[kv_rows]
        state["o_proj.weight"] = full.o_proj.weight[:, q_rows]
        attention = self.arch.attention(self.spec.replace(shape=self.local_shape))
        attention.load_state_dict({k: v.clone() for k, v in state.items()})
        return attention.to(self.device, self.dtype)

    def _all_reduce(self, x: Tensor) -> Tensor:
        if self.tp > 1:
            dist.all_reduce(x, group=self.tp_group)
        return x

    def _layer(
        self, index: int, x_ND: Tensor, rope: tuple[Tensor, Tensor], cache: KVCache, meta: StepMeta
    ) -> Tensor:
        layer = self.dense.layers[self.layer_ids[index]]
        assert isinstance(layer, DecoderLayer)
        attn = self.attention[index](layer.input_layernorm(x_ND), rope, cache, index, meta)
        h_ND = x_ND + self._all_reduce(attn)  # row-parallel: partial sums over heads
        r_ND = layer.post_attention_layernorm(h_ND)
        s = self.spec.shape
        routing = route(layer.gate(r_ND), s.top_k, normalize=self.spec.norm_topk_prob)
        return h_ND + self._all_reduce(self.experts(index, r_ND, routing))  # partial over F

    @torch.no_grad()
    def forward(self, prompts: Sequence[Sequence[int]], micro_batches: int) -> Tensor | None:
        """Collective: every rank passes the same prompts; the last stage returns the logits at
        each prompt's last token [B, V] (fp32)."""
        rank = dist.get_rank()
        prev, nxt = rank - self.tp, rank + self.tp
        last = self.stage == self.pp - 1
        s = self.local_shape
        sends, outputs = [], []
        for part in torch.arange(len(prompts)).tensor_split(micro_batches):
            if part.numel() == 0:
                continue
            items = [(int(i), list(prompts[int(i)]), 0) for i in part]
            batch = StepBatch.build(items, self.device)
            cache = KVCache(
                layers=len(self.layer_ids),
                kv_heads=s.key_value_heads,
                head_dim=s.head_dim,
                tokens=max(batch.num_tokens + 16 * len(items), 16),
                dtype=self.dtype,
                device=self.device,
            )
            meta = cache.prepare(batch)
            rope = rope_cos_sin(batch.positions_N, s.head_dim, self.spec.rope_theta, self.dtype)
            if self.stage == 0:
                x_ND = self.dense.embed_tokens(batch.token_ids_N)
            else:
                x_ND = torch.empty(batch.num_tokens, s.hidden, dtype=self.dtype, device=self.device)
                dist.recv(x_ND, prev)
            for index in range(len(self.layer_ids)):
                x_ND = self._layer(index, x_ND, rope, cache, meta)
            if last:
                x_BD = x_ND[batch.last_index_B()]
                outputs.append(self.dense.lm_head(self.dense.norm(x_BD)).float())
            else:
                sends.append((dist.isend(x_ND.contiguous(), nxt), x_ND))  # keep x alive
        for request, _ in sends:
            request.wait()
        return torch.cat(outputs) if last else None
