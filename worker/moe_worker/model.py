"""The seed's MoE transformer, single process (gpt-fast style: no torch.distributed in this file).

Per layer: RMSNorm -> causal multi-head attention (SDPA) -> residual -> RMSNorm -> top-K softmax
gate -> expert MLPs (hidden -> ffn -> hidden, GELU) -> residual. The experts are not part of the
nn.Module: the model calls a `MoEFn` for each layer, so the same model runs with every expert local
(`DenseExperts`, the reference) or with experts spread over ranks (`moe_worker.engine`).

Weights are deterministic functions of (seed, parameter name), so any rank can build any expert
identically; a safetensors checkpoint holds one tensor per expert per layer, so a rank loads only
its own.

Legend: B batch (sequences), T tokens per sequence, N tokens (B*T), D hidden, H heads, Hd head dim,
F ffn hidden, E experts, K top-k, L layers.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moe_worker.shape import ModelShape

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def torch_dtype(config: ModelShape) -> torch.dtype:
    return DTYPES[config.dtype]


def generator_for(seed: int, name: str) -> torch.Generator:
    """A CPU generator keyed by (seed, name); stable across processes and Python hash seeds."""
    digest = hashlib.sha256(f"{seed}/{name}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))


def _normal(shape: tuple[int, ...], seed: int, name: str, fan_in: int) -> Tensor:
    return torch.randn(shape, generator=generator_for(seed, name)) / math.sqrt(fan_in)


# ---------------------------------------------------------------- experts


@dataclass(frozen=True)
class ExpertWeights:
    """One expert's MLP: y = gelu(x @ w_in.T) @ w_out.T."""

    w_in_FD: Tensor
    w_out_DF: Tensor

    def to(self, device: torch.device | str, dtype: torch.dtype) -> ExpertWeights:
        return ExpertWeights(self.w_in_FD.to(device, dtype), self.w_out_DF.to(device, dtype))

    def flat(self) -> Tensor:
        """Both matrices in one contiguous buffer, for a single point-to-point message."""
        return torch.cat([self.w_in_FD.reshape(-1), self.w_out_DF.reshape(-1)])

    @classmethod
    def from_flat(cls, buffer: Tensor, config: ModelShape) -> ExpertWeights:
        split = config.ffn_hidden * config.hidden
        w_in = buffer[:split].view(config.ffn_hidden, config.hidden)
        w_out = buffer[split:].view(config.hidden, config.ffn_hidden)
        return cls(w_in, w_out)


def expert_key(layer: int, expert: int, matrix: str) -> str:
    return f"layers.{layer}.experts.{expert}.{matrix}"


def init_expert(config: ModelShape, seed: int, layer: int, expert: int) -> ExpertWeights:
    """Deterministic fp32 CPU weights of (layer, expert); identical on every rank."""
    d, f = config.hidden, config.ffn_hidden
    w_in = _normal((f, d), seed, expert_key(layer, expert, "w_in"), d)
    w_out = _normal((d, f), seed, expert_key(layer, expert, "w_out"), f)
    return ExpertWeights(w_in, w_out)


def expert_mlp(x_ND: Tensor, w: ExpertWeights) -> Tensor:
    """[N, D] -> [N, D]; one batched matmul per matrix."""
    return F.gelu(x_ND @ w.w_in_FD.T) @ w.w_out_DF.T


class ExpertSource:
    """Where expert weights come from: a safetensors checkpoint if given, else the seeded init."""

    def __init__(self, config: ModelShape, seed: int, checkpoint: str | None = None) -> None:
        self.config, self.seed, self.checkpoint = config, seed, checkpoint

    def load(self, layer: int, expert: int) -> ExpertWeights:
        if self.checkpoint is None:
            return init_expert(self.config, self.seed, layer, expert)
        from safetensors import safe_open

        with safe_open(self.checkpoint, framework="pt") as file:
            return ExpertWeights(
                file.get_tensor(expert_key(layer, expert, "w_in")),
                file.get_tensor(expert_key(layer, expert, "w_out")),
            )


# ---------------------------------------------------------------- dense parts


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x_BTD: Tensor) -> Tensor:
        x = x_BTD.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return x.type_as(x_BTD) * self.weight


def causal_attention(x_BTD: Tensor, wq: Tensor, wk: Tensor, wv: Tensor, heads: int) -> Tensor:
    """Projections and causal SDPA; returns [B, T, H*Hd] before the output projection.

    Shared with the tensor-parallel baseline, which passes its own head slices of wq/wk/wv.
    """
    b, t, _ = x_BTD.shape
    q_BHTK = (x_BTD @ wq.T).view(b, t, heads, -1).transpose(1, 2)
    k_BHTK = (x_BTD @ wk.T).view(b, t, heads, -1).transpose(1, 2)
    v_BHTK = (x_BTD @ wv.T).view(b, t, heads, -1).transpose(1, 2)
    o_BHTK = F.scaled_dot_product_attention(q_BHTK, k_BHTK, v_BHTK, is_causal=True)
    return o_BHTK.transpose(1, 2).reshape(b, t, -1)


class Attention(nn.Module):
    def __init__(self, config: ModelShape) -> None:
        super().__init__()
        width = config.heads * config.head_dim
        self.heads = config.heads
        self.wq = nn.Linear(config.hidden, width, bias=False)
        self.wk = nn.Linear(config.hidden, width, bias=False)
        self.wv = nn.Linear(config.hidden, width, bias=False)
        self.wo = nn.Linear(width, config.hidden, bias=False)

    def forward(self, x_BTD: Tensor) -> Tensor:
        if x_BTD.shape[0] == 0:  # a data-parallel rank can have no sequences in a request
            return torch.zeros_like(x_BTD)
        o = causal_attention(x_BTD, self.wq.weight, self.wk.weight, self.wv.weight, self.heads)
        return o @ self.wo.weight.T


@dataclass(frozen=True)
class Routing:
    """The gate's decision for N tokens: which K experts each visits and with what weight."""

    topk_ids_NK: Tensor
    topk_weights_NK: Tensor


def route(logits_NE: Tensor, top_k: int, gate_bias_E: Tensor | None = None) -> Routing:
    """Top-K of softmax scores; bias moves selection only; weights are unbiased, renormalised."""
    scores_NE = torch.softmax(logits_NE.float(), dim=-1)
    selection_NE = scores_NE if gate_bias_E is None else scores_NE + gate_bias_E.float()
    topk_ids_NK = torch.topk(selection_NE, top_k, dim=-1).indices
    weights_NK = torch.gather(scores_NE, 1, topk_ids_NK)
    weights_NK = weights_NK / weights_NK.sum(-1, keepdim=True)
    return Routing(topk_ids_NK, weights_NK.to(logits_NE.dtype))


class MoEFn(Protocol):
    """Runs the experts of `layer`: x [N, D] and its routing -> combined output [N, D]."""

    def __call__(self, layer: int, x_ND: Tensor, routing: Routing) -> Tensor: ...


class Block(nn.Module):
    def __init__(self, config: ModelShape) -> None:
        super().__init__()
        self.attention_norm = RMSNorm(config.hidden)
        self.attention = Attention(config)
        self.ffn_norm = RMSNorm(config.hidden)
        self.gate = nn.Linear(config.hidden, config.experts, bias=False)


class Transformer(nn.Module):
    """The dense (replicated) part of the model; experts come from the `MoEFn` given to forward."""

    def __init__(self, config: ModelShape) -> None:
        super().__init__()
        self.config = config
        self.layers = nn.ModuleList(Block(config) for _ in range(config.layers))

    def forward(
        self,
        x_BTD: Tensor,
        moe: MoEFn,
        gate_bias_LE: Tensor | None = None,
        logit_offset_E: Tensor | None = None,
    ) -> Tensor:
        for index in range(self.config.layers):
            x_BTD = self.forward_layer(index, x_BTD, moe, gate_bias_LE, logit_offset_E)
        return x_BTD

    def forward_layer(
        self,
        index: int,
        x_BTD: Tensor,
        moe: MoEFn,
        gate_bias_LE: Tensor | None = None,
        logit_offset_E: Tensor | None = None,
    ) -> Tensor:
        block: Block = self.layers[index]  # type: ignore[assignment]
        b, t, d = x_BTD.shape
        h_BTD = x_BTD + block.attention(block.attention_norm(x_BTD))
        r_ND = block.ffn_norm(h_BTD).reshape(b * t, d)
        logits_NE = block.gate(r_ND)
        if logit_offset_E is not None:  # traffic skew: as if inputs favoured some experts
            logits_NE = logits_NE + logit_offset_E
        bias_E = None if gate_bias_LE is None else gate_bias_LE[index]
        routing = route(logits_NE, self.config.top_k, bias_E)
        return h_BTD + moe(index, r_ND, routing).view(b, t, d)


def build_transformer(
    config: ModelShape,
    seed: int,
    device: torch.device | str = "cpu",
    checkpoint: str | None = None,
) -> Transformer:
    """The dense part with deterministic (or checkpointed) weights, in the config's dtype."""
    model = Transformer(config)
    with torch.no_grad():
        if checkpoint is not None:
            from safetensors.torch import load_file

            tensors = load_file(checkpoint)
            model.load_state_dict({k: tensors[k] for k in model.state_dict()})
        else:
            for name, param in model.named_parameters():
                if name.endswith("norm.weight"):
                    continue  # RMSNorm weights stay ones
                param.copy_(_normal(tuple(param.shape), seed, name, param.shape[1]))
    return model.to(device=device, dtype=torch_dtype(config)).eval()


class DenseExperts:
    """The reference MoEFn: every expert of every layer in this process; counts routed tokens."""

    def __init__(self, source: ExpertSource, device: torch.device | str = "cpu") -> None:
        config = source.config
        dtype = torch_dtype(config)
        self.experts = [
            [source.load(layer, e).to(device, dtype) for e in range(config.experts)]
            for layer in range(config.layers)
        ]
        self.counts_LE = torch.zeros(config.layers, config.experts, dtype=torch.int64)

    def __call__(self, layer: int, x_ND: Tensor, routing: Routing) -> Tensor:
        n, k = routing.topk_ids_NK.shape
        ids_A = routing.topk_ids_NK.reshape(-1)  # A = N*K assignments
        y_AD = torch.zeros(n * k, x_ND.shape[1], dtype=x_ND.dtype, device=x_ND.device)
        for expert in ids_A.unique().tolist():
            rows_A = (ids_A == expert).nonzero().squeeze(1)
            y_AD[rows_A] = expert_mlp(x_ND[rows_A // k], self.experts[layer][expert])
            self.counts_LE[layer, expert] += rows_A.numel()
        return weighted_sum(y_AD.view(n, k, -1), routing.topk_weights_NK)


def weighted_sum(y_NKD: Tensor, weights_NK: Tensor) -> Tensor:
    """The combine step shared by every layout, so all of them round identically."""
    return (y_NKD * weights_NK.unsqueeze(-1).to(y_NKD.dtype)).sum(dim=1)


def reference_forward(
    config: ModelShape,
    x_BTD: Tensor,
    seed: int = 0,
    gate_bias_LE: Tensor | None = None,
    checkpoint: str | None = None,
) -> tuple[Tensor, Tensor]:
    """Single-process forward of the whole model: (output [B, T, D], routed counts [L, E])."""
    model = build_transformer(config, seed, checkpoint=checkpoint)
    experts = DenseExperts(ExpertSource(config, seed, checkpoint))
    with torch.no_grad():
        out = model(x_BTD.to(torch_dtype(config)), experts, gate_bias_LE)
    return out, experts.counts_LE


def write_checkpoint(path: str | Path, config: ModelShape, seed: int) -> Path:
    """Write the seeded weights as safetensors, one tensor per expert per layer (tests, demos)."""
    from safetensors.torch import save_file

    tensors: dict[str, Tensor] = {
        name: param.detach().contiguous()
        for name, param in build_transformer(config, seed).state_dict().items()
    }
    for layer in range(config.layers):
        for expert in range(config.experts):
            weights = init_expert(config, seed, layer, expert).to("cpu", torch_dtype(config))
            tensors[expert_key(layer, expert, "w_in")] = weights.w_in_FD.contiguous()
            tensors[expert_key(layer, expert, "w_out")] = weights.w_out_DF.contiguous()
    save_file(tensors, str(path))
    return Path(path)

