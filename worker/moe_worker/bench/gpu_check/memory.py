"""(f) The free-memory check behind slot growth (`ExpertMover.check_memory`), on the device.

1. The figure it reads (`cuda_free_bytes`: free memory plus what torch's allocator caches unused)
   drops by what a plain allocation takes, and comes back when it is freed.
2. A plan with one more slot per rank (a replica of expert 0) applies: the bytes `switch_bytes`
   predicted against the peak the allocator saw while it applied, and the same logits after.
3. With ballast leaving half of what the next growth needs, that plan is refused with PlanError
   before anything moves, and the stacks are unchanged.
4. A plan that only permutes the slots (nothing received, nothing added: predicted 0 bytes), its
   peak measured: rewriting a slot from another local slot clones the source first.

On the CPU (tests) free memory is the `Device`'s simulated budget and peaks are not measured.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from moe_contract.plan import Plan, PlanError
from moe_contract.shape import ModelShape
from moe_worker.bench.data_path import ep_prefill
from moe_worker.bench.gpu_check.device import Device
from moe_worker.bench.gpu_check.record import Recorder
from moe_worker.bench.gpu_check.synthetic import DeviceWeights, prompts, world1_plan
from moe_worker.ep.engine import EPEngine
from moe_worker.switch.mover import ExpertMover, switch_bytes

MIB = 2**20


@dataclass(frozen=True)
class MemoryOptions:
    shape: ModelShape
    probe_bytes: int
    tolerance_bytes: int = 64 * MIB
    """How far the free figure may move from the probe's size, and a switch's peak rise above
    its prediction (allocator rounding, the plan's small routing tables)."""


GPU = MemoryOptions(
    shape=ModelShape(
        layers=2, experts=4, hidden=4096, ffn_hidden=16384, heads=32, head_dim=128, kv_heads=8,
        top_k=2, vocab_size=32000, dtype="bfloat16",
    ),
    probe_bytes=2**30,
)  # fmt: skip
TINY = MemoryOptions(
    shape=ModelShape(
        layers=2, experts=4, hidden=32, ffn_hidden=64, heads=4, head_dim=8, kv_heads=2, top_k=2,
        vocab_size=64, dtype="float32",
    ),
    probe_bytes=MIB,
    tolerance_bytes=0,
)  # fmt: skip


def run(out: Recorder, device: Device, options: MemoryOptions = GPU) -> None:
    out.put("free_gib_at_start", device.free_bytes() / 2**30)
    out.put("tracks_allocation", tracks_allocation(device, options))
    s = options.shape
    experts = tuple(range(s.experts))
    engine = EPEngine(
        DeviceWeights(s, device.torch),
        world1_plan(s.layers, experts, 1),
        rank=0,
        device=device.torch,
    )
    mover = ExpertMover(engine, device.free_bytes)  # CUDA: the mover's own figure; CPU: budget
    out.put("expert_slot_mib", engine.expert_bytes / MIB)
    texts = prompts(3, 16, s.vocab_size)
    with torch.inference_mode():
        before = ep_prefill(engine, texts, device.torch)
    grown = world1_plan(s.layers, (*experts, 0), 2)
    out.put("grow", switch_peak(mover, device, grown, options.tolerance_bytes))
    with torch.inference_mode():
        after = ep_prefill(engine, texts, device.torch)
    out.put("grow", "logits_max_abs_diff", float((after - before).abs().max()))
    out.put("refuse", refuses_when_short(mover, device, world1_plan(s.layers, (*experts, 0, 1), 3)))
    permuted = world1_plan(s.layers, (*reversed(experts), 0), 4)
    out.put("permute", switch_peak(mover, device, permuted, options.tolerance_bytes))
    out.put("ok", _ok(out.data))


def tracks_allocation(device: Device, options: MemoryOptions) -> dict[str, object]:
    start = device.free_bytes()
    probe = device.allocate(options.probe_bytes)
    held = device.free_bytes()
    del probe  # back to the allocator's cache, which the figure counts as free
    back = device.free_bytes()
    drop = start - held
    return {
        "probe_mib": options.probe_bytes / MIB,
        "drop_mib": drop / MIB,
        "back_mib": (back - held) / MIB,
        "ok": abs(drop - options.probe_bytes) <= options.tolerance_bytes
        and abs(back - start) <= options.tolerance_bytes,
    }


def switch_peak(
    mover: ExpertMover, device: Device, plan: Plan, tolerance_bytes: int
) -> dict[str, object]:
    """Apply `plan` (blocking, world 1), the bytes predicted against the allocator's peak."""
    engine = mover.engine
    current = engine.plan.slots_per_rank
    predicted = switch_bytes(
        current, plan.slots_per_rank, engine.shape.layers, 0, engine.expert_bytes
    )
    device.sync()
    device.reset_peak()
    base = device.allocated()
    mover.apply(plan)
    device.sync()
    peak, held = device.peak(), device.allocated()
    figures: dict[str, object] = {
        "slots_per_rank": [current, plan.slots_per_rank],
        "predicted_mib": predicted / MIB,
    }
    if peak is not None and base is not None and held is not None:
        figures["measured_peak_mib"] = (peak - base) / MIB
        figures["kept_mib"] = (held - base) / MIB
        figures["prediction_covers_peak"] = peak - base <= predicted + tolerance_bytes
    return figures


def refuses_when_short(mover: ExpertMover, device: Device, plan: Plan) -> dict[str, object]:
    """Ballast leaves half of what `plan` needs free: the switch must refuse it, moving nothing."""
    engine = mover.engine
    current = engine.plan.slots_per_rank
    needed = switch_bytes(current, plan.slots_per_rank, engine.shape.layers, 0, engine.expert_bytes)
    held = [engine.stacks.experts(layer) for layer in range(engine.shape.layers)]
    ballast = device.allocate(max(0, device.free_bytes() - needed // 2))
    free = device.free_bytes()
    try:
        mover.start(plan, group=None)
        refused, message = False, ""
    except PlanError as error:
        refused, message = True, str(error)
    finally:
        del ballast
        device.trim()
    unchanged = held == [engine.stacks.experts(layer) for layer in range(engine.shape.layers)]
    return {
        "needed_mib": needed / MIB,
        "free_mib_with_ballast": free / MIB,
        "refused": refused,
        "stacks_unchanged": unchanged,
        "message": message,
        "ok": refused and unchanged,
    }


def _ok(data: dict[str, object]) -> bool:
    tracks, refuse, grow = data["tracks_allocation"], data["refuse"], data["grow"]
    assert isinstance(tracks, dict) and isinstance(refuse, dict) and isinstance(grow, dict)
    return bool(tracks["ok"] and refuse["ok"] and grow.get("prediction_covers_peak", True))
