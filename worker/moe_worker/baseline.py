"""The seed's baseline layout of the same model and weights: tensor parallel x pipeline parallel.

Megatron-style: attention is column-parallel over heads (wq/wk/wv rows) and row-parallel on the
output projection (wo columns); every expert is column-parallel on its ffn dimension (w_in rows) and
row-parallel back (w_out columns); one all-reduce over the TP group after each row-parallel part.
All experts of a layer sit on every TP rank (colocated, seed section 2.3). Pipeline stages own
contiguous layer ranges and pass micro-batches point-to-point (GPipe-style fill and drain).

Rank layout: rank = stage * tp + tp_rank. Every rank calls `TPPPModel(...)` (it creates the groups).

Legend: B sequences, T tokens, N tokens, D hidden, F ffn, E experts, K top-k, Hd head dim.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

from moe_worker.model import (
    ExpertSource,
    ExpertWeights,
    RMSNorm,
    build_transformer,
    causal_attention,
    route,
    torch_dtype,
    weighted_sum,
)
from moe_worker.shape import ModelShape


@dataclass(frozen=True)
class TPLayer:
    """One layer's weights as held by one TP rank."""

    attention_norm: RMSNorm
    ffn_norm: RMSNorm
    wq: Tensor  # [local heads * Hd, D]
    wk: Tensor
    wv: Tensor
    wo: Tensor  # [D, local heads * Hd]
    gate: Tensor  # [E, D], replicated
    experts: tuple[ExpertWeights, ...]  # each [F/tp, D] and [D, F/tp]


class TPPPModel:
    """This rank's stage of the TP x PP layout."""

    def __init__(
        self,
        config: ModelShape,
        *,
        tp: int,
        pp: int,
        device: torch.device | str = "cpu",
        seed: int = 0,
        checkpoint: str | None = None,
    ) -> None:
        rank, world = dist.get_rank(), dist.get_world_size()
        if tp * pp != world:
            raise ValueError(f"tp {tp} x pp {pp} != world size {world}")
        if config.heads % tp or config.ffn_hidden % tp:
            raise ValueError(
                f"heads {config.heads} and ffn {config.ffn_hidden} must divide by tp {tp}"
            )
        self.config, self.tp, self.pp = config, tp, pp
        self.stage, self.tp_rank = divmod(rank, tp)
        self.device = torch.device(device)
        groups = [dist.new_group(list(range(s * tp, (s + 1) * tp))) for s in range(pp)]
        self.tp_group = groups[self.stage]
        self.layer_ids = torch.arange(config.layers).tensor_split(pp)[self.stage].tolist()
        self.layers = self._shard(seed, checkpoint)

    def _shard(self, seed: int, checkpoint: str | None) -> list[TPLayer]:
        c, tp, i = self.config, self.tp, self.tp_rank
        dtype = torch_dtype(c)
        dense = build_transformer(c, seed, self.device, checkpoint)
        source = ExpertSource(c, seed, checkpoint)
        width, ffn = c.heads * c.head_dim // tp, c.ffn_hidden // tp
        rows, cols = slice(i * width, (i + 1) * width), slice(i * ffn, (i + 1) * ffn)
        layers = []
        for layer in self.layer_ids:
            block = dense.layers[layer]
            attn = block.attention
            experts = []
            for e in range(c.experts):
                w = source.load(layer, e).to(self.device, dtype)
                experts.append(ExpertWeights(w.w_in_FD[cols].clone(), w.w_out_DF[:, cols].clone()))
            layers.append(
                TPLayer(
                    block.attention_norm,
                    block.ffn_norm,
                    attn.wq.weight[rows].clone(),
                    attn.wk.weight[rows].clone(),
                    attn.wv.weight[rows].clone(),
                    attn.wo.weight[:, rows].clone(),
                    block.gate.weight,
                    tuple(experts),
                )
            )
        return layers

    def _all_reduce(self, x: Tensor) -> Tensor:
        if self.tp > 1:
            dist.all_reduce(x, group=self.tp_group)
        return x

    def _layer(self, layer: TPLayer, x_BTD: Tensor) -> Tensor:
        b, t, d = x_BTD.shape
        heads = self.config.heads // self.tp
        o = causal_attention(layer.attention_norm(x_BTD), layer.wq, layer.wk, layer.wv, heads)
        h_BTD = x_BTD + self._all_reduce(o @ layer.wo.T)  # row-parallel: partial sums over heads
        r_ND = layer.ffn_norm(h_BTD).reshape(b * t, d)
        routing = route(r_ND @ layer.gate.T, self.config.top_k)
        n, k = routing.topk_ids_NK.shape
        ids_A = routing.topk_ids_NK.reshape(-1)
        y_AD = torch.zeros(n * k, d, dtype=r_ND.dtype, device=r_ND.device)
        for expert in ids_A.unique().tolist():
            rows_A = (ids_A == expert).nonzero().squeeze(1)
            w = layer.experts[expert]
            y_AD[rows_A] = F.gelu(r_ND[rows_A // k] @ w.w_in_FD.T) @ w.w_out_DF.T  # partial over F
        y_ND = self._all_reduce(weighted_sum(y_AD.view(n, k, d), routing.topk_weights_NK))
        return h_BTD + y_ND.view(b, t, d)

    @torch.no_grad()
    def forward(self, x_BTD: Tensor, micro_batches: int) -> Tensor | None:
        """Collective: every rank passes the same batch; the last stage returns the output."""
        dtype = torch_dtype(self.config)
        chunks = x_BTD.to(self.device, dtype).tensor_split(micro_batches)
        rank = dist.get_rank()
        prev, nxt = rank - self.tp, rank + self.tp
        last = self.stage == self.pp - 1
        sends, outputs = [], []
        for chunk in chunks:
            if chunk.shape[0] == 0:
                continue
            x = chunk if self.stage == 0 else torch.empty_like(chunk)
            if self.stage > 0:
                dist.recv(x, prev)
            for layer in self.layers:
                x = self._layer(layer, x)
            if last:
                outputs.append(x)
            else:
                sends.append((dist.isend(x.contiguous(), nxt), x))  # keep x alive until sent
        for request, _ in sends:
            request.wait()
        return torch.cat(outputs) if last else None
