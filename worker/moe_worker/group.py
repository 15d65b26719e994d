"""The process group of one rank: joining it, the device it computes on, and the two small
collectives of the serving loop (the leader's step descriptor out, every rank's result in).

Both carry JSON text as a uint8 tensor after its length: plain data, never pickled objects, on
any backend (nccl moves CUDA tensors only, gloo CPU ones).
"""

from __future__ import annotations

import logging
from datetime import timedelta

import torch
import torch.distributed as dist

log = logging.getLogger("moe_worker.group")


def resolve_device(device: str, backend: str, local_rank: int) -> tuple[torch.device, str]:
    """The device and backend of a rank: cuda + nccl when a GPU is visible (one per local rank),
    else cpu + gloo; explicit settings win."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda":
        torch.cuda.set_device(local_rank % torch.cuda.device_count())
        device = f"cuda:{torch.cuda.current_device()}"
    backend = backend or ("nccl" if device.startswith("cuda") else "gloo")
    return torch.device(device), backend


def join(
    backend: str, master_addr: str, master_port: int, rank: int, world_size: int, timeout_s: float
) -> None:
    log.info(
        "rank %d/%d joining %s group at %s:%d", rank, world_size, backend, master_addr, master_port
    )
    dist.init_process_group(
        backend,
        init_method=f"tcp://{master_addr}:{master_port}",
        rank=rank,
        world_size=world_size,
        timeout=timedelta(seconds=timeout_s),
    )


def collective_device() -> torch.device:
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _encode(text: str, device: torch.device) -> torch.Tensor:
    return torch.frombuffer(bytearray(text.encode()), dtype=torch.uint8).to(device)


def _decode(buffer: torch.Tensor) -> str:
    return buffer.cpu().numpy().tobytes().decode()


def broadcast_text(text: str | None, src: int = 0) -> str:
    """Collective: `text` of rank `src` on every rank (others pass None)."""
    if dist.get_world_size() == 1:  # nothing to send; a world-1 group still keeps the loop
        assert text is not None
        return text
    device = collective_device()
    payload = _encode(text, device) if dist.get_rank() == src and text is not None else None
    size = torch.tensor([0 if payload is None else payload.numel()], device=device)
    dist.broadcast(size, src)
    if payload is None:
        payload = torch.empty(int(size.item()), dtype=torch.uint8, device=device)
    dist.broadcast(payload, src)
    return _decode(payload)


def gather_text(text: str) -> list[str]:
    """Collective: every rank's `text`, in rank order (on every rank: all_gather works on every
    backend, where gather does not; the texts are small)."""
    if dist.get_world_size() == 1:
        return [text]
    device = collective_device()
    payload = _encode(text, device)
    world = dist.get_world_size()
    sizes = [torch.zeros(1, dtype=torch.int64, device=device) for _ in range(world)]
    dist.all_gather(sizes, torch.tensor([payload.numel()], dtype=torch.int64, device=device))
    longest = max(int(s.item()) for s in sizes)
    padded = torch.zeros(longest, dtype=torch.uint8, device=device)
    padded[: payload.numel()] = payload
    buffers = [torch.empty(longest, dtype=torch.uint8, device=device) for _ in range(world)]
    dist.all_gather(buffers, padded)
    return [_decode(b[: int(s.item())]) for b, s in zip(buffers, sizes, strict=True)]
