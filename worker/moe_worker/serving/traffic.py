"""The built-in traffic: requests the leader makes itself (a benchmark knob, and how the demo
produces expert imbalance on purpose). Torch-free.

Prompt tokens follow a Zipf law over the vocabulary: token v has weight (v + 1) ** -zipf. Popular
tokens send their experts more work, so the expert skew comes from the data as in production,
through the model's own router; zipf 0 is uniform. The source keeps `batch x world` requests in
flight, topped up every `interval` seconds, so it never floods the waiting queue.
"""

from __future__ import annotations

import itertools
import random
from bisect import bisect_right
from itertools import accumulate

from moe_worker.serving.generation import GenerationRequest, SamplingParams
from moe_worker.settings import TrafficSettings


def zipf_cumulative(vocab_size: int, exponent: float) -> list[float]:
    """Cumulative weights [V] of the Zipf law over token ids 0..V-1."""
    return list(accumulate((v + 1) ** -exponent for v in range(vocab_size)))


class TrafficSource:
    """Deterministic prompts per (seed, request number); the leader runs them as requests."""

    def __init__(
        self, traffic: TrafficSettings, *, vocab_size: int, world_size: int, seed: int
    ) -> None:
        self.traffic, self.world_size = traffic, world_size
        self._random = random.Random(f"traffic/{seed}")
        self._cumulative = zipf_cumulative(vocab_size, traffic.zipf)
        self._numbers = itertools.count()
        self._in_flight: set[str] = set()
        self._next_top_up = 0.0
        self.finished = 0

    @property
    def enabled(self) -> bool:
        return self.traffic.batch > 0

    @property
    def in_flight(self) -> int:
        return len(self._in_flight)

    @property
    def next_top_up(self) -> float:
        return self._next_top_up

    def due(self, now: float) -> bool:
        return self.enabled and now >= self._next_top_up

    def prompt(self) -> tuple[int, ...]:
        total, last = self._cumulative[-1], len(self._cumulative) - 1
        return tuple(
            min(bisect_right(self._cumulative, self._random.random() * total), last)
            for _ in range(self.traffic.seq_len)
        )

    def top_up(self, now: float) -> list[GenerationRequest]:
        """Requests to submit now so that batch x world are in flight."""
        self._next_top_up = now + self.traffic.interval
        wanted = self.traffic.batch * self.world_size - len(self._in_flight)
        params = SamplingParams(temperature=0, max_tokens=self.traffic.max_tokens, ignore_eos=True)
        requests = []
        for _ in range(max(wanted, 0)):
            rid = f"traffic-{next(self._numbers)}"
            self._in_flight.add(rid)
            requests.append(GenerationRequest(rid, self.prompt(), params))
        return requests

    def done(self, request_id: str) -> None:
        """A generated request ended (or was refused)."""
        if request_id in self._in_flight:
            self._in_flight.discard(request_id)
            self.finished += 1
