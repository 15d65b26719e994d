"""One container of a pod as a local process: start, probes, restart with backoff, stop.

Each process leads its own session (so its whole process group can be signalled) and gets
PR_SET_PDEATHSIG: if the node agent dies without cleaning up, the kernel kills its children.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import logging
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger("moe_local.nodeagent")

_LIBC = ctypes.CDLL(None, use_errno=True)  # loaded before any fork: preexec_fn must not import
_LIBC.mount.argtypes = [
    ctypes.c_char_p,
    ctypes.c_char_p,
    ctypes.c_char_p,
    ctypes.c_ulong,
    ctypes.c_void_p,
]
_PR_SET_PDEATHSIG = 1
_CLONE_NEWNS = 0x00020000
_MS_RDONLY, _MS_REMOUNT, _MS_BIND, _MS_REC, _MS_PRIVATE = 0x1, 0x20, 0x1000, 0x4000, 0x40000
_NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))
MESSAGE_LIMIT = 4096  # a kubelet keeps at most this many bytes of a termination message
LOG_FALLBACK_BYTES, LOG_FALLBACK_LINES = 2048, 80  # FallbackToLogsOnError, as a kubelet does

ReadOnlyBind = tuple[str, str]  # (host path, the pod's local path that shows it read-only)


def _die_with_parent() -> None:
    # Tied to the forking thread: the pod's runner thread outlives every process it starts.
    _LIBC.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


def _mount(source: str | None, target: str, flags: int) -> None:
    encoded = None if source is None else source.encode()
    if _LIBC.mount(encoded, target.encode(), None, flags, None) != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"mount {source} on {target}: {os.strerror(errno)}")


def _start_in_child(binds: tuple[ReadOnlyBind, ...]) -> Callable[[], None]:
    """What runs in the child before exec: die with the agent; show read-only hostPath mounts
    read-only, through bind mounts in a mount namespace of the container's own (a kubelet's
    container runtime does the same)."""

    def run() -> None:
        _die_with_parent()
        if not binds:
            return
        if _LIBC.unshare(_CLONE_NEWNS) != 0:
            raise OSError(ctypes.get_errno(), "unshare(CLONE_NEWNS)")
        _mount(None, "/", _MS_REC | _MS_PRIVATE)  # nothing leaks back to the host
        for source, target in binds:
            _mount(source, target, _MS_BIND | _MS_REC)
            _mount(None, target, _MS_REMOUNT | _MS_BIND | _MS_RDONLY)

    return run


@functools.cache
def read_only_binds_available() -> bool:
    """Whether this process may make mount namespaces (root with CAP_SYS_ADMIN); without, a
    read-only hostPath mount is the host directory itself, writable (logged once)."""
    probe = "import ctypes,os; os._exit(ctypes.CDLL(None).unshare(0x20000) != 0)"
    try:
        done = subprocess.run([sys.executable, "-c", probe], capture_output=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return False
    if done.returncode != 0:
        log.warning("no mount namespaces here: read-only hostPath mounts stay writable")
    return done.returncode == 0


def now_rfc3339() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def kill_group(pid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, sig)


@dataclass(frozen=True)
class Launch:
    """What one start of the container needs; recomputed at every (re)start, as a kubelet does."""

    argv: list[str]
    env: dict[str, str]
    cwd: Path
    ports: dict[str, int]  # container port name -> number, for probes
    ip: str
    message_file: Path | None = None  # the local file at the container's terminationMessagePath
    read_only_binds: tuple[ReadOnlyBind, ...] = ()


def probe_ok(probe: dict[str, Any], launch: Launch) -> bool:
    """One httpGet / tcpSocket / exec probe against the pod's own address."""
    timeout = float(probe.get("timeoutSeconds", 1))
    try:
        if "httpGet" in probe:
            spec = probe["httpGet"]
            port = launch.ports.get(str(spec["port"])) or int(spec["port"])
            scheme = spec.get("scheme", "HTTP").lower()
            url = f"{scheme}://{spec.get('host') or launch.ip}:{port}{spec.get('path', '/')}"
            with _NO_PROXY.open(url, timeout=timeout) as response:
                return 200 <= response.status < 400
        if "tcpSocket" in probe:
            port = launch.ports.get(str(probe["tcpSocket"]["port"])) or int(
                probe["tcpSocket"]["port"]
            )
            with socket.create_connection((launch.ip, port), timeout=timeout):
                return True
        if "exec" in probe:
            result = subprocess.run(
                probe["exec"]["command"],
                env=launch.env,
                cwd=launch.cwd,
                timeout=timeout,
                stdin=subprocess.DEVNULL,
                capture_output=True,
            )
            return result.returncode == 0
    except (OSError, ValueError, urllib.error.URLError, subprocess.TimeoutExpired):
        return False
    return True  # an unknown probe kind cannot fail


class ContainerProcess:
    """State machine of one container; `step()` is called by the pod's runner thread."""

    def __init__(
        self,
        spec: dict[str, Any],
        restart_policy: str,
        log_dir: Path,
        backoff: tuple[float, float],
        restart_count: int = 0,
    ) -> None:
        self.spec = spec
        self.name: str = spec["name"]
        self.restart_policy = restart_policy
        self.log_path = log_dir / f"{self.name}.log"
        self.pid_path = log_dir / f"{self.name}.pid"
        self._backoff_initial, self._backoff_max = backoff
        self._backoff = self._backoff_initial
        self.restart_count = restart_count
        self.proc: subprocess.Popen[bytes] | None = None
        self.launch: Launch | None = None
        self.ready = False
        self.started_at = ""
        self.last_terminated: dict[str, Any] | None = None
        self.waiting: tuple[str, str] = ("ContainerCreating", "")
        self.done = False  # exited and not to be restarted (restartPolicy)
        self._starts = 0
        self._next_start = 0.0
        self._started_mono = 0.0
        self._next_probe = 0.0
        self._next_liveness = 0.0
        self._ready_failures = 0
        self._live_failures = 0
        self._log_offset = 0  # where this run's output starts in the log file

    # -- lifecycle ---------------------------------------------------------------------------

    def step(self, make_launch: Callable[[], Launch]) -> None:
        now = time.monotonic()
        if self.proc is not None and self.proc.poll() is not None:
            self._exited(now)
        if self.proc is None:
            if not self.done and now >= self._next_start:
                self._start(make_launch, now)
            return
        self._probe(now)

    def stop(self, grace_s: float) -> None:
        """SIGTERM the process group, SIGKILL after the grace period; always reaps."""
        if self.proc is None:
            return
        kill_group(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            log.info("container %s did not stop in %.0fs: SIGKILL", self.name, grace_s)
        kill_group(self.proc.pid, signal.SIGKILL)  # also whatever the leader left behind
        self.proc.wait()
        self._record_exit("Killed" if self.proc.returncode < 0 else None)
        self.proc = None
        self.done = True
        self.pid_path.unlink(missing_ok=True)

    def _start(self, make_launch: Callable[[], Launch], now: float) -> None:
        try:
            launch = make_launch()
        except (KeyError, ValueError, FileNotFoundError) as err:
            self.waiting = ("CreateContainerConfigError", str(err))
            self._next_start = now + 2.0
            return
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as out:
            out.write(f"--- {now_rfc3339()} start #{self._starts + 1}: {launch.argv}\n".encode())
            out.flush()
            self._log_offset = out.tell()
            try:
                self.proc = subprocess.Popen(
                    launch.argv,
                    env=launch.env,
                    cwd=launch.cwd,
                    stdin=subprocess.DEVNULL,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                    preexec_fn=_start_in_child(launch.read_only_binds),
                )
            except (OSError, subprocess.SubprocessError) as err:  # a mount refused, no binary
                self.waiting = ("RunContainerError", f"could not start: {err}")
                self._next_start = now + 2.0
                return
        if self._starts or self.last_terminated is not None:
            self.restart_count += 1
        self._starts += 1
        self.pid_path.write_text(str(self.proc.pid))
        self.launch, self.started_at, self.waiting = launch, now_rfc3339(), ("", "")
        self.ready, self._ready_failures, self._live_failures = False, 0, 0
        delay = float(self.spec.get("readinessProbe", {}).get("initialDelaySeconds", 0))
        self._next_probe = now + delay
        live = float(self.spec.get("livenessProbe", {}).get("initialDelaySeconds", 0))
        self._next_liveness = now + live
        self._started_mono = now
        log.info("started %s (pid %d)", self.name, self.proc.pid)

    def _exited(self, now: float) -> None:
        assert self.proc is not None
        code = self.proc.returncode
        kill_group(self.proc.pid, signal.SIGKILL)  # orphans of the leader share its group
        self._record_exit(None)
        log.info("container %s (pid %d) exited with %s", self.name, self.proc.pid, code)
        self.proc, self.ready = None, False
        restart = self.restart_policy == "Always" or (
            self.restart_policy == "OnFailure" and code != 0
        )
        if not restart:
            self.done = True
            return
        if now - self._started_mono > 600:  # ran for 10 minutes: forgive earlier crashes
            self._backoff = self._backoff_initial
        self._next_start = now + self._backoff
        self._backoff = min(2 * self._backoff, self._backoff_max)
        self.waiting = ("CrashLoopBackOff", f"back-off {self._backoff:.0f}s restarting {self.name}")

    def _record_exit(self, reason: str | None) -> None:
        assert self.proc is not None
        code = self.proc.returncode
        self.last_terminated = {
            "exitCode": 128 - code if code < 0 else code,  # a shell's convention for signals
            "reason": reason or ("Completed" if code == 0 else "Error"),
            "startedAt": self.started_at,
            "finishedAt": now_rfc3339(),
            "containerID": f"local://{self.proc.pid}",
        }
        if code < 0:
            self.last_terminated["signal"] = -code
        message = self._termination_message(code)
        if message:
            self.last_terminated["message"] = message

    def _termination_message(self, code: int) -> str:
        """What the container wrote to its terminationMessagePath; with FallbackToLogsOnError
        and a failure, its log's end when it wrote nothing (a kubelet's rules)."""
        path = self.launch.message_file if self.launch is not None else None
        try:
            text = path.read_bytes()[-MESSAGE_LIMIT:] if path is not None else b""
        except OSError:
            text = b""
        fallback = self.spec.get("terminationMessagePolicy") == "FallbackToLogsOnError"
        if not text.strip() and fallback and code != 0:
            try:
                with self.log_path.open("rb") as log_file:
                    log_file.seek(self._log_offset)
                    tail = log_file.read()[-LOG_FALLBACK_BYTES:]
            except OSError:
                tail = b""
            text = b"\n".join(tail.splitlines()[-LOG_FALLBACK_LINES:])
        return text.decode(errors="replace").strip()

    # -- probes ------------------------------------------------------------------------------

    def _probe(self, now: float) -> None:
        assert self.proc is not None and self.launch is not None
        liveness = self.spec.get("livenessProbe")
        if liveness and now >= self._next_liveness:
            self._next_liveness = now + float(liveness.get("periodSeconds", 10))
            self._live_failures = 0 if probe_ok(liveness, self.launch) else self._live_failures + 1
            if self._live_failures >= int(liveness.get("failureThreshold", 3)):
                log.warning("container %s failed its liveness probe: restarting", self.name)
                kill_group(self.proc.pid, signal.SIGTERM)
                return
        readiness = self.spec.get("readinessProbe")
        if not readiness:
            self.ready = True
            return
        if now < self._next_probe:
            return
        period = float(readiness.get("periodSeconds", 10))
        # Until the first success, probe every second: a faster start, same end state.
        self._next_probe = now + (period if self.ready else min(period, 1.0))
        if probe_ok(readiness, self.launch):
            self.ready, self._ready_failures = True, 0
        else:
            self._ready_failures += 1
            if self._ready_failures >= int(readiness.get("failureThreshold", 3)):
                self.ready = False

    # -- status ------------------------------------------------------------------------------

    def status(self, image: str) -> dict[str, Any]:
        if self.proc is not None:
            state: dict[str, Any] = {"running": {"startedAt": self.started_at}}
        elif self.done and self.last_terminated is not None:
            state = {"terminated": self.last_terminated}
        else:
            reason, message = self.waiting
            state = {"waiting": {"reason": reason or "ContainerCreating", "message": message}}
        status: dict[str, Any] = {
            "name": self.name,
            "image": image,
            "imageID": "",
            "ready": self.ready and self.proc is not None,
            "started": self.proc is not None,
            "restartCount": self.restart_count,
            "state": state,
            "lastState": {"terminated": self.last_terminated} if self.last_terminated else {},
        }
        if self.proc is not None:
            status["containerID"] = f"local://{self.proc.pid}"
        return status
