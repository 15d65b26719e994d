"""The worker's HTTP layer: two FastAPI apps over the serving port, run by uvicorn in a thread.

It depends on `moe_worker.serving.generation` (the `Backend` port) and `moe_contract.plan` only,
never on torch, the runtime or the engine (an import-linter contract in pyproject.toml checks it).

    create_control_app(backend, *, token_path, switch_timeout=60.0, max_body=64 MiB,
                       body_timeout=30.0, body_deadline=60.0) -> FastAPI
        Every rank, on the control port (MOE_HTTP_PORT): /healthz, /readyz, /metrics, GET and
        POST /v1/plan. The operator's contract.
    create_openai_app(backend, *, api_keys_path=None, max_body=8 MiB, max_prompts=64,
                      body_timeout=30.0, body_deadline=60.0, stall_timeout=600.0) -> FastAPI
        The leader only, on its own port (8000 by convention): /v1/completions, /v1/models,
        /health, with OpenAI's request, response and error shapes.
    start(app, host, port, *, name="http", graceful_seconds=5, header_timeout=10.0,
          max_connections=None) -> ServerHandle
        Serve from a daemon thread with its own event loop and no signal handlers; returns once
        listening; a deadline on every request's head, a cap on open connections.
        `handle.port` is the bound port (pass 0 for a free one), `handle.url` its base URL,
        `handle.stop()` ends it.

Wiring, in a rank process (the main thread then runs the serving loop):

    control = start(create_control_app(backend, token_path=s.token_path), s.bind_address,
                    s.http_port, name="control")
    if backend.is_leader:
        api = start(create_openai_app(backend, api_keys_path=...), s.bind_address, api_port,
                    name="openai")

docs/worker.md ("HTTP") lists every route, status and limit; `limits` holds a request's bounds.
"""

from moe_worker.api.control import create_control_app
from moe_worker.api.openai_app import create_openai_app
from moe_worker.api.serve import ServerHandle, start

__all__ = ["ServerHandle", "create_control_app", "create_openai_app", "start"]
