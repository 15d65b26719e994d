"""`moe-worker bench`: the EP layout and the TP x PP layout of the same model on the same tokens.

One invocation forks `world` ranks (gloo on CPU, one thread each; nccl when there are `world`
GPUs), times both layouts on the same global batch, a plan switch that moves every expert, and a
plain matmul of the experts' shapes run concurrently on every rank (so it sees the same contention
as serving). Rank 0's figures are reported.
"""

from __future__ import annotations

import json
import multiprocessing
import socket
import statistics
import sys
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from moe_worker.baseline import TPPPModel
from moe_worker.engine import EPEngine
from moe_worker.model import generator_for, torch_dtype
from moe_worker.plan import Plan, round_robin_plan
from moe_worker.shape import ModelShape
from moe_worker.traffic import zipf_logit_offset


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


def _rank_bench(rank: int, o: BenchOptions, device: torch.device) -> dict[str, Any]:
    c = o.model
    x_BTD = torch.randn(o.batch, o.seq_len, c.hidden, generator=generator_for(o.seed, "bench"))
    offset = zipf_logit_offset(c.experts, o.zipf)
    tokens = o.batch * o.seq_len
    plan = round_robin_plan(c.layers, c.experts, o.world, -(-c.experts // o.world))

    engine = EPEngine(c, plan, rank=rank, device=device, seed=o.seed)
    mine = x_BTD.tensor_split(o.world)[rank]
    engine.forward(mine, offset)  # warm-up
    engine.reset_timers()
    ep_seconds = _timed(lambda: engine.forward(mine, offset), o.steps, device)
    moe_seconds, expert_seconds = engine.moe_seconds / o.steps, engine.expert_seconds / o.steps
    expert_rows = engine.expert_tokens / o.steps  # rows through this rank's experts per step
    expert_flops = 4 * expert_rows * c.hidden * c.ffn_hidden  # two matmuls, 2 FLOPs per MAC

    dist.barrier()
    start = time.perf_counter()
    engine.apply_plan(rotated_plan(plan, 2))
    dist.barrier()
    pause = time.perf_counter() - start

    # The FLOPs of this rank's expert work per layer as two plain matmuls, all ranks at once.
    rows = max(1, round(expert_rows / c.layers))
    dtype = torch_dtype(c)
    a = torch.randn(rows, c.hidden, device=device, dtype=dtype)
    w_in = torch.randn(c.hidden, c.ffn_hidden, device=device, dtype=dtype)
    w_out = torch.randn(c.ffn_hidden, c.hidden, device=device, dtype=dtype)
    matmul_seconds = _timed(lambda: torch.matmul(torch.matmul(a, w_in), w_out), o.steps + 2, device)
    matmul_flops = 4 * rows * c.hidden * c.ffn_hidden / matmul_seconds

    baseline = TPPPModel(c, tp=o.tp, pp=o.pp, device=device, seed=o.seed)
    baseline.forward(x_BTD, o.micro_batches)  # warm-up
    tppp_seconds = _timed(lambda: baseline.forward(x_BTD, o.micro_batches), o.steps, device)

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


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def format_table(r: dict[str, Any]) -> str:
    m = r["model"]
    lines = [
        f"model: {m['layers']} layers x {m['experts']} experts, "
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
    port = options.port or _free_port()
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
