"""One rank process: the weights, the serving loop and the HTTP servers wired together, with signal
handling and the report of a fatal start-up error.

The runtime (the serving loop, a `generation.Backend`) and the HTTP layer (`moe_worker.api`) know
nothing of each other; this module is where they meet: the control app on every rank (probes,
metrics, plans), the OpenAI-compatible app on the leader when it has an API port.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
from pathlib import Path

from moe_worker.api import ServerHandle, create_control_app, create_openai_app, start
from moe_worker.ep.comm import exit_would_abort
from moe_worker.models import UnsupportedConfig
from moe_worker.models.checkpoint import CheckpointError
from moe_worker.models.verify import INVALID
from moe_worker.runtime.loading import ShapeMismatch, open_weights
from moe_worker.runtime.rank import Runtime
from moe_worker.serving.generation import Backend
from moe_worker.settings import WorkerSettings

log = logging.getLogger("moe_worker")

EXIT_CONFIG = 2
"""Exit code of a worker refused at start-up (a checkpoint that does not fit, a bad setting)."""
TERMINATION_MESSAGE_LIMIT = 4096  # Kubernetes keeps at most this many bytes of the message


def report_fatal(message: str, termination_message_path: str | None) -> int:
    """Say why the worker stops: on stderr, and in the termination message file when it exists
    (Kubernetes mounts it, and shows it in the pod's status, where the operator reads it)."""
    print(f"moe-worker: {message}", file=sys.stderr, flush=True)
    path = termination_message_path
    if path and os.path.isfile(path) and os.access(path, os.W_OK):
        with contextlib.suppress(OSError):  # reporting must not hide the error itself
            Path(path).write_text(message[-TERMINATION_MESSAGE_LIMIT:])
    return EXIT_CONFIG


def exit_now(code: int) -> None:
    """End the process with `code` at once (logs flushed) when the interpreter's normal exit
    could abort on the process groups' threads (`comm.exit_would_abort`): the rank's exit code
    is what it says, never SIGABRT. Otherwise return (the normal exit runs)."""
    if exit_would_abort():
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def install_signal_handlers(runtime: Runtime) -> None:
    """SIGTERM (the kubelet, the local launcher) drains, then stops (`Runtime.drain`); a second
    SIGTERM, or SIGINT (Ctrl-C), stops at once (running requests end "the server is stopping")."""
    terminated = False

    def drain(signum: int, _frame: object) -> None:
        nonlocal terminated
        if terminated:
            return stop(signum, _frame)
        terminated = True
        timeout = runtime.settings.drain_timeout
        log.info(
            "rank %d got SIGTERM: draining (at most %g s), then stopping",
            runtime.settings.rank,
            timeout,
        )
        runtime.drain(then_stop=True)

    def stop(signum: int, _frame: object) -> None:
        log.info("rank %d got signal %d, stopping", runtime.settings.rank, signum)
        runtime.stop()

    signal.signal(signal.SIGTERM, drain)
    signal.signal(signal.SIGINT, stop)


def start_servers(backend: Backend, settings: WorkerSettings) -> list[ServerHandle]:
    """The control app on every rank; the OpenAI app on the leader (api_port 0: none)."""
    s = settings
    control = create_control_app(backend, token_path=s.token_path, switch_timeout=s.switch_timeout)
    control_address = s.control_address or s.bind_address
    servers = [start(control, control_address, s.http_port, name="control")]
    if backend.is_leader and s.api_port:
        api = create_openai_app(backend, api_keys_path=s.api_keys_path)
        servers.append(start(api, s.bind_address, s.api_port, name="openai"))
    return servers


def serve(settings: WorkerSettings) -> int:
    """One rank: HTTP first (liveness while the group forms), then the serving loop."""
    try:
        if settings.chat_template and not Path(settings.chat_template).is_file():
            raise OSError(f"--chat-template {settings.chat_template}: no such file")
        source, settings = open_weights(settings)
        runtime = Runtime(settings, source)  # the scheduler refuses impossible budgets here
    except (ShapeMismatch, CheckpointError, UnsupportedConfig, ValueError, OSError) as error:
        return report_fatal(f"rank {settings.rank}: {error}", settings.termination_message_path)
    try:
        servers = start_servers(runtime.backend, settings)
    except OSError as error:  # a port in use: one line, not a traceback
        return report_fatal(
            f"rank {settings.rank}: {error.strerror}", settings.termination_message_path
        )
    install_signal_handlers(runtime)
    try:
        runtime.run()
    except CheckpointError as error:  # a tensor the config promises is not there, or misshapen
        message = f"rank {settings.rank}: {INVALID}: {error}"
        return report_fatal(message, settings.termination_message_path)
    except Exception as error:
        # Asked to stop: its peers are stopping too, and a broken collective is expected then.
        if runtime.state.stopping.is_set():
            log.info("rank %d stopped (group closed during shutdown)", settings.rank)
            return 0
        log.exception("rank %d serving loop failed", settings.rank)
        # The pod's status says why (the operator names it: a whole-group restart's reason).
        report_fatal(f"rank {settings.rank}: {error}", settings.termination_message_path)
        return 1
    finally:
        for server in servers:
            server.stop()
    return 0
