"""Grouped GEMM over stacked experts: the rows of slot s times slot s's matrix, for all slots.

A rank's experts of one layer live as one stacked tensor per matrix, slot first ([S, O, I], the
checkpoint's [out, in] layout per slot), and the tokens dispatched to them arrive grouped by slot.
`SlotGroups.linear` multiplies each group by its slot's matrix:

- `torch._grouped_mm` where the build and device have it: one kernel over all slots, group ends
  given as a device tensor (no host synchronisation);
- a loop over the slots otherwise (CPU, other dtypes), each group's product written in place
  into one output. It runs exactly the per-expert `x @ W.T` of `Architecture.expert_forward`,
  so the loop path is bit-for-bit the reference.

Which one runs is decided once per (device, dtype) by `grouped_mm_works`, not per call.

Legend: N rows (assignments grouped by slot), S slots, I in features, O out features.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache

import torch
from torch import Tensor

KERNELS = ("grouped_mm", "loop")


@cache
def grouped_mm_works(device_type: str, dtype: torch.dtype) -> bool:
    """Whether `torch._grouped_mm` runs here: it exists in the build and accepts a tiny probe.

    Builds without it, GPUs it does not support and dtypes its kernels refuse all raise at the
    probe; the loop serves them. CPU always takes the loop (see `choose_kernel`).
    """
    if not hasattr(torch, "_grouped_mm"):
        return False
    try:
        device = torch.device(device_type)
        x_NI = torch.zeros(16, 16, dtype=dtype, device=device)
        w_SOI = torch.zeros(2, 16, 16, dtype=dtype, device=device)
        ends_S = torch.tensor([8, 16], dtype=torch.int32, device=device)
        torch._grouped_mm(x_NI, w_SOI.transpose(-2, -1), offs=ends_S)
        return True
    except (RuntimeError, NotImplementedError, TypeError):
        return False


def choose_kernel(device: torch.device, dtype: torch.dtype, wanted: str = "auto") -> str:
    """`grouped_mm` on CUDA where it works, else `loop`; `wanted` forces one (benchmarks).

    CPU takes the loop although torch 2.13 has a `_grouped_mm` CPU fallback (fp32 too): at the
    bench's shapes (2 slots x 256 rows, 256 -> 1024) both cost the same CPU time, at 16 slots of
    32 rows the fallback saved a sixth (the loop's Python per slot), and the loop is exactly the
    per-expert reference. `moe-worker bench` reports both (`grouped_gemm_kernels_s`).
    """
    if wanted not in ("auto", *KERNELS):
        raise ValueError(f"grouped GEMM kernel {wanted!r} is not one of auto, {', '.join(KERNELS)}")
    if wanted == "loop":
        return "loop"
    works = grouped_mm_works(device.type, dtype)
    if wanted == "grouped_mm":
        if not works:
            raise ValueError(f"torch._grouped_mm does not run on {device.type} in {dtype}")
        return "grouped_mm"
    return "grouped_mm" if works and device.type == "cuda" else "loop"


FEW_ROWS = 8
"""Up to this many rows, a slot's matmul runs as W @ x.T: on one CPU core the weight then
streams as the left operand (measured 1.5-2.5x faster for 2-8 rows of a 1024 x 512 expert,
equal for 1, slower from about 12)."""


@dataclass(frozen=True)
class SlotGroups:
    """How the rows of one MoE call split among the local slots."""

    sizes: tuple[int, ...]
    """Rows of each slot, in slot order (host ints: the all-to-all needed them anyway)."""
    ends_S: Tensor | None
    """Cumulative row ends as int32 on the rows' device: set when `_grouped_mm` runs."""

    @classmethod
    def of(cls, sizes: Sequence[int], kernel: str, counts_S: Tensor | None = None) -> SlotGroups:
        """Groups of `sizes`; `counts_S` (the same sizes, on the device) avoids a host-to-device
        copy for `_grouped_mm`."""
        if kernel != "grouped_mm":
            return cls(tuple(sizes), None)
        if counts_S is None:
            counts_S = torch.tensor(list(sizes))
        return cls(tuple(sizes), torch.cumsum(counts_S, 0).to(torch.int32))

    @property
    def rows(self) -> int:
        return sum(self.sizes)

    def linear(self, x_NI: Tensor, w_SOI: Tensor) -> Tensor:
        """[N, O]: row block s of `x_NI` times `w_SOI[s].T`."""
        if self.ends_S is not None and x_NI.shape[0]:
            return torch._grouped_mm(x_NI, w_SOI.transpose(-2, -1), offs=self.ends_S)
        out_NO = x_NI.new_empty(x_NI.shape[0], w_SOI.shape[1])
        start = 0
        for slot, size in enumerate(self.sizes):
            if not size:
                continue
            end = start + size
            if size <= FEW_ROWS:  # decode: the weight read is the cost; as the left operand
                out_NO[start:end] = torch.mm(w_SOI[slot], x_NI[start:end].T).T  # it streams
            else:
                torch.mm(x_NI[start:end], w_SOI[slot].T, out=out_NO[start:end])
            start = end
        return out_NO
