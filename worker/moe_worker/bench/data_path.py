"""The EP data path's figures for `moe-worker bench`, measured on every rank of one world.

Each function is collective (all ranks call it at the same point) and returns rank-local
figures; `bench.py` reports rank 0's. Times are medians of `steps` runs, all ranks starting
together (a barrier before each).

- `moe_path`: the MoE layer against a plain matmul of the same shapes: by the serving thread's
  CPU time (the token path itself: routing, permutation, grouped GEMM, combine; the all-to-alls'
  waits cost no CPU), and by wall time with the all-to-alls. The plain matmul is the experts'
  matrix products alone; the MoE side also runs the experts' activation (GELU, SwiGLU's
  silu-and-multiply), so the layer is also compared with a dense FFN: one expert's own
  `expert_forward` on all of a layer's rows at once (matmuls and activation, no routing).
- `overlap`: step time without and with two-batch overlap on the same prompts, the exposed
  communication of the step without it, and the overlap efficiency the performance model takes
  (`moe-ep perf`): the fraction of min(compute, communication) the overlap hid.
- `switches`: a blocking switch (every expert moves) against a background one (every expert
  moves back while prefill steps keep running): pauses, transfer time, step time meanwhile.
- `decode_step`: one decode token per sequence after a prefill (what a background switch's pause
  is compared with).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist

from moe_contract.plan import Plan
from moe_worker.ep.engine import EPEngine
from moe_worker.ep.two_batch import last_rows, split_items
from moe_worker.models import ExpertWeights
from moe_worker.models.grouped import SlotGroups, grouped_mm_works
from moe_worker.models.kv_cache import KVCache, StepBatch
from moe_worker.switch.mover import ExpertMover
from moe_worker.switch.transfer import DONE, new_transfer_group

Prompts = list[list[int]]


def timed(fn: Callable[[], object], steps: int, device: torch.device) -> float:
    """Median seconds of `fn()` over `steps` runs, all ranks starting together."""
    return statistics.median(alternate({"fn": fn}, steps, device)["fn"])


def alternate(
    fns: dict[str, Callable[[], object]], rounds: int, device: torch.device
) -> dict[str, list[float]]:
    """Seconds of each fn per round, the fns taking turns within a round (all ranks starting
    each together), so that what they are compared with saw the same load: this machine's
    cores are shared and its speed drifts within seconds."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            dist.barrier()
            start = time.perf_counter()
            fn()
            if device.type == "cuda":
                torch.cuda.synchronize()
            dist.barrier()
            times[name].append(time.perf_counter() - start)
    return times


def ep_prefill(
    engine: EPEngine, prompts: Prompts, device: torch.device, two_batch: bool = False
) -> torch.Tensor:
    """Collective: this rank's prompts (maybe none) through the EP engine into a fresh cache;
    logits at each prompt's last token. `two_batch` (the same on every rank) overlaps two
    micro-batches."""
    cache = _cache(engine, prompts, device)
    items = [(i, p, 0) for i, p in enumerate(prompts)]
    if not two_batch:
        batch = StepBatch.build(items, device)
        return engine.forward(batch, cache, cache.prepare(batch))
    parts = split_items(items)
    batches = [StepBatch.build(part, device) for part in parts]
    metas = [cache.prepare(batch) for batch in batches]
    logits = engine.forward_overlapped(batches, cache, metas)
    return torch.cat(logits)[last_rows(items, parts)]


def _cache(engine: EPEngine, prompts: Prompts, device: torch.device) -> KVCache:
    tokens = sum(len(p) for p in prompts)
    size = max(tokens + 16 * (len(prompts) + 1), 16)
    return KVCache.for_shape(engine.shape, size, dtype=engine.dtype, device=device)


def plain_matmuls(
    rows: int, shapes: tuple[tuple[int, int], ...], dtype: torch.dtype, device: torch.device
) -> Callable[[], torch.Tensor]:
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


def dense_ffn(engine: EPEngine, rows: int, device: torch.device) -> Callable[[], torch.Tensor]:
    """Slot 0's expert of layer 0 as a dense FFN on `rows` random rows: the family's own
    `expert_forward`, its matmuls and activation, without routing or grouping."""
    weights = ExpertWeights(tuple(stack[0] for stack in engine.stacks.layer(0)))
    x_ND = torch.randn(rows, engine.shape.hidden, device=device, dtype=engine.dtype)
    return lambda: engine.arch.expert_forward(x_ND, weights)


def moe_path(
    engine: EPEngine, prompts: Prompts, steps: int, device: torch.device
) -> dict[str, Any]:
    """The MoE layer's achieved FLOP/s against a plain matmul of its shapes, round by round.

    By CPU time of the serving thread (`time.thread_time`): what the token path costs itself,
    which four ranks sharing two cores (and other work on the machine) do not change; and by
    wall time, its all-to-alls included (waiting for the other ranks counts there)."""
    c = engine.shape
    shapes = engine.arch.expert_shapes(c)
    flops_per_row = 2 * sum(r * k for r, k in shapes)  # 2 FLOPs per multiply-add
    ep_prefill(engine, prompts, device)  # warm-up, and the rows of a step
    expert_flops = engine.expert_tokens * flops_per_row
    layer_rows = max(1, round(engine.expert_tokens / c.layers))
    matmul = plain_matmuls(layer_rows, shapes, engine.dtype, device)
    ffn = dense_ffn(engine, layer_rows, device)
    moe: list[tuple[float, float, float, float]] = []  # wall, cpu, comm wall, experts cpu
    matmul_cpu: list[float] = []
    ffn_cpu: list[float] = []

    def prefill() -> None:
        engine.reset_timers()
        ep_prefill(engine, prompts, device)
        e = engine
        moe.append((e.moe_seconds, e.moe_cpu_seconds, e.comm_seconds, e.expert_cpu_seconds))

    def matmuls() -> None:  # a step's expert FLOPs (every layer's) as plain matmuls
        cpu = time.thread_time()
        for _ in range(c.layers):
            matmul()
        matmul_cpu.append(time.thread_time() - cpu)

    def ffns() -> None:  # the same FLOPs as one dense FFN per layer, activation included
        cpu = time.thread_time()
        for _ in range(c.layers):
            ffn()
        ffn_cpu.append(time.thread_time() - cpu)

    times = alternate({"step": prefill, "matmul": matmuls, "ffn": ffns}, steps, device)
    rate = {
        "matmul_cpu": [expert_flops / t for t in matmul_cpu],
        "ffn_cpu": [expert_flops / t for t in ffn_cpu],
        "matmul_wall": [expert_flops / t for t in times["matmul"]],
        "moe_cpu": [expert_flops / cpu for _, cpu, _, _ in moe],
        "moe_wall": [expert_flops / wall for wall, _, _, _ in moe],
        "experts_cpu": [expert_flops / cpu for _, _, _, cpu in moe],
    }
    median = {key: statistics.median(values) for key, values in rate.items()}
    return {
        "step_s": statistics.median(times["step"]),
        "moe_layer_cpu_flops_per_s": median["moe_cpu"],
        "moe_layer_flops_per_s": median["moe_wall"],
        "expert_cpu_flops_per_s": median["experts_cpu"],
        "matmul_cpu_flops_per_s": median["matmul_cpu"],
        "dense_ffn_cpu_flops_per_s": median["ffn_cpu"],
        "matmul_flops_per_s": median["matmul_wall"],
        "fraction": _median_ratio(rate["moe_cpu"], rate["matmul_cpu"]),
        "fraction_of_dense_ffn": _median_ratio(rate["moe_cpu"], rate["ffn_cpu"]),
        "experts_fraction_of_dense_ffn": _median_ratio(rate["experts_cpu"], rate["ffn_cpu"]),
        "fraction_with_comm": _median_ratio(rate["moe_wall"], rate["matmul_wall"]),
        "comm_seconds_per_step": statistics.median(comm for _, _, comm, _ in moe),
        "grouped_gemm_kernel": engine.kernel,
        "kernels": _kernels(engine, layer_rows, steps, device),
    }


def _median_ratio(tops: list[float], bottoms: list[float]) -> float:
    """Median over rounds of top / bottom (each round's two figures saw the same load)."""
    return statistics.median(t / b for t, b in zip(tops, bottoms, strict=True))


def _kernels(engine: EPEngine, rows: int, steps: int, device: torch.device) -> dict[str, float]:
    """Layer 0's experts on `rows` rows spread evenly over its slots, per kernel (no
    communication), seconds of the serving thread's CPU: what the CPU `_grouped_mm` fallback
    does against the loop."""
    stacks = engine.stacks.layer(0)
    slots = stacks[0].shape[0]
    sizes = [len(part) for part in torch.arange(rows).tensor_split(slots)]
    x_nD = torch.randn(rows, engine.shape.hidden, dtype=engine.dtype, device=device)
    cpu: dict[str, list[float]] = {}
    fns = {}
    for kernel in ("loop", "grouped_mm"):
        if kernel == "grouped_mm" and not grouped_mm_works(device.type, engine.dtype):
            continue
        groups = SlotGroups.of(sizes, kernel, torch.tensor(sizes, device=device))
        fns[kernel] = _cpu_timed(
            lambda g=groups: engine.arch.grouped_forward(x_nD, stacks, g),
            cpu.setdefault(kernel, []),
        )
    alternate(fns, steps, device)
    return {f"{kernel}_cpu_s": statistics.median(t) for kernel, t in cpu.items()}


def _cpu_timed(fn: Callable[[], object], times: list[float]) -> Callable[[], None]:
    """`fn`, appending the serving thread's CPU seconds of each call to `times`."""

    def run() -> None:
        start = time.thread_time()
        fn()
        times.append(time.thread_time() - start)

    return run


def overlap(engine: EPEngine, prompts: Prompts, steps: int, device: torch.device) -> dict[str, Any]:
    """Step time without and with two-batch overlap, alternating; efficiency = the time saved
    over min(compute, exposed communication) of the step without."""
    ep_prefill(engine, prompts, device)
    ep_prefill(engine, prompts, device, two_batch=True)  # warm-up both
    comm: list[float] = []
    cpu: dict[str, list[float]] = {"without": [], "with": []}

    def without() -> None:
        engine.reset_timers()
        ep_prefill(engine, prompts, device)
        comm.append(engine.comm_seconds)

    times = alternate(
        {
            "without": _process_cpu_timed(without, cpu["without"]),
            "with": _process_cpu_timed(
                lambda: ep_prefill(engine, prompts, device, True), cpu["with"]
            ),
        },
        steps,
        device,
    )
    return _overlap_figures(times["without"], times["with"], comm, cpu)


def _process_cpu_timed(fn: Callable[[], object], times: list[float]) -> Callable[[], None]:
    """`fn`, appending the CPU seconds of the whole process (every thread: gloo's workers, which
    copy the all-to-alls' bytes, as well as the serving thread) of each call to `times`."""

    def run() -> None:
        start = time.process_time()
        fn()
        times.append(time.process_time() - start)

    return run


def _overlap_figures(
    without: list[float], with_: list[float], comm: list[float], cpu: dict[str, list[float]]
) -> dict[str, Any]:
    """Step times, speedup, exposed communication and efficiency; and the process CPU time of a
    step without and with overlap: on a CPU whose cores are all busy, overlap can only win if
    it does not add CPU work (it adds collectives and halves the GEMMs)."""
    without_s, with_s = statistics.median(without), statistics.median(with_)
    comm_s = statistics.median(comm)
    hideable = min(comm_s, without_s - comm_s)
    efficiency = (without_s - with_s) / hideable if hideable > 0 else 0.0
    cpu_without, cpu_with = statistics.median(cpu["without"]), statistics.median(cpu["with"])
    return {
        "step_s_without": without_s,
        "step_s_with": with_s,
        "speedup": without_s / with_s,
        "comm_fraction": comm_s / without_s,
        "efficiency": min(1.0, max(0.0, efficiency)),
        "process_cpu_s_without": cpu_without,
        "process_cpu_s_with": cpu_with,
        "cpu_ratio": cpu_with / cpu_without if cpu_without > 0 else 1.0,
    }


def decode_steps(
    engine: EPEngine, prompts: Prompts, steps: int, device: torch.device
) -> dict[str, Any]:
    """Decode steps (every sequence feeds one more token after its prompt) without and with
    two-batch overlap, alternating."""
    comm: list[float] = []
    cpu: dict[str, list[float]] = {"without": [], "with": []}

    def without() -> None:
        engine.reset_timers()
        plain()
        comm.append(engine.comm_seconds)

    plain = decoder(engine, prompts, steps, device, two_batch=False)
    overlapped = decoder(engine, prompts, steps, device, two_batch=True)
    times = alternate(
        {
            "without": _process_cpu_timed(without, cpu["without"]),
            "with": _process_cpu_timed(overlapped, cpu["with"]),
        },
        steps,
        device,
    )
    return _overlap_figures(times["without"], times["with"], comm, cpu)


def decoder(
    engine: EPEngine, prompts: Prompts, steps: int, device: torch.device, two_batch: bool
) -> Callable[[], None]:
    """A prefilled cache, and a function running its next decode step (warmed up)."""
    cache = _cache(engine, [p + [0] * (steps + 2) for p in prompts], device)
    prefill = StepBatch.build([(i, p, 0) for i, p in enumerate(prompts)], device)
    engine.forward(prefill, cache, cache.prepare(prefill))
    done = [0]

    def step() -> None:
        items = [(i, [p[-1]], len(p) + done[0]) for i, p in enumerate(prompts)]
        parts = split_items(items) if two_batch else [items]
        batches = [StepBatch.build(part, device) for part in parts]
        metas = [cache.prepare(batch) for batch in batches]
        if two_batch:
            engine.forward_overlapped(batches, cache, metas)
        else:
            engine.forward(batches[0], cache, metas[0])
        done[0] += 1

    step()
    return step


def switches(
    engine: EPEngine,
    moved: Plan,
    back: Plan,
    prompts: Prompts,
    device: torch.device,
    timeout_s: float = 120.0,
) -> dict[str, Any]:
    """A blocking switch to `moved`, then a background one to `back` under prefill steps."""
    mover = ExpertMover(engine)
    dist.barrier()
    start = time.perf_counter()
    mover.apply(moved)
    dist.barrier()
    blocking_s = time.perf_counter() - start

    group = new_transfer_group(timeout_s)
    dist.barrier()
    transfer = mover.start(back, group)
    transfer.watch()
    step_times = []
    while True:  # serve on the old plan until every rank's experts landed
        step_start = time.perf_counter()
        ep_prefill(engine, prompts, device)
        step_times.append(time.perf_counter() - step_start)
        landed = torch.tensor([transfer.status().state == DONE], dtype=torch.int64)
        dist.all_reduce(landed, op=dist.ReduceOp.MIN)  # what the leader's gather decides
        if landed.item():
            break
    start = time.perf_counter()
    mover.flip(back, transfer)
    pause_s = time.perf_counter() - start
    dist.barrier()
    dist.destroy_process_group(group)
    return {
        "switch_pause_s": blocking_s,
        "switch_pause_nonblocking_s": pause_s,
        "switch_transfer_s": transfer.status().seconds,
        "step_s_during_switch": statistics.median(step_times),
        "steps_during_switch": len(step_times),
    }
