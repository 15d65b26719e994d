"""The serving runtime as one rank in this process (world 1: the real serving loop, scheduler,
KV cache and sampling on the device, no HTTP), and greedy generation through it."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from moe_worker.bench.gpu_check.device import Device
from moe_worker.launcher import free_port
from moe_worker.runtime.loading import open_weights
from moe_worker.runtime.rank import Runtime
from moe_worker.serving.generation import GenerationRequest, SamplingParams, TokenEvent
from moe_worker.settings import WorkerSettings


@contextmanager
def serving(
    checkpoint: Path, device: Device, ready_timeout_s: float = 300.0, **settings: Any
) -> Iterator[Runtime]:
    """A one-rank group serving `checkpoint` on `device`, its loop on a thread of its own."""
    base = WorkerSettings(
        checkpoint=str(checkpoint),
        world_size=1,
        master_port=free_port(),
        device=device.torch.type,
        http_port=0,
        api_port=0,
        bind_address="127.0.0.1",
    )
    source, resolved = open_weights(base.replace(**settings))
    runtime = Runtime(resolved, source)
    failure: list[BaseException] = []

    def loop() -> None:
        try:
            runtime.run()
        except BaseException as error:
            failure.append(error)

    thread = threading.Thread(target=loop, name="gpu-check-serving", daemon=True)
    thread.start()
    deadline = time.monotonic() + ready_timeout_s
    try:
        while not runtime.backend.is_ready():
            if failure or not thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"the one-rank group did not start: {failure or 'timeout'}")
            time.sleep(0.02)
        yield runtime
    finally:
        runtime.stop()
        thread.join(60)
    if failure:
        raise RuntimeError(f"the serving loop failed: {failure[0]!r}") from failure[0]


def greedy_tokens(
    runtime: Runtime, prompts: Sequence[Sequence[int]], max_tokens: int, timeout_s: float = 300.0
) -> list[list[int]]:
    """Every prompt at once, greedy, exactly `max_tokens` each (EOS ignored): the tokens."""
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    tokens: list[list[int]] = [[] for _ in prompts]
    finished = [threading.Event() for _ in prompts]
    errors: list[str] = []

    def sink(index: int) -> Any:
        def on_event(event: TokenEvent) -> None:
            tokens[index].extend(event.token_ids)
            if event.error:
                errors.append(event.error)
            if event.finish_reason is not None:
                finished[index].set()

        return on_event

    for index, prompt in enumerate(prompts):
        request = GenerationRequest(f"greedy-{index}", tuple(prompt), params)
        runtime.backend.submit(request, sink(index))
    deadline = time.monotonic() + timeout_s
    for event in finished:
        if not event.wait(max(0.0, deadline - time.monotonic())):
            raise TimeoutError(f"greedy generation did not finish in {timeout_s} s")
    if errors:
        raise RuntimeError(f"the runtime failed a request: {errors[0]}")
    return tokens
