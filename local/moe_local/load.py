"""A load generator for the OpenAI-compatible API: real `/v1/completions` requests, bounded
concurrency, prompts whose tokens follow a Zipf law, and live figures.

Prompts are token ids (no tokenizer needed) drawn from a Zipf law over the vocabulary: token v
has weight (v + 1) ** -s. Popular tokens route to their experts more often, so the expert
imbalance comes from the data, as in production, and the operator's rebalancing has something to
correct. Each of `concurrency` threads keeps one request in flight (HTTP/1.1 keep-alive, the
standard library only: the demo needs no client package); every answer is recorded, so a test
can check that none was lost and compare outputs.
"""

from __future__ import annotations

import http.client
import itertools
import json
import random
import statistics
import threading
import time
import urllib.parse
from bisect import bisect_right
from collections.abc import Sequence
from dataclasses import dataclass, field
from itertools import accumulate
from typing import Any

REQUEST_TIMEOUT_S = 120.0


def zipf_prompts(
    count: int, *, vocab_size: int, length: int, exponent: float, seed: int = 0
) -> list[list[int]]:
    """`count` prompts of `length` token ids, each drawn from Zipf(`exponent`) over the vocab."""
    cumulative = list(accumulate((v + 1) ** -exponent for v in range(vocab_size)))
    draw = random.Random(f"zipf-prompts/{seed}")
    total = cumulative[-1]
    return [
        [
            min(bisect_right(cumulative, draw.random() * total), vocab_size - 1)
            for _ in range(length)
        ]
        for _ in range(count)
    ]


@dataclass(frozen=True)
class Completion:
    """One request and its answer."""

    index: int  # which prompt
    started: float  # time.time() when sent
    ended: float  # time.time() when the whole answer was read
    status: int  # HTTP status; 0: no answer (connection failed)
    tokens: tuple[int, ...] = ()  # the generated token ids
    finish_reason: str = ""
    error: str = ""

    @property
    def ok(self) -> bool:
        return self.status == 200 and self.finish_reason in ("length", "stop")

    @property
    def latency(self) -> float:
        return self.ended - self.started


@dataclass(frozen=True)
class Figures:
    """What a window of answers shows."""

    requests_per_s: float
    tokens_per_s: float  # generated tokens
    p50_latency_s: float | None
    failed: int

    def row(self) -> str:
        p50 = "-" if self.p50_latency_s is None else f"{self.p50_latency_s:.2f}s"
        return f"{self.requests_per_s:6.1f}  {self.tokens_per_s:7.0f}  {p50:>6}"


@dataclass
class LoadGenerator:
    """`concurrency` clients sending `prompts` in turn (round robin), until `stop()`.

    Greedy (temperature 0) with a seed per prompt and `ignore_eos`, so a prompt's answer is
    the same every time it is sent, whichever rank serves it and whatever runs beside it.
    """

    base_url: str  # http://host:port/v1
    model: str
    prompts: Sequence[Sequence[int] | str]  # token ids, or text (a router may take only text)
    concurrency: int = 8
    max_tokens: int = 8
    api_key: str | None = None
    ramp_s: float = 0.0
    """Seconds over which the clients start, evenly spread: started together, they would be
    admitted in the same step and keep finishing together, in waves."""
    results: list[Completion] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _stop: threading.Event = field(default_factory=threading.Event)
    _threads: list[threading.Thread] = field(default_factory=list)
    _next: itertools.count[int] = field(default_factory=itertools.count)

    def start(self) -> LoadGenerator:
        self.started = time.time()
        for number in range(self.concurrency):
            delay = self.ramp_s * number / self.concurrency
            thread = threading.Thread(
                target=self._client, args=(delay,), name=f"load-{number}", daemon=True
            )
            thread.start()
            self._threads.append(thread)
        return self

    def stop(self) -> list[Completion]:
        """Stop sending; wait for the requests in flight; every answer, in order of ending."""
        self._stop.set()
        for thread in self._threads:
            thread.join(REQUEST_TIMEOUT_S + 5)
        with self._lock:
            return sorted(self.results, key=lambda done: done.ended)

    def figures(self, window_s: float, now: float | None = None) -> Figures:
        """Requests/s, generated tokens/s and median latency of the answers that ended in the
        last `window_s` seconds (or since the start, when that is shorter)."""
        now = time.time() if now is None else now
        span = max(min(window_s, now - getattr(self, "started", now)), 1e-9)
        with self._lock:
            recent = [done for done in self.results if now - span <= done.ended <= now]
        good = [done for done in recent if done.ok]
        tokens = sum(len(done.tokens) for done in good)
        p50 = statistics.median(done.latency for done in good) if good else None
        return Figures(len(good) / span, tokens / span, p50, len(recent) - len(good))

    def _client(self, delay: float) -> None:
        parts = urllib.parse.urlsplit(self.base_url)
        connection: http.client.HTTPConnection | None = None
        self._stop.wait(delay)
        while not self._stop.is_set():
            index = next(self._next) % len(self.prompts)
            if connection is None:
                connection = http.client.HTTPConnection(
                    parts.hostname or "", parts.port or 80, timeout=REQUEST_TIMEOUT_S
                )
            done = self.send(connection, parts.path, index)
            if done.status == 0:
                connection.close()
                connection = None
                self._stop.wait(0.5)  # the server is not there (yet): do not spin
            with self._lock:
                self.results.append(done)
        if connection is not None:
            connection.close()

    def body(self, index: int) -> dict[str, Any]:
        return {
            "model": self.model,
            "prompt": prompt if isinstance(prompt := self.prompts[index], str) else list(prompt),
            "max_tokens": self.max_tokens,
            "temperature": 0,
            "seed": index,
            "ignore_eos": True,
        }

    def send(self, connection: http.client.HTTPConnection, path: str, index: int) -> Completion:
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        started = time.time()
        try:
            connection.request("POST", f"{path}/completions", json.dumps(self.body(index)), headers)
            response = connection.getresponse()
            payload = response.read()
        except (OSError, http.client.HTTPException) as error:
            return Completion(index, started, time.time(), 0, error=str(error))
        ended = time.time()
        try:
            answer = json.loads(payload)
        except ValueError:
            answer = {}
        if response.status != 200:
            message = str((answer.get("error") or {}).get("message") or payload[:200])
            return Completion(index, started, ended, response.status, error=message)
        choice = (answer.get("choices") or [{}])[0]
        return Completion(
            index,
            started,
            ended,
            response.status,
            tuple(choice.get("token_ids") or ()),
            str(choice.get("finish_reason") or ""),
        )


def complete_once(
    base_url: str, body: dict[str, Any], api_key: str | None = None, timeout: float = 60.0
) -> tuple[int, dict[str, Any]]:
    """One request to `{base_url}/completions` (text or token-id prompts): (status, answer)."""
    parts = urllib.parse.urlsplit(base_url)
    connection = http.client.HTTPConnection(parts.hostname or "", parts.port or 80, timeout=timeout)
    headers = {"Content-Type": "application/json"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    try:
        connection.request("POST", f"{parts.path}/completions", json.dumps(body), headers)
        response = connection.getresponse()
        payload = response.read()
    finally:
        connection.close()
    try:
        return response.status, json.loads(payload)
    except ValueError:
        return response.status, {"raw": payload.decode(errors="replace")}
