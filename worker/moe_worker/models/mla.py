"""Multi-head latent attention (MLA; DeepSeek-V2/V3, Kimi-K2) over the paged cache.

Keys and values come from one compressed latent per token: `kv_a_proj_with_mqa` x gives the
latent c [C] (RMS-normalised) and one rotary key k_rot [R] shared by all heads; `kv_b_proj` c
gives each head's key part without position k_nope [Hn] and its value [Hv]. Queries: q [H, Hn+R]
from x (directly, or through the low-rank `q_a_proj` -> `q_a_layernorm` -> `q_b_proj`), split
into q_nope and q_rot; RoPE turns q_rot and k_rot (interleaved pairs in DeepSeek's layout).
score = (q_nope . k_nope + q_rot . k_rot) x scale, scale = (Hn+R) ** -0.5 (x YaRN's mscale
squared).

The cache holds per token and layer only [c, k_rot] (C + R values: 576 for DeepSeek-V3, against
2 x 128 heads x 192 for plain attention); `KVCache.for_shape` sizes it so, and the cache budget
counts those bytes. Two ways to attend:

- **prefill** (a group of several new tokens per sequence): expand the cached latents into
  per-head keys and values with `kv_b_proj`, then one SDPA call (transformers' computation);
- **decode** (one new token per sequence): absorb `kv_b_proj` into the query and the output
  instead: q_nope W_UK gives a query in latent space, scores are taken against the latents
  themselves ([q_nope W_UK, q_rot] . [c, k_rot]: one SDPA call with a single key/value head),
  and the attended latent goes through W_UV. Per cached token that costs H x (2C + R) instead
  of C x H x (Hn + Hv) multiply-adds to expand it: what makes MLA cheap to decode. The same
  scores up to rounding (kv_b_proj has no bias).

Legend: N new tokens, D hidden, H heads, Hn / R / Hv nope, rotary, value head dims, C latent,
Q queries per sequence, T keys per sequence, B sequences in a group.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moe_worker.models.config import ModelSpec
from moe_worker.models.kv_cache import AttentionGroup, KVCache, StepMeta
from moe_worker.models.layers import RMSNorm, apply_rope, apply_rope_interleaved

LORA_NORM_EPS = 1e-6
"""transformers builds q_a_layernorm and kv_a_layernorm with the RMSNorm default, not
config.rms_norm_eps."""


class LatentAttention(nn.Module):
    """MLA of one layer: forward(x, rope, cache, block, meta) like `layers.Attention`."""

    def __init__(self, spec: ModelSpec) -> None:
        super().__init__()
        s = spec.shape
        self.heads, self.latent, self.rope_dim = s.heads, s.kv_lora_rank, s.rope_head_dim
        self.nope_dim, self.v_dim = s.head_dim - s.rope_head_dim, s.v_head_dim
        bias = spec.attention_bias
        if s.q_lora_rank:
            self.q_a_proj = nn.Linear(s.hidden, s.q_lora_rank, bias=bias)
            self.q_a_layernorm = RMSNorm(s.q_lora_rank, LORA_NORM_EPS)
            self.q_b_proj = nn.Linear(s.q_lora_rank, s.attn_dim, bias=False)
        else:
            self.q_proj = nn.Linear(s.hidden, s.attn_dim, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(s.hidden, self.latent + self.rope_dim, bias=bias)
        self.kv_a_layernorm = RMSNorm(self.latent, LORA_NORM_EPS)
        self.kv_b_proj = nn.Linear(self.latent, s.heads * (self.nope_dim + self.v_dim), bias=False)
        self.o_proj = nn.Linear(s.heads * self.v_dim, s.hidden, bias=bias)
        self.scale = s.head_dim**-0.5 * (spec.yarn.softmax_factor() if spec.yarn else 1.0)
        self.rotate = apply_rope_interleaved if spec.rope_interleave else apply_rope

    def forward(
        self,
        x_ND: Tensor,
        rope: tuple[Tensor, Tensor],
        cache: KVCache,
        layer: int,
        meta: StepMeta,
    ) -> Tensor:
        n = x_ND.shape[0]
        if hasattr(self, "q_proj"):
            q_NHd = self.q_proj(x_ND)
        else:
            q_NHd = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x_ND)))
        q_NHd = q_NHd.view(n, self.heads, self.nope_dim + self.rope_dim)
        q_nope_NHn, q_rot_NHR = q_NHd.split([self.nope_dim, self.rope_dim], dim=-1)
        latent_NC, k_rot_NR = self.kv_a_proj_with_mqa(x_ND).split(
            [self.latent, self.rope_dim], dim=-1
        )
        latent_NC = self.kv_a_layernorm(latent_NC)
        q_rot_NHR = self.rotate(q_rot_NHR, *rope)
        k_rot_N1R = self.rotate(k_rot_NR.view(n, 1, self.rope_dim), *rope)
        entries_N1E = torch.cat([latent_NC.view(n, 1, self.latent), k_rot_N1R], dim=-1)
        cache.write(layer, meta, entries_N1E)
        o_NHv = q_NHd.new_empty(n, self.heads, self.v_dim)
        for group in meta.groups:
            if group.key_slots_BT is None:  # a prompt's first tokens: its own entries, causal
                entries_BT1E = entries_N1E[group.token_index_BQ]
            else:
                entries_BT1E = cache.read_keys(layer, group.key_slots_BT)
            q_index = group.token_index_BQ
            attend = self._absorbed if q_index.shape[1] == 1 else self._expanded
            o_BQHv = attend(q_nope_NHn[q_index], q_rot_NHR[q_index], entries_BT1E, group)
            o_NHv[q_index.reshape(-1)] = o_BQHv.flatten(0, 1)
        return self.o_proj(o_NHv.flatten(1))  # flatten, not view(N, -1): N may be 0

    def _expanded(
        self, q_nope_BQHn: Tensor, q_rot_BQHR: Tensor, entries_BT1E: Tensor, group: AttentionGroup
    ) -> Tensor:
        """Per-head keys and values from the latents, then attention: [B, Q, H, Hv]."""
        b, t = entries_BT1E.shape[:2]
        latent_BTC, k_rot_BTR = entries_BT1E[:, :, 0].split([self.latent, self.rope_dim], dim=-1)
        kv_BTHx = self.kv_b_proj(latent_BTC).view(b, t, self.heads, self.nope_dim + self.v_dim)
        k_nope_BTHn, v_BTHv = kv_BTHx.split([self.nope_dim, self.v_dim], dim=-1)
        k_rot_BTHR = k_rot_BTR[:, :, None, :].expand(b, t, self.heads, self.rope_dim)
        k_BTHd = torch.cat([k_nope_BTHn, k_rot_BTHR], dim=-1)
        q_BQHd = torch.cat([q_nope_BQHn, q_rot_BQHR], dim=-1)
        o_BHQv = F.scaled_dot_product_attention(
            q_BQHd.transpose(1, 2),
            k_BTHd.transpose(1, 2),
            v_BTHv.transpose(1, 2),
            attn_mask=group.mask_B1QT,
            is_causal=group.fresh,
            scale=self.scale,
        )
        return o_BHQv.transpose(1, 2)

    def _absorbed(
        self, q_nope_BQHn: Tensor, q_rot_BQHR: Tensor, entries_BT1E: Tensor, group: AttentionGroup
    ) -> Tensor:
        """Attention in latent space, kv_b_proj absorbed into query and output: [B, Q, H, Hv]."""
        w_HxC = self.kv_b_proj.weight.view(self.heads, self.nope_dim + self.v_dim, self.latent)
        w_uk_HnC, w_uv_HvC = w_HxC.split([self.nope_dim, self.v_dim], dim=1)
        q_latent_BQHC = torch.einsum("bqhn,hnc->bqhc", q_nope_BQHn, w_uk_HnC)
        q_BHQE = torch.cat([q_latent_BQHC, q_rot_BQHR], dim=-1).transpose(1, 2)
        k_B1TE = entries_BT1E.transpose(1, 2)
        v_B1TC = k_B1TE[..., : self.latent]
        o_BHQC = F.scaled_dot_product_attention(
            q_BHQE,
            k_B1TE,
            v_B1TC,
            attn_mask=group.mask_B1QT,
            is_causal=group.fresh,
            scale=self.scale,
            enable_gqa=True,
        )
        return torch.einsum("bhqc,hvc->bqhv", o_BHQC, w_uv_HvC)
