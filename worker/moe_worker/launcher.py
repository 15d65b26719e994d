"""Several ranks on one machine (like torchrun): `moe-worker serve --world N` with no rank in the
environment starts N rank processes here, gloo on CPU or nccl with one GPU each.

Each rank is `moe-worker serve` with its settings handed over through the pod-environment
variables (`settings.settings_to_env`), never flags, so a rank parses exactly what a pod would.
Rank r gets global rank `rank_offset + r`, GPU r, control port `http_port + r`; only global rank 0
serves the OpenAI API. Signals are forwarded to every rank; when one rank exits the others are
stopped (SIGTERM, then SIGKILL after a grace period) and the launcher exits with the first
failure's code. `LocalRanks` carries the layout a pod of `gpusPerPod` ranks will use: world size,
ranks on this machine, and the global rank of the first.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass

from moe_worker.settings import WorkerSettings, settings_to_env

log = logging.getLogger("moe_worker.launcher")

POLL_S = 0.2
GRACE_S = 15.0
"""How long stopped ranks may take to exit before they are killed."""


@dataclass(frozen=True)
class LocalRanks:
    local_world: int
    """Ranks started on this machine."""
    rank_offset: int = 0
    """Global rank of the first of them (pod index x ranks per pod)."""
    world_size: int | None = None
    """Ranks in the whole group; None: just these."""

    @property
    def total(self) -> int:
        return self.world_size or self.local_world


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def rank_settings(settings: WorkerSettings, ranks: LocalRanks, local_rank: int) -> WorkerSettings:
    rank = ranks.rank_offset + local_rank
    return settings.replace(
        rank=rank,
        local_rank=local_rank,
        world_size=ranks.total,
        http_port=settings.http_port + local_rank if settings.http_port else 0,
        api_port=settings.api_port if rank == 0 else 0,
    )


def threads_per_rank(local_world: int) -> int:
    """This machine's cores shared out among its ranks (torch's default is every core per
    process: N ranks would each spin that many OpenMP threads, ten times slower on small CPUs)."""
    return max(1, (os.cpu_count() or 1) // local_world)


def spawn_rank(
    settings: WorkerSettings,
    log_level: str = "INFO",
    extra_env: dict[str, str] | None = None,
    **popen: object,
) -> subprocess.Popen[bytes]:
    """`moe-worker serve` as one rank of `settings` (rank, ports and all, through the variables)."""
    env = {**os.environ, **settings_to_env(settings), **(extra_env or {})}
    command = [sys.executable, "-m", "moe_worker.main", "--log-level", log_level, "serve"]
    proc = subprocess.Popen(command, env=env, **popen)  # type: ignore[call-overload]
    log.info("started rank %d (pid %d)", settings.rank, proc.pid)
    return proc


def launch(settings: WorkerSettings, ranks: LocalRanks, log_level: str = "INFO") -> int:
    """Start the local ranks and watch them; the exit code of the group."""
    threads: dict[str, str] = {}
    if "OMP_NUM_THREADS" not in os.environ:
        threads["OMP_NUM_THREADS"] = str(threads_per_rank(ranks.local_world))
        log.info("OMP_NUM_THREADS is not set: %s threads per rank", threads["OMP_NUM_THREADS"])
    procs = [
        spawn_rank(rank_settings(settings, ranks, local_rank), log_level, threads)
        for local_rank in range(ranks.local_world)
    ]
    return _watch(procs, ranks.rank_offset)


def _watch(procs: list[subprocess.Popen[bytes]], rank_offset: int) -> int:
    stopping_since: float | None = None
    first_failure: int | None = None

    def stop_all(signum: int = signal.SIGTERM) -> None:
        nonlocal stopping_since
        stopping_since = stopping_since or time.monotonic()
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signum)

    def on_signal(signum: int, _frame: object) -> None:
        log.info("got signal %d, stopping every rank", signum)
        stop_all(signum)

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        while True:
            codes = [proc.poll() for proc in procs]
            for local_rank, code in enumerate(codes):
                if code not in (None, 0) and first_failure is None:
                    first_failure = code if code > 0 else 1
                    log.error("rank %d exited with %d", rank_offset + local_rank, code)
            if all(code is not None for code in codes):
                return first_failure or 0
            if stopping_since is None and any(code is not None for code in codes):
                log.error("a rank exited: stopping the others")
                stop_all()
            if stopping_since is not None and time.monotonic() - stopping_since > GRACE_S:
                stop_all(signal.SIGKILL)
            time.sleep(POLL_S)
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
