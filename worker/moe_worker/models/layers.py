"""Building blocks of the dense (replicated) part: RMSNorm, rotary embedding, cached attention.

Attention reads and writes the paged KV cache (moe_worker.models.kv_cache): the step's new keys and
values go to their slots first, then each attention group runs one SDPA call against its
sequences' cached keys, causal by position. Grouped-query attention is SDPA's `enable_gqa`.

Legend: N new tokens, D hidden, H query heads, Hkv kv heads, Hd head dim, B sequences in a group,
Q queries per sequence, T keys per sequence.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moe_worker.models.config import ModelSpec
from moe_worker.models.kv_cache import KVCache, StepMeta


class RMSNorm(nn.Module):
    """x / rms(x) in fp32, cast back to the input dtype, then scaled (transformers' order)."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


def rope_cos_sin(
    positions_N: Tensor, head_dim: int, theta: float, dtype: torch.dtype
) -> tuple[Tensor, Tensor]:
    """cos and sin [N, 1, Hd] of unscaled RoPE, rotate-half layout (the Hugging Face one).

    Frequency j (of Hd/2) pairs dims j and j + Hd/2. Angles are computed in fp32 and then cast,
    so long positions keep their precision in half-precision models.
    """
    exponents = torch.arange(0, head_dim, 2, dtype=torch.float32, device=positions_N.device)
    inv_freq = 1.0 / (theta ** (exponents / head_dim))
    angles_NF = positions_N.float()[:, None] * inv_freq[None, :]
    angles_NHd = torch.cat([angles_NF, angles_NF], dim=-1)
    return angles_NHd.cos().to(dtype)[:, None, :], angles_NHd.sin().to(dtype)[:, None, :]


def apply_rope(x_NHHd: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    half = x_NHHd.shape[-1] // 2
    rotated = torch.cat([-x_NHHd[..., half:], x_NHHd[..., :half]], dim=-1)
    return x_NHHd * cos + rotated * sin


class Attention(nn.Module):
    """Multi-head attention with grouped K/V heads and RoPE, over the paged cache.

    Families override `project` to change what happens between the projections and RoPE (Qwen3
    normalises q and k per head there).
    """

    def __init__(self, spec: ModelSpec) -> None:
        super().__init__()
        s = spec.shape
        self.heads, self.kv_heads, self.head_dim = s.heads, s.key_value_heads, s.head_dim
        self.q_proj = nn.Linear(s.hidden, s.attn_dim, bias=False)
        self.k_proj = nn.Linear(s.hidden, s.kv_dim, bias=False)
        self.v_proj = nn.Linear(s.hidden, s.kv_dim, bias=False)
        self.o_proj = nn.Linear(s.attn_dim, s.hidden, bias=False)

    def project(self, x_ND: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """q [N, H, Hd], k and v [N, Hkv, Hd], before RoPE."""
        n = x_ND.shape[0]
        q_NHHd = self.q_proj(x_ND).view(n, self.heads, self.head_dim)
        k_NHHd = self.k_proj(x_ND).view(n, self.kv_heads, self.head_dim)
        v_NHHd = self.v_proj(x_ND).view(n, self.kv_heads, self.head_dim)
        return q_NHHd, k_NHHd, v_NHHd

    def forward(
        self,
        x_ND: Tensor,
        rope: tuple[Tensor, Tensor],
        cache: KVCache,
        layer: int,
        meta: StepMeta,
    ) -> Tensor:
        q_NHHd, k_NHHd, v_NHHd = self.project(x_ND)
        q_NHHd, k_NHHd = apply_rope(q_NHHd, *rope), apply_rope(k_NHHd, *rope)
        cache.write(layer, meta, k_NHHd, v_NHHd)
        o_NHHd = torch.empty_like(q_NHHd)
        for group in meta.groups:
            q_BHQd = q_NHHd[group.token_index_BQ].transpose(1, 2)
            if group.key_slots_BT is None:  # a prompt's first tokens: its own keys, causal
                k_BTHd, v_BTHd = k_NHHd[group.token_index_BQ], v_NHHd[group.token_index_BQ]
            else:
                k_BTHd, v_BTHd = cache.read(layer, group.key_slots_BT)
            o_BHQd = F.scaled_dot_product_attention(
                q_BHQd,
                k_BTHd.transpose(1, 2),
                v_BTHd.transpose(1, 2),
                attn_mask=group.mask_B1QT,
                is_causal=group.key_slots_BT is None,
                enable_gqa=self.kv_heads != self.heads,
            )
            o_NHHd[group.token_index_BQ.reshape(-1)] = o_BHQd.transpose(1, 2).flatten(0, 1)
        return self.o_proj(o_NHHd.flatten(1))  # flatten, not view(N, -1): N may be 0
