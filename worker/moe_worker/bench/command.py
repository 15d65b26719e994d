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
import sys
import tempfile
import traceback
from bisect import bisect_right
from dataclasses import asdict, dataclass, field, replace
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from moe_contract.plan import Plan, round_robin_plan
from moe_contract.shape import ModelShape
from moe_worker.bench import data_path as bench_ep
from moe_worker.bench.baseline import TPPPModel
from moe_worker.ep.engine import EPEngine
from moe_worker.flags import add_model_flags, model_overrides
from moe_worker.launcher import free_port
from moe_worker.models.weights import SyntheticWeights
from moe_worker.serving.traffic import zipf_cumulative


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
    comm_model: ModelShape = field(
        default_factory=lambda: ModelShape(
            layers=4, experts=8, hidden=256, ffn_hidden=64, heads=4, head_dim=32, top_k=2
        )
    )
    """The communication-heavy shape of the overlap measurement: small experts and attention,
    so the all-to-all is a large part of a step (its share is measured and reported)."""
    comm_batch: int = 8
    comm_seq_len: int = 128


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


def _rank_bench(rank: int, o: BenchOptions, device: torch.device) -> dict[str, Any]:
    c = o.model
    source = SyntheticWeights.for_shape(c, seed=o.seed)
    prompts = bench_prompts(o)
    tokens = o.batch * o.seq_len
    plan = round_robin_plan(c.layers, c.experts, o.world, -(-c.experts // o.world))
    engine = EPEngine(source, plan, rank=rank, device=device)
    mine = [prompts[i] for i in torch.arange(o.batch).tensor_split(o.world)[rank].tolist()]
    path = bench_ep.moe_path(engine, mine, o.steps, device)
    overlapped = bench_ep.overlap(engine, mine, o.steps, device)
    decode = bench_ep.decode_steps(engine, mine, o.steps, device)
    switched = bench_ep.switches(engine, rotated_plan(plan, 2), plan.with_version(3), mine, device)
    del engine

    heavy = _comm_heavy_overlap(rank, o, device)

    baseline = TPPPModel(source, tp=o.tp, pp=o.pp, device=device)
    baseline.forward(prompts, o.micro_batches)  # warm-up
    tppp_seconds = bench_ep.timed(
        lambda: baseline.forward(prompts, o.micro_batches), o.steps, device
    )
    ep_seconds = path["step_s"]
    # Key order matters to `moe-ep perf --bench-json` (it takes the first match of a word):
    # the token-path fraction and the blocking pause come first.
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
        "moe_fraction_of_matmul": path["fraction"],
        "moe_fraction_of_matmul_with_comm": path["fraction_with_comm"],
        "moe_fraction_of_dense_ffn": path["fraction_of_dense_ffn"],
        "experts_fraction_of_dense_ffn": path["experts_fraction_of_dense_ffn"],
        "moe_layer_cpu_flops_per_s": path["moe_layer_cpu_flops_per_s"],
        "expert_cpu_flops_per_s": path["expert_cpu_flops_per_s"],
        "matmul_cpu_flops_per_s": path["matmul_cpu_flops_per_s"],
        "dense_ffn_cpu_flops_per_s": path["dense_ffn_cpu_flops_per_s"],
        "moe_layer_flops_per_s": path["moe_layer_flops_per_s"],
        "matmul_flops_per_s": path["matmul_flops_per_s"],
        "moe_comm_s_per_step": path["comm_seconds_per_step"],
        "grouped_gemm_kernel": path["grouped_gemm_kernel"],
        "grouped_gemm_kernels_s": path["kernels"],
        "switch_pause_s": switched["switch_pause_s"],
        "switch_pause_nonblocking_s": switched["switch_pause_nonblocking_s"],
        "switch_transfer_s": switched["switch_transfer_s"],
        "step_s_during_switch": switched["step_s_during_switch"],
        "steps_during_switch": switched["steps_during_switch"],
        "step_s_before_switch": ep_seconds,
        "decode_step_s": decode["step_s_without"],
        "overlap_speedup": overlapped["speedup"],
        "overlap_speedup_comm_heavy": heavy["speedup"],
        "overlap_speedup_decode": decode["speedup"],
        "overlap_efficiency": overlapped["efficiency"],
        "overlap_efficiency_comm_heavy": heavy["efficiency"],
        "overlap": {"bench_shape": overlapped, "comm_heavy": heavy, "decode": decode},
        "comm_heavy_model": asdict(o.comm_model),
        "zipf": o.zipf,
    }


def _comm_heavy_overlap(rank: int, o: BenchOptions, device: torch.device) -> dict[str, Any]:
    """Two-batch overlap at `o.comm_model`, a shape whose all-to-all is a large part of a step."""
    c = o.comm_model
    source = SyntheticWeights.for_shape(c, seed=o.seed)
    plan = round_robin_plan(c.layers, c.experts, o.world, -(-c.experts // o.world))
    engine = EPEngine(source, plan, rank=rank, device=device)
    prompts = bench_prompts(replace(o, model=c, batch=o.comm_batch, seq_len=o.comm_seq_len))
    mine = [prompts[i] for i in torch.arange(o.comm_batch).tensor_split(o.world)[rank].tolist()]
    return bench_ep.overlap(engine, mine, o.steps, device)


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
    m, heavy = r["model"], r["overlap"]["comm_heavy"]
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
        f"MoE layer, CPU time (rank 0, {r['grouped_gemm_kernel']}): "
        f"{r['moe_layer_cpu_flops_per_s'] / 1e9:.2f} GFLOP/s = "
        f"{r['moe_fraction_of_matmul']:.0%} of a plain matmul of the same shapes "
        f"({r['matmul_cpu_flops_per_s'] / 1e9:.2f} GFLOP/s; experts alone "
        f"{r['expert_cpu_flops_per_s'] / 1e9:.2f})",
        f"MoE layer, CPU time, against a dense FFN of the same FLOPs (one expert's matmuls and "
        f"activation, {r['dense_ffn_cpu_flops_per_s'] / 1e9:.2f} GFLOP/s): "
        f"{r['moe_fraction_of_dense_ffn']:.0%} (experts alone "
        f"{r['experts_fraction_of_dense_ffn']:.0%})",
        f"MoE layer, wall time with its all-to-alls: {r['moe_layer_flops_per_s'] / 1e9:.2f} "
        f"GFLOP/s = {r['moe_fraction_of_matmul_with_comm']:.0%} of the plain matmul's "
        f"{r['matmul_flops_per_s'] / 1e9:.2f}",
        "two-batch overlap, step time without / with: "
        f"prefill {r['overlap_speedup']:.2f}x (all-to-all "
        f"{r['overlap']['bench_shape']['comm_fraction']:.0%} of a step, efficiency "
        f"{r['overlap_efficiency']:.2f}), communication-heavy shape "
        f"{r['overlap_speedup_comm_heavy']:.2f}x ({heavy['comm_fraction']:.0%}, "
        f"{r['overlap_efficiency_comm_heavy']:.2f}), decode {r['overlap_speedup_decode']:.2f}x",
        "two-batch overlap, CPU time of a step (every thread of the rank) with / without: "
        f"prefill {r['overlap']['bench_shape']['cpu_ratio']:.2f}x, communication-heavy "
        f"{heavy['cpu_ratio']:.2f}x, decode {r['overlap']['decode']['cpu_ratio']:.2f}x",
        f"plan switch pause (every expert moves): blocking {r['switch_pause_s'] * 1e3:.1f} ms, "
        f"background {r['switch_pause_nonblocking_s'] * 1e3:.2f} ms "
        f"(decode step {r['decode_step_s'] * 1e3:.1f} ms); transfer "
        f"{r['switch_transfer_s'] * 1e3:.1f} ms, prefill step meanwhile "
        f"{r['step_s_during_switch']:.4f} s (before: {r['step_s_before_switch']:.4f} s)",
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
