"""Measure this machine for the performance model's `cpu-local` profile; prints YAML.

    python tools/measure_cpu_profile.py [--write operator/moe_operator/perf/profiles/cpu-local.yaml]

Measures (best of a few repeats, so they are achieved ceilings, not averages):
- matmul FLOP/s: fp32 square GEMM (n=1024) on ONE thread with torch when installed (what the CPU
  workers run), else numpy; 2 x n^3 FLOPs per product. Figures are per core = per worker rank.
- memory bandwidth: numpy copy of a 256 MiB array, counted as read + write bytes.
- "network": TCP over loopback between two threads (what gloo uses between local worker
  processes): bandwidth of 64 MiB in 1 MiB messages, latency as half a 1-byte round trip.
- memory capacity: MemTotal from /proc/meminfo.
The model's efficiencies stay 1.0 for matmul (the peak *is* the achieved GEMM rate) and are refined
by calibration from `moe-worker bench --json`. Not imported by the operator (it may import torch).
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import socket
import threading
import time

import numpy as np


def best_of(fn, repeats: int = 5) -> float:
    """Smallest wall time of `fn()` over `repeats` runs (seconds)."""
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def matmul_flops(n: int = 1024) -> tuple[float, str]:
    """Achieved fp32 GEMM FLOP/s and the library used."""
    try:
        import torch

        torch.set_num_threads(1)  # per core: one worker rank per core
        a, b = torch.randn(n, n), torch.randn(n, n)
        torch.mm(a, b)
        return 2 * n**3 / best_of(lambda: torch.mm(a, b)), f"torch {torch.__version__} fp32"
    except ImportError:
        a = np.random.rand(n, n).astype(np.float32)
        b = np.random.rand(n, n).astype(np.float32)
        return 2 * n**3 / best_of(lambda: a @ b), f"numpy {np.__version__} fp32"


def memory_bandwidth(mib: int = 256) -> float:
    """Achieved copy bandwidth, read + write bytes per second."""
    src = np.ones(mib * 2**20 // 8)
    dst = np.empty_like(src)
    t = best_of(lambda: np.copyto(dst, src))
    return 2 * src.nbytes / t


def loopback(total: int = 64 * 2**20, chunk: int = 2**20) -> tuple[float, float]:
    """(bandwidth bytes/s, one-way latency s) of TCP over 127.0.0.1 between two threads."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(1)
    port = srv.getsockname()[1]

    def sink() -> None:
        conn, _ = srv.accept()
        with conn:
            got = 0
            while got < total:
                got += len(conn.recv(chunk))
            conn.sendall(b"k")
            for _ in range(200):
                conn.sendall(conn.recv(1))

    th = threading.Thread(target=sink)
    th.start()
    cli = socket.create_connection(("127.0.0.1", port))
    cli.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    buf = b"x" * chunk
    t0 = time.perf_counter()
    for _ in range(total // chunk):
        cli.sendall(buf)
    cli.recv(1)
    bw = total / (time.perf_counter() - t0)
    rtts = []
    for _ in range(200):
        t = time.perf_counter()
        cli.sendall(b"p")
        cli.recv(1)
        rtts.append(time.perf_counter() - t)
    cli.close()
    th.join()
    srv.close()
    return bw, sorted(rtts)[len(rtts) // 2] / 2


def mem_total() -> float:
    """MemTotal in bytes."""
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                return float(line.split()[1]) * 1024
    raise RuntimeError("no MemTotal in /proc/meminfo")


def render(flops: float, lib: str, bw: float, net_bw: float, net_lat: float, cap: float) -> str:
    """The profile YAML, every figure with its source."""
    when = f"measured by tools/measure_cpu_profile.py on {dt.date.today().isoformat()}"
    cores = os.cpu_count()
    return f"""# This machine ({cores} CPU cores), measured, not a datasheet. Regenerate with
#   python tools/measure_cpu_profile.py --write operator/moe_operator/perf/profiles/cpu-local.yaml
# The model reads `value`; `source` is printed by `moe-ep perf` with every figure.
name: cpu-local
hardware:
  peak_flops: {{value: {flops:.4g}, source: "{when}: {lib} GEMM n=1024, 1 thread, best of 5"}}
  memory_bandwidth: {{value: {bw:.4g}, source: "{when}: numpy copy 256 MiB, read+write"}}
  memory_capacity: {{value: {cap:.4g}, source: "{when}: /proc/meminfo MemTotal"}}
  matmul_efficiency: {{value: 1.0, source: "by construction: peak_flops is the achieved GEMM rate"}}
  expert_efficiency: {{value: 0.8, source: "assumed until calibrated from moe-worker bench"}}
  attention_efficiency: {{value: 0.5, source: "assumed until calibrated from moe-worker bench"}}
  memory_efficiency: {{value: 1.0, source: "by construction: memory_bandwidth is achieved"}}
  collective_efficiency: {{value: 0.5, source: "assumed: gloo over loopback TCP, unmeasured"}}
  runtime_overhead_bytes: {{value: 3.0e+8, source: "assumed: python + torch runtime per process"}}
network:
  gpus_per_node: {{value: {cores}, source: "one worker process per core on this machine"}}
  intra_bandwidth: {{value: {net_bw:.4g}, source: "{when}: TCP loopback, 1 MiB messages"}}
  intra_latency: {{value: {net_lat:.4g}, source: "{when}: TCP loopback, half 1-byte round trip"}}
  inter_bandwidth: {{value: {net_bw:.4g}, source: "same as intra: one machine"}}
  inter_latency: {{value: {net_lat:.4g}, source: "same as intra: one machine"}}
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--write", help="write the YAML here instead of stdout")
    args = ap.parse_args()
    flops, lib = matmul_flops()
    text = render(flops, lib, memory_bandwidth(), *loopback(), mem_total())
    if args.write:
        with open(args.write, "w") as f:
            f.write(text)
    print(text, end="")


if __name__ == "__main__":
    main()
