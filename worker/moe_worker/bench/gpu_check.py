"""`python -m moe_worker.bench.gpu_check`: one EP rank's per-layer work at the seed's shapes,
on one GPU.

In bf16: the layer's attention over this rank's 8 sequences of 10,000 tokens (hidden 4096, 32 heads
x 128, causal SDPA, QKV and output projections) and its one expert (4096 -> 16384 -> 4096, GELU) on
the tokens routed to it (128 x 10,000 x top-2 / 16 experts = 160,000 with perfect balance), each
next to a plain torch.matmul (cuBLAS) of the same shapes. CUDA events, warm-up, median of repeats.
Compute only: the all-to-all is not in these figures. Then the EP data path (`gpu_grouped`): the
grouped GEMM over stacked slots against the per-slot loop and a plain matmul at the seed's and
Qwen3-MoE's shapes, and the EP engine's CUDA path (async all-to-all on a one-rank nccl group,
side-stream count read-back, two overlapped micro-batches) against the per-expert reference.
Runs in about a minute on an H100/H200.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from moe_contract.shape import ModelShape
from moe_worker.bench import gpu_grouped
from moe_worker.bench.gpu_grouped import cuda_time
from moe_worker.models import ExpertWeights, architecture

SEED = ModelShape.seed()
HIDDEN, HEADS, HEAD_DIM, FFN = SEED.hidden, SEED.heads, SEED.head_dim, SEED.ffn_hidden
EXPERTS, TOP_K, LAYERS = SEED.experts, SEED.top_k, SEED.layers
BATCH, SEQ_LEN = 128, 10_000  # the seed's batch: 128 sequences of 10,000 tokens
SEQUENCES = BATCH // EXPERTS  # one EP rank's share (EP16, attention data-parallel)
SEED_MLP = architecture("SeedMLP")  # the seed's two-matrix GELU experts


def causal_attention(x_BTD: Tensor, wq: Tensor, wk: Tensor, wv: Tensor, heads: int) -> Tensor:
    """Projections and causal SDPA over whole sequences: [B, T, H*Hd] before the output projection
    (a prefill's attention; RoPE is elementwise and left out of the timing)."""
    b, t, _ = x_BTD.shape
    q_BHTK = (x_BTD @ wq.T).view(b, t, heads, -1).transpose(1, 2)
    k_BHTK = (x_BTD @ wk.T).view(b, t, heads, -1).transpose(1, 2)
    v_BHTK = (x_BTD @ wv.T).view(b, t, heads, -1).transpose(1, 2)
    o_BHTK = F.scaled_dot_product_attention(q_BHTK, k_BHTK, v_BHTK, is_causal=True)
    return o_BHTK.transpose(1, 2).reshape(b, t, -1)


def run(warmup: int = 3, repeats: int = 10) -> dict[str, Any]:
    torch.manual_seed(0)
    dev, dt = torch.device("cuda"), torch.bfloat16
    n_attn = SEQUENCES * SEQ_LEN
    n_expert = BATCH * SEQ_LEN * TOP_K // EXPERTS
    width = HEADS * HEAD_DIM

    def randn(*shape: int, scale: float = 1.0) -> torch.Tensor:
        return torch.randn(*shape, device=dev, dtype=dt) * scale

    x_BTD = randn(SEQUENCES, SEQ_LEN, HIDDEN)
    wq, wk, wv = (randn(width, HIDDEN, scale=HIDDEN**-0.5) for _ in range(3))
    wo = randn(HIDDEN, width, scale=width**-0.5)
    expert = ExpertWeights(
        (randn(FFN, HIDDEN, scale=HIDDEN**-0.5), randn(HIDDEN, FFN, scale=FFN**-0.5))
    )
    tokens_ND = randn(n_expert, HIDDEN)
    x_ND = x_BTD.view(n_attn, HIDDEN)

    with torch.inference_mode():
        attention = cuda_time(
            lambda: causal_attention(x_BTD, wq, wk, wv, HEADS) @ wo.T, warmup, repeats
        )
        projections = cuda_time(lambda: [x_ND @ w.T for w in (wq, wk, wv, wo)], warmup, repeats)
        expert_s = cuda_time(lambda: SEED_MLP.expert_forward(tokens_ND, expert), warmup, repeats)
        w_in_FD, w_out_DF = expert.matrices
        w_in_DF, w_out_FD = w_in_FD.T.contiguous(), w_out_DF.T.contiguous()
        matmul_s = cuda_time(
            lambda: torch.matmul(torch.matmul(tokens_ND, w_in_DF), w_out_FD), warmup, repeats
        )

    proj_flops = 4 * 2 * n_attn * HIDDEN * width
    sdpa_flops = 2 * 2 * SEQUENCES * HEADS * SEQ_LEN * SEQ_LEN * HEAD_DIM // 2  # causal: half
    expert_flops = 2 * 2 * n_expert * HIDDEN * FFN
    layer_s = attention + expert_s
    return {
        "device": torch.cuda.get_device_name(),
        "shapes": {
            "attention_tokens": n_attn,
            "expert_tokens": n_expert,
            "hidden": HIDDEN,
            "ffn": FFN,
            "heads": HEADS,
            "head_dim": HEAD_DIM,
            "dtype": "bfloat16",
        },
        "attention_ms": attention * 1e3,
        "attention_tflops": (proj_flops + sdpa_flops) / attention / 1e12,
        "attention_projection_matmul_ms": projections * 1e3,
        "attention_projection_matmul_tflops": proj_flops / projections / 1e12,
        "expert_ms": expert_s * 1e3,
        "expert_tflops": expert_flops / expert_s / 1e12,
        "expert_shape_matmul_ms": matmul_s * 1e3,
        "expert_shape_matmul_tflops": expert_flops / matmul_s / 1e12,
        "expert_fraction_of_matmul": matmul_s / expert_s,
        "layer_compute_ms": layer_s * 1e3,
        # Every rank does the same work in parallel: 16 layers of it per step of 1.28M tokens.
        "projected_compute_only_tokens_per_s": BATCH * SEQ_LEN / (LAYERS * layer_s),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m moe_worker.bench.gpu_check", description=__doc__
    )
    parser.add_argument("--json", dest="json_path", help="also write the figures to this file")
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("gpu_check needs a CUDA GPU; none is visible (torch.cuda.is_available() is False)")
        return 2
    result = run(repeats=args.repeats)
    result["grouped_gemm"] = gpu_grouped.grouped_cases(args.repeats)
    try:
        result["ep_engine"] = gpu_grouped.engine_case()
    except Exception as error:  # report it; the compute figures above still stand
        result["ep_engine"] = {"error": f"{type(error).__name__}: {error}"}
    _print(result)
    if args.json_path:
        Path(args.json_path).write_text(json.dumps(result, indent=2) + "\n")
    return 0


def _print(result: dict[str, Any], indent: str = "") -> None:
    for key, value in result.items():
        if isinstance(value, dict):
            print(f"{indent}{key}")
            _print(value, indent + "  ")
        else:
            text = f"{value:.3f}" if isinstance(value, float) else str(value)
            print(f"{indent}{key:<{40 - len(indent)}} {text}")


if __name__ == "__main__":
    sys.exit(main())
