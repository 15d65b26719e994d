"""GPU checks of the EP data path, run by `python -m moe_worker.bench.gpu_check` on one GPU.

- `grouped_cases`: the grouped GEMM over stacked slots (`torch._grouped_mm`, one kernel) against
  the per-slot loop and against one plain matmul of the same FLOPs, in bf16, at the seed's
  shapes (SeedMLP 4096 -> 16384, 4 and 16 slots) and Qwen3-30B-A3B's (128 experts top-8, SwiGLU
  2048 -> 768: a rank of EP8 holds 16, one GPU the whole layer). Rows per slot are uneven
  (Zipf-like), as routing makes them. These figures settle `expert_efficiency`.
- `engine_case`: the EP engine on a one-rank nccl group with the real collective path (async
  all-to-all, counts read back on a side stream, grouped GEMM), one batch and two overlapped
  micro-batches, against the per-expert reference: the CUDA paths CPU tests cannot reach.

Legend: n rows, S slots, D hidden, F expert width.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from moe_worker.models import architecture
from moe_worker.models.base import torch_dtype
from moe_worker.models.grouped import SlotGroups, grouped_mm_works

CUDA = torch.device("cuda")


@dataclass(frozen=True)
class GroupedCase:
    name: str
    arch: str
    hidden: int
    ffn: int
    slots: int
    rows: int
    """Assignments the slots receive in all (one layer, one rank)."""


GROUPED_CASES = (
    GroupedCase("seed_ep4_rank", "SeedMLP", 4096, 16384, 4, 4 * 8192),
    GroupedCase("seed_layer", "SeedMLP", 4096, 16384, 16, 16 * 4096),
    GroupedCase("qwen3_30b_ep8_rank", "Qwen3MoE", 2048, 768, 16, 16 * 1024),
    GroupedCase("qwen3_30b_layer", "Qwen3MoE", 2048, 768, 128, 128 * 512),
)


def cuda_time(fn: Callable[[], object], warmup: int = 3, repeats: int = 10) -> float:
    """Median seconds of fn() by CUDA events."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return statistics.median(times)


def uneven_sizes(rows: int, slots: int, skew: float = 0.8) -> list[int]:
    """`rows` over `slots`, slot s weighted (s+1)^-skew, as a router's popular experts get."""
    weights = torch.tensor([(s + 1) ** -skew for s in range(slots)])
    sizes = (weights / weights.sum() * rows).floor().long()
    sizes[0] += rows - int(sizes.sum())
    return sizes.tolist()


def wall_time(fn: Callable[[], object], warmup: int = 1, repeats: int = 3) -> float:
    """Median seconds of fn() by the host clock (the CPU smoke test of these checks)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def grouped_case(
    case: GroupedCase,
    repeats: int,
    dev: torch.device = CUDA,
    dt: torch.dtype = torch.bfloat16,
    timer: Callable[..., float] = cuda_time,
) -> dict[str, Any]:
    arch = architecture(case.arch)
    shapes = [(case.ffn, case.hidden)] * (len(arch.expert_matrices) - 1) + [(case.hidden, case.ffn)]
    stacks = tuple(
        torch.randn(case.slots, rows, cols, device=dev, dtype=dt) * cols**-0.5
        for rows, cols in shapes
    )
    sizes = uneven_sizes(case.rows, case.slots)
    x_nD = torch.randn(case.rows, case.hidden, device=dev, dtype=dt)
    counts_S = torch.tensor(sizes, device=dev)
    loop, grouped = SlotGroups.of(sizes, "loop"), SlotGroups.of(sizes, "grouped_mm", counts_S)
    flops = 2 * case.rows * sum(r * c for r, c in shapes)
    plain = [torch.randn(c, r, device=dev, dtype=dt) for r, c in shapes]  # [in, out]

    def matmuls() -> torch.Tensor:
        *inputs, output = plain
        hidden = [x_nD @ w for w in inputs]
        return hidden[-1] @ output

    with torch.inference_mode():
        loop_s = timer(lambda: arch.grouped_forward(x_nD, stacks, loop), repeats=repeats)
        grouped_s = timer(lambda: arch.grouped_forward(x_nD, stacks, grouped), repeats=repeats)
        plain_s = timer(matmuls, repeats=repeats)
        diff = arch.grouped_forward(x_nD, stacks, grouped) - arch.grouped_forward(
            x_nD, stacks, loop
        )
    return {
        "architecture": case.arch,
        "slots": case.slots,
        "rows": case.rows,
        "largest_slot_rows": max(sizes),
        "loop_ms": loop_s * 1e3,
        "grouped_mm_ms": grouped_s * 1e3,
        "grouped_mm_speedup": loop_s / grouped_s,
        "loop_tflops": flops / loop_s / 1e12,
        "grouped_mm_tflops": flops / grouped_s / 1e12,
        "plain_tflops": flops / plain_s / 1e12,
        "grouped_mm_fraction_of_plain": plain_s / grouped_s,
        "max_abs_diff": float(diff.abs().max()),
    }


def grouped_cases(repeats: int = 10) -> dict[str, Any]:
    if not grouped_mm_works("cuda", torch.bfloat16):
        return {"grouped_mm": "torch._grouped_mm does not run here in bfloat16"}
    return {case.name: grouped_case(case, repeats) for case in GROUPED_CASES}


def engine_case(dev: torch.device = CUDA, dtype: str = "bfloat16") -> dict[str, Any]:
    """The EP engine's CUDA path on a one-rank nccl group against the per-expert reference
    (on the CPU: gloo, for the smoke test)."""
    from moe_contract.plan import round_robin_plan
    from moe_contract.shape import ModelShape
    from moe_worker.bench.data_path import ep_prefill
    from moe_worker.ep.dispatch import Dispatcher
    from moe_worker.ep.engine import EPEngine
    from moe_worker.models.kv_cache import KVCache, StepBatch
    from moe_worker.models.weights import SyntheticWeights, build_model, local_experts

    shape = ModelShape(
        layers=2, experts=16, hidden=256, ffn_hidden=128, heads=4, head_dim=64, top_k=4,
        dtype=dtype, architecture="Qwen3MoE", kv_heads=2, vocab_size=512,
    )  # fmt: skip
    own_group = not dist.is_initialized()
    if own_group:  # one rank: an in-process store, no port
        backend = "nccl" if dev.type == "cuda" else "gloo"
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    try:
        source = SyntheticWeights.for_shape(shape, seed=3)
        prompts = [list(range(i, i + n)) for i, n in ((1, 37), (50, 5), (9, 64))]
        cache = KVCache.for_shape(shape, 256, dtype=torch_dtype(shape), device=dev)
        batch = StepBatch.build([(i, p, 0) for i, p in enumerate(prompts)], dev)
        with torch.inference_mode():
            reference = build_model(source, dev)(batch, cache, local_experts(source, dev))
        engine = EPEngine(source, round_robin_plan(2, 16, 1, 16), rank=0, device=dev)
        d = engine.dispatcher  # the all-to-all path, not the world-1 identity
        engine.dispatcher = Dispatcher(d.placement, shape.layers, shape.experts)
        with torch.inference_mode():
            one = ep_prefill(engine, prompts, dev)
            two = ep_prefill(engine, prompts, dev, two_batch=True)
        scale = float(reference.abs().max())
        return {
            "kernel": engine.kernel,
            "logits_max_abs": scale,
            "one_batch_max_abs_diff": float((one - reference).abs().max()),
            "two_batch_max_abs_diff": float((two - reference).abs().max()),
        }
    finally:
        if own_group:
            dist.destroy_process_group()
