"""The one seam between the gpu-check's parts and CUDA: clocks, synchronisation, a side stream,
memory figures. Every CUDA-only call of the parts goes through `Device`, so each part also runs on
the CPU at tiny sizes (the unit tests): there the clock is the host's, work runs in order (no
streams), and free memory is a budget this object accounts for (simulated, and said so).

`describe()` is what the check prints first: the GPU, torch, CUDA, NCCL and transformers it
found.
"""

from __future__ import annotations

import platform
import statistics
import time
import weakref
from collections.abc import Callable
from typing import Any

import torch

from moe_worker.models.grouped import grouped_mm_works
from moe_worker.switch.mover import cuda_free_bytes

GIB = 2**30


class Device:
    """The device a part measures on: `cuda` (the current GPU) or `cpu`."""

    def __init__(self, kind: str = "cuda", cpu_memory_budget: int = 256 * 2**20) -> None:
        if kind == "cuda":
            if not torch.cuda.is_available():
                raise RuntimeError("no CUDA device is visible (torch.cuda.is_available() is False)")
            self.torch = torch.device("cuda", torch.cuda.current_device())
        else:
            self.torch = torch.device(kind)
        self._budget = cpu_memory_budget
        self._held: dict[int, int] = {}  # CPU: bytes of the tensors `allocate` handed out
        self._side: torch.cuda.Stream | None = None
        self._cycles_per_s: float | None = None

    @property
    def is_cuda(self) -> bool:
        return self.torch.type == "cuda"

    # ------------------------------------------------------------ clocks

    def sync(self) -> None:
        if self.is_cuda:
            torch.cuda.synchronize(self.torch)

    def seconds(self, fn: Callable[[], object]) -> float:
        """One run of `fn`, its device work included (CUDA events; the host clock on CPU)."""
        if not self.is_cuda:
            start = time.perf_counter()
            fn()
            return time.perf_counter() - start
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record()
        fn()
        end.record()
        end.synchronize()
        return begin.elapsed_time(end) / 1e3

    def time(self, fn: Callable[[], object], *, warmup: int = 1, repeats: int = 5) -> float:
        """Median seconds of `fn` after `warmup` runs."""
        for _ in range(warmup):
            fn()
        self.sync()
        return statistics.median(self.seconds(fn) for _ in range(repeats))

    def measure(
        self, fn: Callable[[], object], *, budget_s: float = 1.0, least: int = 3, most: int = 20
    ) -> float:
        """Median seconds of `fn`, repeated as often as about `budget_s` allows (one untimed
        warm-up run first, which also sizes the repeats)."""
        first = self.seconds(fn)
        repeats = max(least, min(most, int(budget_s / max(first, 1e-6))))
        return self.time(fn, warmup=0, repeats=repeats)

    def alternate(
        self, fns: dict[str, Callable[[], object]], rounds: int
    ) -> dict[str, list[float]]:
        """Seconds of each fn per round, taking turns within a round (what is compared saw the
        same clocks and temperature)."""
        times: dict[str, list[float]] = {name: [] for name in fns}
        for _ in range(rounds):
            for name, fn in fns.items():
                self.sync()
                times[name].append(self.seconds(fn))
        return times

    # ------------------------------------------------------------ a second stream

    def on_side_stream(self, fn: Callable[[], object]) -> object:
        """Run `fn` on a side stream once the current stream's work so far is done; returns a
        handle for `wait_for`. On the CPU `fn` simply runs now."""
        if not self.is_cuda:
            fn()
            return None
        if self._side is None:
            self._side = torch.cuda.Stream(self.torch)
        self._side.wait_stream(torch.cuda.current_stream(self.torch))
        with torch.cuda.stream(self._side):
            fn()
            done = torch.cuda.Event()
            done.record(self._side)
        return done

    def wait_for(self, handle: object) -> None:
        """The current stream waits for a side-stream handle (the host does not)."""
        if isinstance(handle, torch.cuda.Event):
            torch.cuda.current_stream(self.torch).wait_event(handle)

    def hold(self, seconds: float) -> None:
        """Keep the current stream busy for about `seconds` without memory traffic (a spinning
        kernel, calibrated once): a slow link's transfer time. The CPU sleeps."""
        if seconds <= 0:
            return
        if not self.is_cuda:
            time.sleep(seconds)
            return
        if self._cycles_per_s is None:
            cycles = 10_000_000
            torch.cuda._sleep(cycles)  # warm-up
            self._cycles_per_s = cycles / self.seconds(lambda: torch.cuda._sleep(cycles))
        torch.cuda._sleep(max(1, int(seconds * self._cycles_per_s)))

    # ------------------------------------------------------------ memory

    def free_bytes(self) -> int:
        """What the device can still give (CUDA: free plus what torch's allocator caches unused,
        the engine's own figure); CPU: the simulated budget less what `allocate` handed out."""
        measured = cuda_free_bytes(self.torch)
        if measured is not None:
            return measured
        return self._budget - sum(self._held.values())

    def allocate(self, nbytes: int) -> torch.Tensor:
        """A plain allocation of `nbytes` (ballast), held until its last reference goes, as on
        CUDA: on the CPU it counts against the budget until then."""
        ballast = torch.empty(nbytes, dtype=torch.uint8, device=self.torch)
        if not self.is_cuda:
            key = id(ballast)
            self._held[key] = nbytes
            weakref.finalize(ballast, self._held.pop, key, None)
        return ballast

    def trim(self) -> None:
        """Give the allocator's cached, unused memory back to the device."""
        if self.is_cuda:
            torch.cuda.empty_cache()

    def reset_peak(self) -> None:
        if self.is_cuda:
            torch.cuda.reset_peak_memory_stats(self.torch)

    def allocated(self) -> int | None:
        """Bytes torch holds in tensors now (None on CPU: not tracked)."""
        return torch.cuda.memory_allocated(self.torch) if self.is_cuda else None

    def peak(self) -> int | None:
        """Most bytes held in tensors since `reset_peak` (None on CPU)."""
        return torch.cuda.max_memory_allocated(self.torch) if self.is_cuda else None

    def grouped_mm(self, dtype: torch.dtype) -> bool:
        return grouped_mm_works(self.torch.type, dtype)


def describe() -> dict[str, Any]:
    """What this machine offers the check: printed first, kept in the JSON."""
    found: dict[str, Any] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda_available": torch.cuda.is_available(),
        "torch_cuda": torch.version.cuda,
        "cpus": _cpus(),
    }
    try:
        import transformers

        found["transformers"] = transformers.__version__
    except ImportError:
        found["transformers"] = None
    if not torch.cuda.is_available():
        return found
    props = torch.cuda.get_device_properties(torch.cuda.current_device())
    found.update(
        gpu=props.name,
        gpu_count=torch.cuda.device_count(),
        gpu_memory_gib=round(props.total_memory / GIB, 1),
        compute_capability=f"{props.major}.{props.minor}",
        multiprocessors=props.multi_processor_count,
        nccl=".".join(map(str, torch.cuda.nccl.version())) if _has_nccl() else None,
        grouped_mm_bf16=grouped_mm_works("cuda", torch.bfloat16),
    )
    return found


def _has_nccl() -> bool:
    try:
        return bool(torch.cuda.nccl.version())
    except (AttributeError, RuntimeError):
        return False


def _cpus() -> int:
    import os

    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 0
