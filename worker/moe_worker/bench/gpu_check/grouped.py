"""(b) The MoE layer's expert GEMMs against the per-slot loop and a dense cuBLAS GEMM of the same
FLOPs, and the seed rank's attention, in bf16.

Cases: the seed's experts (SeedMLP 4096 -> 16384, GELU): one EP16 rank (one slot; 128 sequences
x 10,000 tokens x top-2 / 16 = 160,000 rows) and a whole layer of 16 experts at 1k-64k tokens per
expert; Qwen3-30B-A3B's (SwiGLU 2048 -> 768, 128 experts top-8): a whole layer at 128-2048 tokens
per expert and one EP8 rank (16 slots). Rows per slot are uneven (Zipf-like), as routing makes
them. Each case times the loop, `torch._grouped_mm` (where it runs) and plain matmuls of the same
shapes: `fraction_of_dense` = dense time / the served kernel's time, activation included on the
MoE side (what `moe-ep perf` calls expert efficiency over matmul efficiency). A case that would
not fit the free memory is skipped with the figures it needed.

Legend: n rows, S slots, D hidden, F expert width.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from moe_worker.bench.gpu_check.device import GIB, Device
from moe_worker.bench.gpu_check.record import Recorder
from moe_worker.models import architecture
from moe_worker.models.base import DTYPES
from moe_worker.models.grouped import SlotGroups, choose_kernel


@dataclass(frozen=True)
class GroupedCase:
    name: str
    arch: str
    hidden: int
    ffn: int
    slots: int
    rows: int
    """Assignments the slots receive in all (one layer, one rank)."""


@dataclass(frozen=True)
class AttentionCase:
    """One EP rank's prefill attention: `sequences` of `seq_len` tokens, causal SDPA."""

    sequences: int
    seq_len: int
    hidden: int
    heads: int
    head_dim: int


@dataclass(frozen=True)
class GroupedOptions:
    cases: tuple[GroupedCase, ...]
    attention: AttentionCase
    dtype: str = "bfloat16"
    budget_s: float = 0.5
    """About how long each variant of a case is timed (repeats 3-20)."""
    headroom: float = 0.85
    """A case runs when its estimated bytes stay under this fraction of the free memory."""


K = 1024
SEED_EP16_ROWS = 128 * 10_000 * 2 // 16
SEED = ("SeedMLP", 4096, 16384)  # architecture, hidden, expert width
QWEN3_30B = ("Qwen3MoE", 2048, 768)
GPU = GroupedOptions(
    cases=(
        GroupedCase("seed_ep16_rank", *SEED, 1, SEED_EP16_ROWS),
        *(GroupedCase(f"seed_layer_{t}k", *SEED, 16, 16 * t * K) for t in (1, 4, 16, 64)),
        *(GroupedCase(f"qwen3_30b_layer_{t}", *QWEN3_30B, 128, 128 * t) for t in (128, 512, 2048)),
        GroupedCase("qwen3_30b_ep8_rank", *QWEN3_30B, 16, 16 * K),
    ),
    attention=AttentionCase(sequences=8, seq_len=10_000, hidden=4096, heads=32, head_dim=128),
)
TINY = GroupedOptions(
    cases=(
        GroupedCase("seed_ep16_rank", "SeedMLP", 16, 32, 1, 40),
        GroupedCase("seed_layer_tiny", "SeedMLP", 16, 32, 4, 40),
        GroupedCase("qwen3_tiny", "Qwen3MoE", 16, 8, 5, 40),
    ),
    attention=AttentionCase(sequences=2, seq_len=16, hidden=32, heads=4, head_dim=8),
    dtype="float32",
    budget_s=0.01,
)


def run(out: Recorder, device: Device, options: GroupedOptions = GPU) -> None:
    dtype = DTYPES[options.dtype]
    kernel = choose_kernel(device.torch, dtype)
    out.put("dtype", options.dtype)
    out.put("served_kernel", kernel)
    out.put("grouped_mm_runs", device.grouped_mm(dtype))
    torch.manual_seed(0)
    for case in options.cases:
        needed = case_bytes(case, dtype)
        free = device.free_bytes()
        if needed > options.headroom * free:
            out.put("cases", case.name, {"skipped": _skipped(needed, free), **_sizes(case)})
            continue
        with torch.inference_mode():
            out.put("cases", case.name, measure_case(case, device, dtype, kernel, options.budget_s))
        device.trim()
    with torch.inference_mode():
        out.put("attention", measure_attention(options.attention, device, dtype, options.budget_s))


def uneven_sizes(rows: int, slots: int, skew: float = 0.8) -> list[int]:
    """`rows` over `slots`, slot s weighted (s+1)^-skew, as a router's popular experts get."""
    weights = torch.tensor([(s + 1) ** -skew for s in range(slots)])
    sizes = (weights / weights.sum() * rows).floor().long()
    sizes[0] += rows - int(sizes.sum())
    return sizes.tolist()


def expert_shapes(case: GroupedCase) -> list[tuple[int, int]]:
    """[out, in] of each expert matrix: the input ones [F, D], then the output one [D, F]."""
    inputs = len(architecture(case.arch).expert_matrices) - 1
    return [(case.ffn, case.hidden)] * inputs + [(case.hidden, case.ffn)]


def case_bytes(case: GroupedCase, dtype: torch.dtype) -> int:
    """Peak bytes of a case: the slot stacks and the dense weights, and the rows' input, hidden
    states and two outputs (the served kernel's output is kept for the comparison)."""
    size = torch.empty((), dtype=dtype).element_size()
    shapes = expert_shapes(case)
    weights = (case.slots + 1) * sum(r * c for r, c in shapes)
    rows = case.rows * (3 * case.hidden + (len(shapes) - 1) * case.ffn)
    return (weights + rows) * size


def measure_case(
    case: GroupedCase, device: Device, dtype: torch.dtype, kernel: str, budget_s: float
) -> dict[str, Any]:
    arch, dev, shapes = architecture(case.arch), device.torch, expert_shapes(case)
    stacks = tuple(
        torch.randn(case.slots, r, c, device=dev, dtype=dtype) * c**-0.5 for r, c in shapes
    )
    sizes = uneven_sizes(case.rows, case.slots)
    x_nD = torch.randn(case.rows, case.hidden, device=dev, dtype=dtype)
    counts_S = torch.tensor(sizes, device=dev)
    loop = SlotGroups.of(sizes, "loop")
    variants: dict[str, Callable[[], Tensor]] = {
        "loop": lambda: arch.grouped_forward(x_nD, stacks, loop)
    }
    if device.grouped_mm(dtype):
        grouped = SlotGroups.of(sizes, "grouped_mm", counts_S)
        variants["grouped_mm"] = lambda: arch.grouped_forward(x_nD, stacks, grouped)
    dense = [torch.randn(c, r, device=dev, dtype=dtype) * c**-0.5 for r, c in shapes]  # [in, out]
    variants["dense"] = _dense_matmuls(x_nD, dense)
    seconds = {name: device.measure(fn, budget_s=budget_s) for name, fn in variants.items()}
    flops = 2 * case.rows * sum(r * c for r, c in shapes)
    figures = {
        **_sizes(case),
        "largest_slot_rows": max(sizes),
        "kernel": kernel,
        **{f"{name}_ms": s * 1e3 for name, s in seconds.items()},
        **{f"{name}_tflops": flops / s / 1e12 for name, s in seconds.items()},
        "moe_tflops": flops / seconds[kernel] / 1e12,
        "fraction_of_dense": seconds["dense"] / seconds[kernel],
    }
    if "grouped_mm" in seconds:
        figures["grouped_mm_speedup_over_loop"] = seconds["loop"] / seconds["grouped_mm"]
        served = variants["grouped_mm"]()
        served.sub_(variants["loop"]()).abs_()  # in place: no third [n, D] buffer
        figures["grouped_mm_max_abs_diff_vs_loop"] = float(served.max())
    return figures


def _dense_matmuls(x_nD: Tensor, weights: list[Tensor]) -> Callable[[], Tensor]:
    """The case's FLOPs as plain matmuls: x times each input matrix, the last hidden times the
    output matrix."""
    *inputs, output = weights

    def run() -> Tensor:
        hidden = [x_nD @ w for w in inputs]
        return hidden[-1] @ output

    return run


def measure_attention(
    case: AttentionCase, device: Device, dtype: torch.dtype, budget_s: float
) -> dict[str, Any]:
    """Projections and causal SDPA over whole sequences (a prefill; RoPE is elementwise and left
    out), against the projections alone as plain matmuls."""
    dev, d, width = device.torch, case.hidden, case.heads * case.head_dim
    tokens = case.sequences * case.seq_len
    x_BTD = torch.randn(case.sequences, case.seq_len, d, device=dev, dtype=dtype)
    wq, wk, wv = (torch.randn(width, d, device=dev, dtype=dtype) * d**-0.5 for _ in range(3))
    wo = torch.randn(d, width, device=dev, dtype=dtype) * width**-0.5
    x_ND = x_BTD.view(tokens, d)

    def attention() -> Tensor:
        return causal_attention(x_BTD, wq, wk, wv, case.heads) @ wo.T

    attention_s = device.measure(attention, budget_s=budget_s)
    projections_s = device.measure(
        lambda: [x_ND @ w.T for w in (wq, wk, wv, wo)], budget_s=budget_s
    )
    proj_flops = 4 * 2 * tokens * d * width
    sdpa_flops = 2 * 2 * case.sequences * case.heads * case.seq_len**2 * case.head_dim // 2
    return {
        "tokens": tokens,
        "sequences": case.sequences,
        "seq_len": case.seq_len,
        "attention_ms": attention_s * 1e3,
        "attention_tflops": (proj_flops + sdpa_flops) / attention_s / 1e12,
        "projection_matmul_tflops": proj_flops / projections_s / 1e12,
    }


def causal_attention(x_BTD: Tensor, wq: Tensor, wk: Tensor, wv: Tensor, heads: int) -> Tensor:
    """[B, T, H*Hd] before the output projection."""
    b, t, _ = x_BTD.shape
    q_BHTK = (x_BTD @ wq.T).view(b, t, heads, -1).transpose(1, 2)
    k_BHTK = (x_BTD @ wk.T).view(b, t, heads, -1).transpose(1, 2)
    v_BHTK = (x_BTD @ wv.T).view(b, t, heads, -1).transpose(1, 2)
    o_BHTK = F.scaled_dot_product_attention(q_BHTK, k_BHTK, v_BHTK, is_causal=True)
    return o_BHTK.transpose(1, 2).reshape(b, t, -1)


def _sizes(case: GroupedCase) -> dict[str, Any]:
    return {
        "architecture": case.arch,
        "hidden": case.hidden,
        "ffn": case.ffn,
        "slots": case.slots,
        "rows": case.rows,
        "tokens_per_expert": case.rows // case.slots,
    }


def _skipped(needed: int, free: int) -> str:
    return f"needs about {needed / GIB:.1f} GiB, {free / GIB:.1f} GiB free"
