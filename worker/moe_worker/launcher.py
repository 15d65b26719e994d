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

Ranks die with their launcher, however it ends (kill -9 included): on Linux each rank asks the
kernel for SIGKILL when its parent exits (`PR_SET_PDEATHSIG`) before it runs a line of its own;
orphaned ranks would go on serving and holding their ports. Before starting anything the
launcher checks that the ports its ranks will listen on are free, and if one is not says so in
one line (another `moe-worker serve` on them, most likely) and exits with the start-up
refusal code.
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from moe_contract import env
from moe_worker.settings import WorkerSettings, settings_to_env

log = logging.getLogger("moe_worker.launcher")

POLL_S = 0.2
GRACE_S = 5.0
"""How long stopped ranks may take to exit before they are killed: a rank has nothing to save,
and one of a broken group may be blocked in a collective, or stopped, and never exit by itself."""
EXIT_REFUSED = 2
"""`process.EXIT_CONFIG`, the start-up refusal code (not imported: that would import torch)."""
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


PR_SET_PDEATHSIG = 1  # linux/prctl.h


def die_with_parent() -> Callable[[], None] | None:
    """What a child runs between fork and exec so that the kernel kills it when this process
    ends (None where there is no prctl: not Linux). Async-signal-safe enough for a forked child
    of a threaded parent: a foreign call with ints, getppid and _exit, no allocation, no lock."""
    if not sys.platform.startswith("linux"):
        return None
    prctl = ctypes.CDLL(None, use_errno=True).prctl
    parent, kill = os.getpid(), int(signal.SIGKILL)

    def in_child() -> None:
        prctl(PR_SET_PDEATHSIG, kill, 0, 0, 0)
        if os.getppid() != parent:  # the launcher died before the request: nobody to serve
            os._exit(1)

    return in_child


def spawn_rank(
    settings: WorkerSettings,
    log_level: str = "INFO",
    extra_env: dict[str, str] | None = None,
    **popen: object,
) -> subprocess.Popen[bytes]:
    """`moe-worker serve` as one rank of `settings` (rank, ports and all, through the variables),
    killed by the kernel if this process dies."""
    env = {**os.environ, **settings_to_env(settings), **(extra_env or {})}
    command = [sys.executable, "-m", "moe_worker.main", "--log-level", log_level, "serve"]
    popen.setdefault("preexec_fn", die_with_parent())
    proc = subprocess.Popen(command, env=env, **popen)  # type: ignore[call-overload]
    log.info("started rank %d (pid %d)", settings.rank, proc.pid)
    return proc


def listening_ports(
    settings: WorkerSettings, children: list[WorkerSettings], *, pod_port: bool = False
) -> list[tuple[str, int, str]]:
    """(address, port, what) of every port this launcher's ranks (and, for a pod, the launcher
    itself) will listen on."""
    ports = []
    if pod_port:
        ports.append((settings.bind_address, settings.http_port, "the pod's control port"))
    for child in children:
        address = child.control_address or child.bind_address
        if child.http_port:
            ports.append((address, child.http_port, f"rank {child.rank}'s control port"))
        if child.rank == 0 and child.api_port:
            ports.append((child.bind_address, child.api_port, "the OpenAI API port"))
        if child.rank == 0 and child.world_size > 1:
            ports.append((child.store_address, child.master_port, "the group's rendezvous port"))
    return ports


def port_in_use(ports: list[tuple[str, int, str]]) -> str | None:
    """One line naming the first of `ports` that cannot be listened on, or None."""
    for address, port, what in ports:
        family = socket.AF_INET6 if ":" in address else socket.AF_INET
        try:
            socket.create_server((address, port), family=family).close()
        except OSError as error:
            why = os.strerror(error.errno) if error.errno else str(error)
            return (
                f"port {port} ({what}) on {address or '*'} is in use ({why}): another "
                f"moe-worker serve? Stop it, or choose other ports (--http-port, --api-port, "
                f"--master-port)"
            )
    return None


def launch(settings: WorkerSettings, ranks: LocalRanks, log_level: str = "INFO") -> int:
    """Start the local ranks and watch them; the exit code of the group."""
    children = [rank_settings(settings, ranks, local) for local in range(ranks.local_world)]
    taken = port_in_use(listening_ports(settings, children))
    if taken is not None:
        print(f"moe-worker: {taken}", file=sys.stderr, flush=True)
        return EXIT_REFUSED
    return _run(children, log_level)


def launch_pod(settings: WorkerSettings, log_level: str = "INFO") -> int:
    """The ranks of this pod (`settings.rank` is its first, `ranks_per_pod` of them) and the
    pod's control app on `settings.http_port`, until a rank exits; the exit code of the pod."""
    from moe_worker.api import start
    from moe_worker.api.podserver import LocalRank, create_pod_app
    from moe_worker.process import report_fatal

    ranks = LocalRanks(settings.ranks_per_pod, settings.rank, settings.world_size)
    children = [pod_rank_settings(settings, ranks, local) for local in range(ranks.local_world)]
    taken = port_in_use(listening_ports(settings, children, pod_port=True))
    if taken is not None:
        return report_fatal(taken, settings.termination_message_path)
    # Each rank says why it stopped in a file of its own: the pod's message is the first failed
    # rank's (`rank 0: no room for ...`), not the last writer's nor only its exit code.
    try:
        messages = [_message_file(child.rank) for child in children]
    except OSError as error:  # no writable temporary directory: the pod's file, shared
        log.warning("the ranks share the pod's termination message: %s", error)
        messages = []
    else:
        children = [
            child.replace(termination_message_path=str(message))
            for child, message in zip(children, messages, strict=True)
        ]
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
        code = _run(children, log_level, why, messages or None)
    finally:
        server.stop()
        for message in messages:
            message.unlink(missing_ok=True)
    if code and why:  # the pod's status names the rank (the operator's Degraded reason)
        report_fatal(why[0], settings.termination_message_path)
    return code


def _message_file(rank: int) -> Path:
    descriptor, path = tempfile.mkstemp(prefix=f"moe-rank-{rank}-", suffix=".termination")
    os.close(descriptor)
    return Path(path)


def _said(message: Path | None) -> str | None:
    """What a rank wrote to its termination message file, if anything."""
    try:
        return (message.read_text().strip() or None) if message else None
    except OSError:
        return None


def _run(
    children: list[WorkerSettings],
    log_level: str,
    why: list[str] | None = None,
    messages: list[Path] | None = None,
) -> int:
    threads: dict[str, str] = {}
    if "OMP_NUM_THREADS" not in os.environ:
        threads["OMP_NUM_THREADS"] = str(threads_per_rank(len(children)))
        log.info("OMP_NUM_THREADS is not set: %s threads per rank", threads["OMP_NUM_THREADS"])
    procs = [spawn_rank(child, log_level, threads) for child in children]
    drain = children[0].drain_timeout
    why = why if why is not None else []
    return _watch(procs, children[0].rank, why, messages, drain_s=drain)


def describe_exit(rank: int, code: int) -> str:
    """`rank 3 was killed by SIGKILL`, `rank 3 exited with code 1`."""
    if code < 0:
        try:
            return f"rank {rank} was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"rank {rank} was killed by signal {-code}"
    return f"rank {rank} exited with code {code}"


def _watch(
    procs: list[subprocess.Popen[bytes]],
    rank_offset: int,
    why: list[str],
    messages: list[Path] | None = None,
    *,
    drain_s: float = 0.0,
) -> int:
    """Until every rank exited; `why` gets what stopped the group first (the first failed
    rank's own message where it wrote one). A SIGTERM is passed on and the ranks get `drain_s`
    more to drain (their running requests finish) before SIGKILL."""
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
        nonlocal grace
        log.info("got signal %d, stopping every rank", signum)
        if signum == signal.SIGTERM and stopping_since is None:
            grace = GRACE_S + drain_s
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
                        said = _said(messages[local_rank]) if messages else None
                        why.append(said or message)
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
