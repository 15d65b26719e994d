"""(e) Two-batch overlap when communication is really asynchronous, on one GPU.

One GPU cannot run NCCL across ranks, so the EP engine runs its real all-to-all path
(`ep.dispatch.Dispatcher`, async collectives, counts read back on a side stream) on a one-rank
nccl group, where each all-to-all is a copy nccl makes on its own stream; and each of the two
big transfers of a layer (tokens out, outputs back) is then stretched to what a link would take:
a device-to-device copy of the same bytes on a second stream, held (a spinning kernel, no memory
traffic) until bytes / link bandwidth has passed. Links: none (the one-rank collective alone),
NVLink 4 (450 GB/s per direction) and InfiniBand NDR (50 GB/s per GPU), the figures of
`moe-ep perf`'s H100 profile.

Per link, step time of a prefill without and with two-batch overlap (alternating rounds); the
step without link and without overlap is the compute. comm = step without overlap - compute;
efficiency = (without - with) / min(compute, comm), the fraction of the smaller one the overlap
hid, which `moe-ep perf` takes as overlap_efficiency. First, on a small model, the one-rank
all-to-all path's logits (one batch and two micro-batches) against the per-expert reference.

Legend: n rows, D hidden.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, replace
from typing import Any, cast

import torch
import torch.distributed as dist
from torch import Tensor

from moe_contract.plan import round_robin_plan
from moe_contract.shape import ModelShape
from moe_worker.bench.data_path import ep_prefill
from moe_worker.bench.gpu_check.device import Device
from moe_worker.bench.gpu_check.record import Recorder
from moe_worker.bench.gpu_check.synthetic import DeviceWeights, prompts
from moe_worker.ep.dispatch import Dispatcher, DispatchMeta, Pending, Routed
from moe_worker.ep.engine import EPEngine
from moe_worker.models.base import DTYPES
from moe_worker.models.kv_cache import KVCache, StepBatch
from moe_worker.models.weights import SyntheticWeights, build_model, local_experts

LINKS: dict[str, float | None] = {
    "none": None,
    "nvlink_450GBps": 450e9,
    "infiniband_50GBps": 50e9,
}


CHECK_SHAPE = ModelShape(
    layers=2, experts=16, hidden=256, ffn_hidden=128, heads=4, head_dim=64, top_k=4,
    dtype="bfloat16", architecture="Qwen3MoE", kv_heads=2, vocab_size=512,
)  # fmt: skip


@dataclass(frozen=True)
class OverlapOptions:
    shape: ModelShape
    sequences: int
    seq_len: int
    rounds: int = 7
    check_shape: ModelShape = CHECK_SHAPE
    check_relative: float = 0.03
    """Logits of the all-to-all path against the per-expert reference: the largest difference
    over the largest logit, at most this (bf16 on the GPU, both in bf16)."""


GPU = OverlapOptions(
    shape=ModelShape(
        layers=4, experts=128, hidden=2048, ffn_hidden=768, heads=32, head_dim=128, kv_heads=4,
        top_k=8, vocab_size=32000, dtype="bfloat16", architecture="Qwen3MoE",
    ),  # Qwen3-30B-A3B's layer, four of them
    sequences=16,
    seq_len=512,
)  # fmt: skip
TINY = OverlapOptions(
    shape=ModelShape(
        layers=2, experts=8, hidden=32, ffn_hidden=16, heads=4, head_dim=8, kv_heads=2, top_k=2,
        vocab_size=64, dtype="float32", architecture="Qwen3MoE",
    ),
    sequences=3,
    seq_len=8,
    rounds=2,
    check_shape=replace(CHECK_SHAPE, hidden=32, ffn_hidden=16, head_dim=8, dtype="float32"),
    check_relative=1e-5,
)  # fmt: skip


class EmulatedLink:
    """A dispatcher whose two big transfers per layer also take a link's time: the real
    dispatcher's collective, then, on the device's side stream, a copy of the same bytes held
    until bytes / `bytes_per_s` has passed. Everything else is the real dispatcher's."""

    def __init__(
        self, inner: Dispatcher, device: Device, bytes_per_s: float, copy_bytes_per_s: float
    ) -> None:
        own = {"inner": inner, "device": device, "bytes_per_s": bytes_per_s}
        own |= {"copy_bytes_per_s": copy_bytes_per_s, "scratches": []}
        self.__dict__.update(own)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def __setattr__(self, name: str, value: Any) -> None:  # placement, comm_seconds: the inner's
        setattr(self.inner, name, value)

    def send_tokens(self, routed: Routed, meta: DispatchMeta) -> Pending:
        return self._stretched(self.inner.send_tokens(routed, meta))

    def send_back(self, y_nD: Tensor, meta: DispatchMeta) -> Pending:
        return self._stretched(self.inner.send_back(y_nD, meta))

    def _stretched(self, pending: Pending) -> Pending:
        payload = pending.output.reshape(-1)
        nbytes = payload.numel() * payload.element_size()
        scratch = self._scratch(payload)
        hold_s = nbytes / self.bytes_per_s - nbytes / self.copy_bytes_per_s

        def transfer() -> None:
            scratch[: payload.numel()].copy_(payload)  # what it reads is never used
            self.device.hold(hold_s)

        stretched = _Stretched(pending, self.device, self.device.on_side_stream(transfer))
        return cast(Pending, stretched)  # the engine only waits for it

    def _scratch(self, payload: Tensor) -> Tensor:
        """Where the side stream writes: never freed during the run (a buffer freed while the
        side stream still wrote into it could be handed to the compute stream)."""
        scratches: list[Tensor] = self.__dict__["scratches"]
        for scratch in scratches:
            if scratch.dtype == payload.dtype and scratch.numel() >= payload.numel():
                return scratch
        scratches.append(
            torch.empty(2 * payload.numel(), dtype=payload.dtype, device=payload.device)
        )
        return scratches[-1]


class _Stretched:
    """A collective whose output is used only once the emulated link's transfer is done too."""

    def __init__(self, pending: Pending, device: Device, handle: object) -> None:
        self.pending, self.device, self.handle = pending, device, handle

    @property
    def output(self) -> Tensor:
        return self.pending.output

    def wait(self) -> Tensor:
        self.device.wait_for(self.handle)
        return self.pending.wait()


def run(out: Recorder, device: Device, options: OverlapOptions = GPU) -> None:
    own_group = not dist.is_initialized()
    if own_group:  # one rank: an in-process store, no port
        backend = "nccl" if device.is_cuda else "gloo"
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    try:
        out.put("backend", dist.get_backend())
        out.put("check", all_to_all_path_check(device, options))
        measure_links(out, device, options)
    finally:
        if own_group:
            dist.destroy_process_group()


def all_to_all_path_check(device: Device, options: OverlapOptions) -> dict[str, Any]:
    """The one-rank all-to-all path (one batch, two micro-batches) against the per-expert
    reference, on a small model."""
    shape, dev = options.check_shape, device.torch
    source = SyntheticWeights.for_shape(shape, seed=3)
    texts = [list(range(i, i + n)) for i, n in ((1, 37), (50, 5), (9, 64))]
    dtype = DTYPES[shape.dtype]
    cache = KVCache.for_shape(shape, 256, dtype=dtype, device=dev)
    batch = StepBatch.build([(i, p, 0) for i, p in enumerate(texts)], dev)
    with torch.inference_mode():
        reference = build_model(source, dev)(batch, cache, local_experts(source, dev))
        engine = _all_to_all_engine(source, shape, dev)
        one = ep_prefill(engine, texts, dev)
        two = ep_prefill(engine, texts, dev, two_batch=True)
    one_diff, two_diff = float((one - reference).abs().max()), float((two - reference).abs().max())
    return {
        "kernel": engine.kernel,
        "logits_max_abs": float(reference.abs().max()),
        "one_batch_max_abs_diff": one_diff,
        "two_batch_max_abs_diff": two_diff,
        "ok": max(one_diff, two_diff) <= options.check_relative * float(reference.abs().max()),
    }


def _all_to_all_engine(source: Any, shape: ModelShape, dev: torch.device) -> EPEngine:
    plan = round_robin_plan(shape.layers, shape.experts, 1, shape.experts)
    engine = EPEngine(source, plan, rank=0, device=dev)
    d = engine.dispatcher  # the all-to-all path, not the world-1 identity
    engine.dispatcher = Dispatcher(d.placement, shape.layers, shape.experts)
    return engine


def measure_links(out: Recorder, device: Device, options: OverlapOptions) -> None:
    s, dev = options.shape, device.torch
    engine = _all_to_all_engine(DeviceWeights(s, dev), s, dev)
    inner = engine.dispatcher
    texts = prompts(options.sequences, options.seq_len, s.vocab_size)
    transfer_bytes = options.sequences * options.seq_len * s.top_k * s.hidden * _size(s)
    copy_rate = _copy_rate(device, transfer_bytes)
    out.put("kernel", engine.kernel)
    out.put("tokens_per_step", options.sequences * options.seq_len)
    out.put("transfer_mib", transfer_bytes / 2**20)
    out.put("copy_gb_per_s", copy_rate / 1e9)
    device.hold(1e-3)  # calibrates the spinning kernel before any step is timed
    device.sync()
    compute_s = None
    for name, rate in LINKS.items():
        if rate is not None:
            engine.dispatcher = EmulatedLink(inner, device, rate, copy_rate)  # type: ignore[assignment]
        with torch.inference_mode():
            one = ep_prefill(engine, texts, dev)  # warm-up both, and the outputs compared
            two = ep_prefill(engine, texts, dev, two_batch=True)
            times = device.alternate(
                {
                    "without": lambda: ep_prefill(engine, texts, dev),
                    "with": lambda: ep_prefill(engine, texts, dev, two_batch=True),
                },
                options.rounds,
            )
        without, with_ = statistics.median(times["without"]), statistics.median(times["with"])
        compute_s = without if compute_s is None else compute_s
        figures = overlap_figures(without, with_, compute_s)
        figures["link_ms_per_step"] = (
            0.0 if rate is None else 2 * s.layers * transfer_bytes / rate * 1e3
        )
        figures["two_batch_max_abs_diff"] = float((two - one).abs().max())
        out.put("links", name, figures)
        engine.dispatcher = inner
    out.put("overlap_efficiency", calibration_efficiency(out.data["links"]))


def overlap_figures(without_s: float, with_s: float, compute_s: float) -> dict[str, float]:
    """Speedup, the communication the step without overlap exposed, and the efficiency."""
    comm_s = max(0.0, without_s - compute_s)
    hideable = min(comm_s, compute_s)
    efficiency = (without_s - with_s) / hideable if hideable > 0 else 0.0
    return {
        "step_ms_without": without_s * 1e3,
        "step_ms_with": with_s * 1e3,
        "speedup": without_s / with_s,
        "compute_ms": compute_s * 1e3,
        "comm_ms": comm_s * 1e3,
        "efficiency": efficiency,
    }


def calibration_efficiency(links: dict[str, dict[str, float]]) -> float | None:
    """What `moe-ep perf` takes: the lowest efficiency over the emulated links (clamped to
    [0, 1]); the one-rank collective alone exposes too little to measure it."""
    found = [f["efficiency"] for name, f in links.items() if LINKS.get(name) is not None]
    return min(1.0, max(0.0, min(found))) if found else None


def _copy_rate(device: Device, nbytes: int) -> float:
    """Bytes per second a device-to-device copy of `nbytes` moves (payload, not read + write)."""
    src = torch.empty(max(1, nbytes), dtype=torch.uint8, device=device.torch)
    dst = torch.empty_like(src)
    seconds = device.measure(lambda: dst.copy_(src), budget_s=0.05)
    return nbytes / max(seconds, 1e-9)


def _size(shape: ModelShape) -> int:
    return torch.empty((), dtype=DTYPES[shape.dtype]).element_size()
