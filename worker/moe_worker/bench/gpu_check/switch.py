"""(d) The background plan switch's serving pause against a decode step, on the device.

One rank holds every expert (world 1), so nothing travels between ranks and the pause is what
the flip itself costs: rewriting the changed slots of the stacked expert tensors (each source
cloned first, it may be overwritten) or, for one more slot per rank, rebuilding every layer's
stacks. Cases: two slots of every layer swapped (a rebalance's typical change), every slot
rewritten, one slot added. The switch runs through `BackgroundSwitcher` (start, the transfer
watched until done, flip), as a rank of the serving loop runs it; each switch is undone by the
next one, so every case starts from the round-robin plan.

The pause is timed two ways: the host time of `flip` (what the serving loop reports; on CUDA the
copies are only queued), and flip until the device finished its copies (what delays the next
step). The decode step is one token for each of `batch` sequences after a prefill of `context`
tokens, median of `steps`, before and after the switches.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

import torch

from moe_contract.plan import Plan
from moe_contract.shape import ModelShape
from moe_worker.bench.data_path import decoder
from moe_worker.bench.gpu_check.device import Device
from moe_worker.bench.gpu_check.record import Recorder
from moe_worker.bench.gpu_check.synthetic import DeviceWeights, prompts, world1_plan
from moe_worker.ep.engine import EPEngine
from moe_worker.switch.mover import ExpertMover
from moe_worker.switch.switcher import BackgroundSwitcher
from moe_worker.switch.transfer import DONE

MIB = 2**20


@dataclass(frozen=True)
class SwitchOptions:
    shape: ModelShape
    batch: int
    context: int
    steps: int = 10
    repeats: int = 3
    """Switches per case (each followed by the one back)."""


GPU = SwitchOptions(
    shape=ModelShape(
        layers=2, experts=16, hidden=4096, ffn_hidden=16384, heads=32, head_dim=128, kv_heads=8,
        top_k=2, vocab_size=32000, dtype="bfloat16",
    ),
    batch=64,
    context=512,
)  # fmt: skip
TINY = SwitchOptions(
    shape=ModelShape(
        layers=2, experts=4, hidden=32, ffn_hidden=64, heads=4, head_dim=8, kv_heads=2, top_k=2,
        vocab_size=64, dtype="float32",
    ),
    batch=3,
    context=8,
    steps=2,
    repeats=1,
)  # fmt: skip


def run(out: Recorder, device: Device, options: SwitchOptions = GPU) -> None:
    s = options.shape
    experts = tuple(range(s.experts))
    base = world1_plan(s.layers, experts, 1)
    engine = EPEngine(DeviceWeights(s, device.torch), base, rank=0, device=device.torch)
    out.put("expert_slot_mib", engine.expert_bytes / MIB)
    out.put("kernel", engine.kernel)
    switcher = BackgroundSwitcher(ExpertMover(engine), world_size=1, timeout_s=60.0)
    texts = prompts(options.batch, options.context, s.vocab_size)
    budget = 2 * options.steps + 2
    with torch.inference_mode():
        step = decoder(engine, texts, budget, device.torch, two_batch=False)
        out.put("decode_step_ms", _median_ms(device, step, options.steps))
        swapped = (1, 0, *experts[2:])
        cases = {
            "swap_two_slots": (swapped, 2),
            "every_slot": (tuple(reversed(experts)), s.experts),
            "one_more_slot": ((*experts, 0), s.experts + 1),
        }
        version = 1
        for name, (slots, rewritten) in cases.items():
            pauses: list[tuple[float, float]] = []
            for _ in range(options.repeats):
                version += 1
                pauses.append(pause(switcher, device, world1_plan(s.layers, slots, version)))
                version += 1
                pause(switcher, device, base.with_version(version))  # back
            host = statistics.median(p for p, _ in pauses)
            done = statistics.median(d for _, d in pauses)
            out.put("cases", name, _figures(engine, host, done, rewritten, out.data))
        out.put("decode_step_ms_after", _median_ms(device, step, options.steps))


def pause(switcher: BackgroundSwitcher, device: Device, plan: Plan) -> tuple[float, float]:
    """Start a background switch, wait until its transfer is done, flip: (host seconds of the
    flip as the serving loop times it, seconds until the device finished it)."""
    switcher.start(plan)
    transfer = switcher.transfer
    if transfer is None:
        raise RuntimeError(f"the switch to plan {plan.version} did not start: {switcher.error}")
    deadline = time.monotonic() + 60
    while transfer.status().state != DONE:
        if time.monotonic() > deadline:
            raise TimeoutError(f"plan {plan.version}: transfer {transfer.status()}")
        time.sleep(0.001)
    device.sync()
    start = time.perf_counter()
    _, _, host_pause, _ = switcher.flip(plan.version)
    device.sync()
    return host_pause, time.perf_counter() - start


def _median_ms(device: Device, step: object, steps: int) -> float:
    assert callable(step)
    return 1e3 * device.time(step, warmup=0, repeats=steps)


def _figures(
    engine: EPEngine, host_s: float, done_s: float, rewritten: int, data: dict[str, object]
) -> dict[str, float]:
    moved = rewritten * engine.shape.layers * engine.expert_bytes
    decode_ms = data["decode_step_ms"]
    assert isinstance(decode_ms, float)
    return {
        "slots_rewritten_per_layer": rewritten,
        "bytes_written_mib": moved / MIB,
        "pause_host_ms": host_s * 1e3,
        "pause_ms": done_s * 1e3,
        "pause_over_decode_step": done_s * 1e3 / decode_ms,
        "write_gb_per_s": moved / done_s / 1e9,
    }
