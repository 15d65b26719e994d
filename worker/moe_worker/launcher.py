"""Several ranks on one machine (like torchrun): `moe-worker serve --world N` with no rank in the
environment starts N rank processes here, gloo on CPU or nccl with one GPU each; in a pod of
several ranks (`MOE_RANKS_PER_POD`), `moe-worker serve` starts the pod's ranks (`launch_pod`).

Each rank is `moe-worker serve` with its settings handed over through the pod-environment
variables (`settings.settings_to_env`), never flags, so a rank parses exactly what a pod would.
Local rank r gets global rank `rank_offset + r` and GPU r; only global rank 0 serves the OpenAI
API. On one machine rank r's control port is `http_port + r`; in a pod the ranks listen on
internal ports and the launcher answers for the pod on `http_port` (`podserver`). Signals are
forwarded to every rank; when one rank exits the others are stopped (SIGTERM, then SIGKILL after a
grace period) and the launcher exits with the first failure's code: in a pod, the container
exits and the operator brings the whole group back.
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

from moe_contract import env
from moe_worker.settings import WorkerSettings, settings_to_env

log = logging.getLogger("moe_worker.launcher")

POLL_S = 0.2
GRACE_S = 5.0
"""How long stopped ranks may take to exit before they are killed: a rank has nothing to save,
and one of a broken group may be blocked in a collective, or stopped, and never exit by itself."""
BROKEN_GRACE_S = 1.0
"""The same once a rank died: the group is broken, its survivors block in collectives that will
never finish, and every second here is a second before the group is brought back."""


@dataclass(frozen=True)
class LocalRanks:
    local_world: int
    """Ranks started on this machine (or pod)."""
    rank_offset: int = 0
    """Global rank of the first of them (pod ordinal x ranks per pod)."""
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


def pod_rank_settings(
    settings: WorkerSettings, ranks: LocalRanks, local_rank: int
) -> WorkerSettings:
    """A rank of a pod: its control app on an internal port of the pod's loopback (the launcher
    answers on the pod's port), its API (global rank 0 only) on the pod's address."""
    child = rank_settings(settings, ranks, local_rank)
    return child.replace(
        http_port=env.internal_control_port(settings.http_port, local_rank),
        control_address=env.internal_control_address(settings.bind_address),
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
    children = [rank_settings(settings, ranks, local) for local in range(ranks.local_world)]
    return _run(children, log_level)


def launch_pod(settings: WorkerSettings, log_level: str = "INFO") -> int:
    """The ranks of this pod (`settings.rank` is its first, `ranks_per_pod` of them) and the
    pod's control app on `settings.http_port`, until a rank exits; the exit code of the pod."""
    from moe_worker.api import start
    from moe_worker.api.podserver import LocalRank, create_pod_app
    from moe_worker.process import report_fatal

    ranks = LocalRanks(settings.ranks_per_pod, settings.rank, settings.world_size)
    children = [pod_rank_settings(settings, ranks, local) for local in range(ranks.local_world)]
    app = create_pod_app(
        [LocalRank(c.rank, f"http://{c.control_address}:{c.http_port}") for c in children],
        proxy_timeout=settings.switch_timeout + 30.0,
        silence_timeout=settings.stall_timeout,
    )
    log.info(
        "pod ranks %d..%d of %d; the pod answers for them on port %d",
        ranks.rank_offset,
        ranks.rank_offset + ranks.local_world - 1,
        ranks.total,
        settings.http_port,
    )
    server = start(app, settings.bind_address, settings.http_port, name="pod")
    why: list[str] = []
    try:
        code = _run(children, log_level, why)
    finally:
        server.stop()
    if code and why:  # the pod's status names the rank (the operator's Degraded reason)
        report_fatal(why[0], settings.termination_message_path)
    return code


def _run(children: list[WorkerSettings], log_level: str, why: list[str] | None = None) -> int:
    threads: dict[str, str] = {}
    if "OMP_NUM_THREADS" not in os.environ:
        threads["OMP_NUM_THREADS"] = str(threads_per_rank(len(children)))
        log.info("OMP_NUM_THREADS is not set: %s threads per rank", threads["OMP_NUM_THREADS"])
    procs = [spawn_rank(child, log_level, threads) for child in children]
    return _watch(procs, children[0].rank, why if why is not None else [])


def describe_exit(rank: int, code: int) -> str:
    """`rank 3 was killed by SIGKILL`, `rank 3 exited with code 1`."""
    if code < 0:
        try:
            return f"rank {rank} was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"rank {rank} was killed by signal {-code}"
    return f"rank {rank} exited with code {code}"


def _watch(procs: list[subprocess.Popen[bytes]], rank_offset: int, why: list[str]) -> int:
    """Until every rank exited; `why` gets what stopped the group first."""
    stopping_since: float | None = None
    first_failure: int | None = None
    grace = GRACE_S

    def stop_all(signum: int = signal.SIGTERM) -> None:
        nonlocal stopping_since
        stopping_since = stopping_since or time.monotonic()
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signum)

    def on_signal(signum: int, _frame: object) -> None:
        log.info("got signal %d, stopping every rank", signum)
        if not why:
            name = signal.Signals(signum).name
            why.append(f"the pod was stopped by {name} (a liveness failure, or a deletion)")
        stop_all(signum)

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        while True:
            codes = [proc.poll() for proc in procs]
            for local_rank, code in enumerate(codes):
                if code not in (None, 0) and first_failure is None:
                    first_failure = code if code > 0 else 1
                    message = describe_exit(rank_offset + local_rank, code)
                    log.error("%s", message)
                    if not why:
                        why.append(message)
            if all(code is not None for code in codes):
                return first_failure or 0
            if stopping_since is None and any(code is not None for code in codes):
                log.error("a rank exited: stopping the others")
                grace = BROKEN_GRACE_S
                stop_all()
            if stopping_since is not None and time.monotonic() - stopping_since > grace:
                stop_all(signal.SIGKILL)
            time.sleep(POLL_S)
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
