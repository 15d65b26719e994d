"""Building blocks of the dense (replicated) part: RMSNorm, rotary embedding, cached attention.

Attention reads and writes the paged KV cache (moe_worker.models.kv_cache): the step's new keys and
values go to their slots first, then each attention group runs one SDPA call against its
sequences' cached keys, causal by position. Grouped-query attention is SDPA's `enable_gqa`.

Legend: N new tokens, D hidden, H query heads, Hkv kv heads, Hd head dim, B sequences in a group,
Q queries per sequence, T keys per sequence.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moe_worker.models.config import ModelSpec, YarnRope
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
    positions_N: Tensor,
    head_dim: int,
    theta: float,
    dtype: torch.dtype,
    *,
    yarn: YarnRope | None = None,
) -> tuple[Tensor, Tensor]:
    """cos and sin [N, 1, Hd] of RoPE over `head_dim` dimensions (the Hugging Face layout).

    Frequency j (of Hd/2) pairs dims j and j + Hd/2 (`apply_rope`; `apply_rope_interleaved` uses
    the first half). Angles are computed in fp32 and then cast, so long positions keep their
    precision in half-precision models. `yarn`: YaRN's frequencies and cos/sin factor.
    """
    inv_freq = rope_frequencies(head_dim, theta, positions_N.device, yarn)
    angles_NF = positions_N.float()[:, None] * inv_freq[None, :]
    angles_NHd = torch.cat([angles_NF, angles_NF], dim=-1)
    cos, sin = angles_NHd.cos(), angles_NHd.sin()
    if yarn is not None:
        factor = yarn.cos_sin_factor()
        cos, sin = cos * factor, sin * factor
    return cos.to(dtype)[:, None, :], sin.to(dtype)[:, None, :]


def rope_frequencies(
    dim: int, theta: float, device: torch.device, yarn: YarnRope | None = None
) -> Tensor:
    """fp32 [dim / 2] inverse frequencies; YaRN blends interpolated (long) and extrapolated
    (short) wavelengths by a linear ramp over the dimensions (transformers' `yarn`)."""
    exponents = torch.arange(0, dim, 2, dtype=torch.float32, device=device)
    if yarn is None:
        return 1.0 / (theta ** (exponents / dim))
    pos_freqs = theta ** (exponents / dim)
    extrapolation, interpolation = 1.0 / pos_freqs, 1.0 / (yarn.factor * pos_freqs)

    def correction_dim(rotations: float) -> float:
        wavelength = yarn.original_max_position / (rotations * 2 * math.pi)
        return (dim * math.log(wavelength)) / (2 * math.log(theta))

    low, high = correction_dim(yarn.beta_fast), correction_dim(yarn.beta_slow)
    if yarn.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # transformers' guard against a zero-width ramp
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    keep = 1 - ramp.to(device)  # 1: extrapolate (high frequencies), 0: interpolate
    return interpolation * (1 - keep) + extrapolation * keep


def apply_rope(x_NHHd: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """RoPE on the first cos.shape[-1] dims of each head (all of them, or GLM's partial rotary),
    halves rotated together; the other dims pass through."""
    rotary = cos.shape[-1]
    if rotary < x_NHHd.shape[-1]:
        turned = apply_rope(x_NHHd[..., :rotary], cos, sin)
        return torch.cat([turned, x_NHHd[..., rotary:]], dim=-1)
    half = rotary // 2
    rotated = torch.cat([-x_NHHd[..., half:], x_NHHd[..., :half]], dim=-1)
    return x_NHHd * cos + rotated * sin


def apply_rope_interleaved(x_NHd: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """RoPE on interleaved pairs (x0, x1), (x2, x3), ... (DeepSeek's layout), each turned by one
    frequency; the result lists the pairs' first then second members (transformers'
    `apply_rotary_pos_emb_interleave`; queries and keys alike, so scores are unchanged)."""
    half = cos.shape[-1] // 2
    cos, sin = cos[..., :half], sin[..., :half]
    first, second = x_NHd[..., 0::2], x_NHd[..., 1::2]
    return torch.cat([first * cos - second * sin, second * cos + first * sin], dim=-1)


class Attention(nn.Module):
    """Multi-head attention with grouped K/V heads and RoPE, over the paged cache.

    The spec's details: biases on q/k/v (Qwen2-MoE, GLM-4.5), q and k RMS-normalised per head
    before RoPE (Qwen3, GLM-4.5's use_qk_norm), RoPE on the first dims only (GLM-4.5's partial
    rotary: the cos/sin the model computes are that wide).
    """

    def __init__(self, spec: ModelSpec) -> None:
        super().__init__()
        s = spec.shape
        self.heads, self.kv_heads, self.head_dim = s.heads, s.key_value_heads, s.head_dim
        bias = spec.attention_bias
        self.q_proj = nn.Linear(s.hidden, s.attn_dim, bias=bias)
        self.k_proj = nn.Linear(s.hidden, s.kv_dim, bias=bias)
        self.v_proj = nn.Linear(s.hidden, s.kv_dim, bias=bias)
        self.o_proj = nn.Linear(s.attn_dim, s.hidden, bias=False)
        if spec.qk_norm:
            self.q_norm = RMSNorm(self.head_dim, spec.rms_norm_eps)
            self.k_norm = RMSNorm(self.head_dim, spec.rms_norm_eps)

    def project(self, x_ND: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """q [N, H, Hd], k and v [N, Hkv, Hd], before RoPE."""
        n = x_ND.shape[0]
        q_NHHd = self.q_proj(x_ND).view(n, self.heads, self.head_dim)
        k_NHHd = self.k_proj(x_ND).view(n, self.kv_heads, self.head_dim)
        v_NHHd = self.v_proj(x_ND).view(n, self.kv_heads, self.head_dim)
        if hasattr(self, "q_norm"):
            q_NHHd, k_NHHd = self.q_norm(q_NHHd), self.k_norm(k_NHHd)
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
