"""One completion request in flight: its choices in the backend and their tokens as they come.

The serving loop calls `on_event` from its own thread; `Generation` hands each event to the
event loop (`call_soon_threadsafe` into an `asyncio.Queue`) and never blocks that thread. The
response owns the requests: `close()`, called however it ends (a client gone, a failure, a
stall), aborts every choice still running; a stop string aborts its own choice. Both APIs
(completions, chat) use it; each choice's timings go to the serving metrics (`observer`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from moe_worker.api.errors import ApiError
from moe_worker.api.text import TextStream
from moe_worker.serving.generation import (
    AdmissionError,
    Backend,
    GenerationRequest,
    TokenEvent,
    TokenLogprob,
)

log = logging.getLogger("moe_worker.api")


@dataclass
class ChoiceState:
    index: int
    request_id: str
    prompt_tokens: int
    text: TextStream | None
    """None without a tokenizer: the choice's text stays empty, its token ids tell all."""
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    error: str | None = None
    limit: int | None = None
    """Tokens the client asked for when fewer than the engine makes (0: score the prompt)."""
    logprobs: list[TokenLogprob] = field(default_factory=list)
    prompt_logprobs: tuple[TokenLogprob | None, ...] | None = None
    last_token_at: float | None = None
    started: bool = False
    """A delta of it went out already."""


@dataclass(frozen=True)
class Delta:
    """What one event changed in one choice."""

    choice: ChoiceState
    token_ids: tuple[int, ...]
    text: str
    finish_reason: str | None
    logprobs: tuple[TokenLogprob, ...] = ()
    first: bool = False
    """The choice's first delta (a stream's echo and role go with it)."""


class Observer(Protocol):
    """What the serving metrics see of each choice (`serving_metrics.ServingMetrics`)."""

    def first_token(self, seconds: float, queued: float | None, prompt_tokens: int) -> None: ...
    def tokens(self, count: int, gap: float | None) -> None: ...
    def finished(self, reason: str, seconds: float) -> None: ...


class _NoObserver:
    def first_token(self, seconds: float, queued: float | None, prompt_tokens: int) -> None:
        pass

    def tokens(self, count: int, gap: float | None) -> None:
        pass

    def finished(self, reason: str, seconds: float) -> None:
        pass


class Generation:
    def __init__(
        self,
        backend: Backend,
        requests: Sequence[GenerationRequest],
        texts: Sequence[TextStream | None],
        *,
        stall_timeout: float,
        limit: int | None = None,
        observer: Observer | None = None,
    ) -> None:
        self.backend = backend
        self.requests = list(requests)
        self.stall_timeout = stall_timeout
        self.observer = observer or _NoObserver()
        self.arrived = time.monotonic()
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue[TokenEvent] = asyncio.Queue()
        self.choices = {
            r.request_id: ChoiceState(i, r.request_id, len(r.prompt_token_ids), text, limit=limit)
            for i, (r, text) in enumerate(zip(requests, texts, strict=True))
        }
        self._submitted: list[str] = []

    def submit(self) -> None:
        """Queue every choice, or none: a refusal aborts those already queued and is raised as
        the ApiError of its status (400, 429, 503)."""
        try:
            for request in self.requests:
                self.backend.submit(request, self._on_event)
                self._submitted.append(request.request_id)
        except AdmissionError as error:
            self.close()
            raise ApiError(error.status, str(error), error.param, error.code) from None
        except BaseException:
            self.close()
            raise

    def _on_event(self, event: TokenEvent) -> None:
        """Called on the serving thread: hand over, never block, never raise into the loop."""
        # A closed event loop means the server stopped: nobody waits for the event any more.
        with contextlib.suppress(RuntimeError):
            self.loop.call_soon_threadsafe(self.queue.put_nowait, event)

    @property
    def unfinished(self) -> list[ChoiceState]:
        return [c for c in self.choices.values() if c.finish_reason is None]

    async def deltas(self) -> AsyncIterator[Delta]:
        """Every choice's new tokens and text, in arrival order, until all choices finished."""
        try:
            while self.unfinished:
                try:
                    event = await asyncio.wait_for(self.queue.get(), self.stall_timeout)
                except TimeoutError:
                    raise ApiError(
                        504, f"no token for {self.stall_timeout:g} s; the request was aborted"
                    ) from None
                choice = self.choices.get(event.request_id)
                if choice is None or choice.finish_reason is not None:
                    continue  # the tail of a choice ended by a stop string
                yield self._apply(choice, event)
        finally:
            self.close()

    def _apply(self, choice: ChoiceState, event: TokenEvent) -> Delta:
        first, choice.started = not choice.started, True
        tokens, logprobs, finish = event.token_ids, event.logprobs, event.finish_reason
        if choice.limit is not None and len(choice.token_ids) + len(tokens) >= choice.limit:
            tokens = tokens[: choice.limit - len(choice.token_ids)]
            logprobs = logprobs[: len(tokens)]
            if finish in (None, "stop", "length"):
                if finish is None:
                    self.backend.abort(choice.request_id)
                finish = "length"
        self._observe(choice, event, tokens)
        choice.token_ids.extend(tokens)
        choice.logprobs.extend(logprobs)
        if event.prompt_logprobs is not None:
            choice.prompt_logprobs = event.prompt_logprobs
        final = finish is not None
        text = choice.text.push(tokens, final) if choice.text is not None else ""
        if choice.text is not None and choice.text.stopped and finish in (None, "length"):
            if finish is None:  # the engine would go on: the stop string is ours to enforce
                self.backend.abort(choice.request_id)
            finish = "stop"
        choice.finish_reason = finish
        choice.error = event.error
        if finish is not None:
            self.observer.finished(finish, time.monotonic() - self.arrived)
        return Delta(choice, tuple(tokens), text, finish, tuple(logprobs), first)

    def _observe(self, choice: ChoiceState, event: TokenEvent, tokens: Sequence[int]) -> None:
        now = time.monotonic()
        if event.token_ids and choice.last_token_at is None:  # the prompt was prefilled
            self.observer.first_token(now - self.arrived, event.queue_seconds, choice.prompt_tokens)
            self.observer.tokens(len(tokens), None)
            choice.last_token_at = now
        elif tokens and choice.last_token_at is not None:
            self.observer.tokens(len(tokens), now - choice.last_token_at)
            choice.last_token_at = now

    def close(self) -> None:
        """Abort every choice still running (idempotent): the response is over, however."""
        for choice in self.unfinished:
            if choice.request_id in self._submitted:
                choice.finish_reason = "abort"
                self.observer.finished("abort", time.monotonic() - self.arrived)
                try:
                    self.backend.abort(choice.request_id)
                except Exception:  # abort is best effort; the request ends with its stream
                    log.exception("abort of %s failed", choice.request_id)

    @property
    def usage(self) -> tuple[int, int]:
        """(prompt tokens, completion tokens) over all choices."""
        choices = self.choices.values()
        return sum(c.prompt_tokens for c in choices), sum(len(c.token_ids) for c in choices)


def failure(delta: Delta) -> ApiError | None:
    """The error a choice ended with, if it did not end normally.

    An engine's error text is for the operator, not the client: it can be a collective's
    (gloo's `[/__w/pytorch/.../pair.cc:537] Read error [10.0.0.7]:4755`: a build path, a peer's
    address) or an exception's. It goes to the log under the request's id; the client gets a
    plain message naming that id."""
    if delta.finish_reason == "error":
        request_id = delta.choice.request_id
        log.error("request %s failed: %s", request_id, delta.choice.error or "engine error")
        return ApiError(
            500,
            f"generation failed in the worker group; the worker's log has the cause under "
            f"request {request_id}",
        )
    if delta.finish_reason == "abort":
        return ApiError(503, "generation aborted: the server is stopping")
    return None
