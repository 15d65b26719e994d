"""`moe-worker bench`: the EP layout and the TP x PP layout of the same model on the same tokens.

One invocation forks `world` ranks (gloo on CPU, one thread each; nccl when there are `world`
GPUs), times a prefill of the same prompts in both layouts (EP: each rank prefills its share of
the prompts through the all-to-all engine; TP x PP: every rank runs all of them, split by heads /
ffn and by layers), a plan switch that moves every expert, and plain matmuls of the experts'
shapes run concurrently on every rank (so they see the same contention as serving). The model is
the seed's architecture (SeedMLP, synthetic weights); `--zipf` draws prompt tokens from a Zipf law
over the vocabulary, which skews expert load through the router. Rank 0's figures are reported;
the JSON keys are stable (`moe-ep perf --bench-json` calibrates from them).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import random
import statistics
import sys
import tempfile
import time
import traceback
from bisect import bisect_right
from dataclasses import asdict, dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from moe_worker.baseline import TPPPModel
from moe_worker.engine import EPEngine
from moe_worker.flags import add_model_flags, model_overrides
from moe_worker.kv_cache import KVCache, StepBatch
from moe_worker.launcher import free_port
from moe_worker.models.base import DTYPES
from moe_worker.plan import Plan, round_robin_plan
from moe_worker.shape import ModelShape
from moe_worker.traffic import zipf_cumulative
from moe_worker.two_batch import last_rows, split_items
from moe_worker.weights import SyntheticWeights


@dataclass(frozen=True)
class BenchOptions:
    model: ModelShape = field(
        default_factory=lambda: ModelShape(
            layers=4, experts=8, hidden=256, ffn_hidden=1024, heads=8, head_dim=32, top_k=2
        )
    )
    world: int = 4
    tp: int = 2
    pp: int = 2
    batch: int = 8
    """Sequences per step for the whole world (EP splits them across ranks)."""
    seq_len: int = 128
    steps: int = 5
    micro_batches: int = 4
    zipf: float = 0.0
    seed: int = 0
    port: int = 0


def rotated_plan(plan: Plan, version: int) -> Plan:
    """Every slot's expert moves to the next rank: the worst case for a switch."""
    slots = tuple(layer[-1:] + layer[:-1] for layer in plan.slots)
    return Plan(version=version, slotsPerRank=plan.slots_per_rank, slots=slots, method="Rotate")


def bench_prompts(o: BenchOptions) -> list[list[int]]:
    """`batch` prompts of `seq_len` tokens, Zipf(`zipf`) over the vocabulary, seeded."""
    rng = random.Random(f"bench/{o.seed}")
    cumulative = zipf_cumulative(o.model.vocab_size, o.zipf)
    last = len(cumulative) - 1
    return [
        [
            min(bisect_right(cumulative, rng.random() * cumulative[-1]), last)
            for _ in range(o.seq_len)
        ]
        for _ in range(o.batch)
    ]


def _timed(fn: Any, steps: int, device: torch.device) -> float:
    """Median seconds of `fn()` over `steps` runs, all ranks starting together."""
    times = []
    for _ in range(steps):
        dist.barrier()
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        dist.barrier()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def ep_prefill(
    engine: EPEngine, prompts: list[list[int]], device: torch.device, two_batch: bool = False
) -> torch.Tensor:
    """Collective: this rank's prompts (maybe none) through the EP engine into a fresh cache;
    logits at each prompt's last token. `two_batch` (the same on every rank) overlaps two
    micro-batches."""
    tokens = sum(len(p) for p in prompts)
    cache = KVCache.for_shape(
        engine.shape, max(tokens + 16 * len(prompts), 16), dtype=engine.dtype, device=device
    )
    items = [(i, p, 0) for i, p in enumerate(prompts)]
    if not two_batch:
        batch = StepBatch.build(items, device)
        return engine.forward(batch, cache, cache.prepare(batch))
    parts = split_items(items)
    batches = [StepBatch.build(part, device) for part in parts]
    metas = [cache.prepare(batch) for batch in batches]
    logits = engine.forward_overlapped(batches, cache, metas)
    return torch.cat(logits)[last_rows(items, parts)]


def _plain_matmuls(
    rows: int, shapes: tuple[tuple[int, int], ...], dtype: torch.dtype, device: torch.device
) -> Any:
    """One expert's matmuls as plain torch.matmul: x [rows, D] times each input matrix, then the
    last hidden [rows, F] times the output matrix (shapes: inputs [F, D], the output [D, F])."""
    *inputs, (d, f) = shapes
    x = torch.randn(rows, d, device=device, dtype=dtype)
    weights_in = [torch.randn(d, f, device=device, dtype=dtype) for _ in inputs]
    weight_out = torch.randn(f, d, device=device, dtype=dtype)

    def run() -> torch.Tensor:
        hidden = [torch.matmul(x, w) for w in weights_in]
        return torch.matmul(hidden[-1], weight_out)

    return run


def _rank_bench(rank: int, o: BenchOptions, device: torch.device) -> dict[str, Any]:
    c = o.model
    source = SyntheticWeights.for_shape(c, seed=o.seed)
    prompts = bench_prompts(o)
    tokens = o.batch * o.seq_len
    plan = round_robin_plan(c.layers, c.experts, o.world, -(-c.experts // o.world))
    engine = EPEngine(source, plan, rank=rank, device=device)
    mine = [prompts[i] for i in torch.arange(o.batch).tensor_split(o.world)[rank].tolist()]
    ep_prefill(engine, mine, device)  # warm-up
    engine.reset_timers()
    ep_seconds = _timed(lambda: ep_prefill(engine, mine, device), o.steps, device)
    moe_seconds, expert_seconds = engine.moe_seconds / o.steps, engine.expert_seconds / o.steps
    expert_rows = engine.expert_tokens / o.steps  # rows through this rank's experts per step
    shapes = source.arch.expert_shapes(c)
    flops_per_row = 2 * sum(r * k for r, k in shapes)  # 2 FLOPs per multiply-add
    expert_flops = expert_rows * flops_per_row

    dist.barrier()
    start = time.perf_counter()
    engine.apply_plan(rotated_plan(plan, 2))
    dist.barrier()
    pause = time.perf_counter() - start

    # The FLOPs of this rank's expert work per layer as plain matmuls, all ranks at once.
    rows = max(1, round(expert_rows / c.layers))
    matmuls = _plain_matmuls(rows, shapes, DTYPES[c.dtype], device)
    matmul_seconds = _timed(matmuls, o.steps + 2, device)
    matmul_flops = rows * flops_per_row / matmul_seconds

    baseline = TPPPModel(source, tp=o.tp, pp=o.pp, device=device)
    baseline.forward(prompts, o.micro_batches)  # warm-up
    tppp_seconds = _timed(lambda: baseline.forward(prompts, o.micro_batches), o.steps, device)

    moe_flops = expert_flops / moe_seconds if moe_seconds else 0.0
    return {
        "device": str(device),
        "world": o.world,
        "model": asdict(c),
        "tokens_per_step": tokens,
        "ep": {"layout": f"EP{o.world}", "tokens_per_s": tokens / ep_seconds, "step_s": ep_seconds},
        "tppp": {
            "layout": f"TP{o.tp}xPP{o.pp}",
            "tokens_per_s": tokens / tppp_seconds,
            "step_s": tppp_seconds,
        },
        "ratio": tppp_seconds / ep_seconds,
        "moe_layer_flops_per_s": moe_flops,
        "expert_flops_per_s": expert_flops / expert_seconds if expert_seconds else 0.0,
        "matmul_flops_per_s": matmul_flops,
        "moe_fraction_of_matmul": moe_flops / matmul_flops,
        "switch_pause_s": pause,
        "zipf": o.zipf,
    }


def _rank_main(rank: int, o: BenchOptions, port: int, out: str, cuda: bool) -> None:
    torch.set_num_threads(1)  # ranks share the machine's cores
    device = torch.device("cuda", rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    try:
        dist.init_process_group(
            "nccl" if cuda else "gloo",
            init_method=f"tcp://127.0.0.1:{port}",
            rank=rank,
            world_size=o.world,
            timeout=timedelta(minutes=5),
        )
        result = _rank_bench(rank, o, device)
        dist.destroy_process_group()
        if rank == 0:
            Path(out).write_text(json.dumps(result))
    except BaseException:
        traceback.print_exc()
        sys.exit(1)


def format_table(r: dict[str, Any]) -> str:
    m = r["model"]
    lines = [
        f"model: {m['architecture']} {m['layers']} layers x {m['experts']} experts, "
        f"D={m['hidden']} F={m['ffn_hidden']}, "
        f"{m['heads']}x{m['head_dim']} heads, top-{m['top_k']}, {m['dtype']}; "
        f"{r['tokens_per_step']} tokens/step on {r['world']} ranks ({r['device']}), "
        f"zipf {r['zipf']}",
        f"{'layout':<12}{'tokens/s':>12}{'step (s)':>12}",
        f"{r['ep']['layout']:<12}{r['ep']['tokens_per_s']:>12.0f}{r['ep']['step_s']:>12.4f}",
        f"{r['tppp']['layout']:<12}{r['tppp']['tokens_per_s']:>12.0f}{r['tppp']['step_s']:>12.4f}",
        f"EP / TPxPP throughput ratio:          {r['ratio']:.2f}x",
        f"MoE layer achieved FLOP/s (rank 0):   {r['moe_layer_flops_per_s'] / 1e9:.2f} GFLOP/s "
        f"= {r['moe_fraction_of_matmul']:.0%} of a plain matmul of the same shapes "
        f"({r['matmul_flops_per_s'] / 1e9:.2f} GFLOP/s; experts alone "
        f"{r['expert_flops_per_s'] / 1e9:.2f})",
        f"plan switch pause (every expert moves): {r['switch_pause_s'] * 1e3:.1f} ms",
    ]
    return "\n".join(lines)


def run_bench(options: BenchOptions, json_path: str | None = None) -> dict[str, Any]:
    cuda = torch.cuda.is_available() and torch.cuda.device_count() >= options.world
    ctx = multiprocessing.get_context("spawn" if cuda else "fork")  # CUDA cannot be forked
    port = options.port or free_port()
    with tempfile.TemporaryDirectory() as tmp:
        out = str(Path(tmp) / "rank0.json")
        procs = [
            ctx.Process(target=_rank_main, args=(r, options, port, out, cuda))
            for r in range(options.world)
        ]
        for p in procs:
            p.start()
        for p in procs:
            p.join()
        if any(p.exitcode != 0 for p in procs) or not Path(out).exists():
            raise SystemExit(f"bench failed: exit codes {[p.exitcode for p in procs]}")
        result: dict[str, Any] = json.loads(Path(out).read_text())
    print(format_table(result))
    if json_path:
        Path(json_path).write_text(json.dumps(result, indent=2) + "\n")
    return result


def add_parser(sub: Any) -> None:
    """`moe-worker bench` and its flags."""
    bench = sub.add_parser("bench", help="EP vs TP x PP on this machine, one invocation")
    bench.add_argument("--json", dest="json_path", help="also write the figures to this file")
    bench.add_argument("--world", type=int, default=4)
    bench.add_argument("--tp", type=int, help="tensor parallel of the baseline (default world/pp)")
    bench.add_argument("--pp", type=int, default=2, help="pipeline stages of the baseline")
    bench.add_argument("--batch", type=int, default=8, help="sequences per step (whole world)")
    bench.add_argument("--seq-len", type=int, default=128)
    bench.add_argument("--steps", type=int, default=5)
    bench.add_argument("--micro-batches", type=int, default=4)
    bench.add_argument("--zipf", type=float, default=0.0)
    bench.add_argument("--seed", type=int, default=0)
    bench.add_argument("--port", type=int, default=0, help="rendezvous port (0: a free one)")
    add_model_flags(bench)
    bench.set_defaults(run=_run_from_args)


def _run_from_args(args: argparse.Namespace) -> int:
    options = BenchOptions(
        model=BenchOptions().model.replace(**model_overrides(args)),
        world=args.world,
        pp=args.pp,
        tp=args.tp or max(1, args.world // args.pp),
        batch=args.batch,
        seq_len=args.seq_len,
        steps=args.steps,
        micro_batches=args.micro_batches,
        zipf=args.zipf,
        seed=args.seed,
        port=args.port,
    )
    run_bench(options, json_path=args.json_path)
    return 0
