"""A small single-process generator (world size 1, every expert local): requests in, tokens out.

Continuous batching in its simplest honest form. Each step runs every decoding sequence (one
token each) plus prompt chunks of waiting sequences up to `max_step_tokens`; a request is
admitted when the KV cache can reserve its worst case (prompt + max_tokens, capped at the
context), so a running sequence never runs out of cache and nothing is preempted. It is the
reference the distributed serving runtime is tested against, and what the tests drive.
"""

from __future__ import annotations

import secrets
from collections import deque
from collections.abc import Hashable, Iterable
from dataclasses import dataclass, field

import torch
from torch import Tensor

from moe_worker.ep.sampling import SamplingParams, finish_reason, sample
from moe_worker.models import MoEFn, MoETransformer
from moe_worker.models.kv_cache import KVCache, StepBatch
from moe_worker.models.weights import WeightSource, build_model, local_experts, serving_dtype


@dataclass(frozen=True)
class Request:
    request_id: Hashable
    prompt_ids: tuple[int, ...]
    params: SamplingParams = field(default_factory=SamplingParams)


@dataclass(frozen=True)
class TokenEvent:
    """One generated token; `finish_reason` is set on a request's last one."""

    request_id: Hashable
    token_id: int
    finish_reason: str | None


@dataclass
class Completion:
    request_id: Hashable
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    logits: list[Tensor] = field(default_factory=list)
    """The logits each token was sampled from [V] (only when the generator keeps them)."""


@dataclass
class _Sequence:
    request: Request
    seed: int
    prefilled: int = 0
    completion: Completion = field(init=False)

    def __post_init__(self) -> None:
        self.completion = Completion(self.request.request_id)

    @property
    def prompt_left(self) -> int:
        return len(self.request.prompt_ids) - self.prefilled


class Generator:
    """Runs requests through `model` + `moe` with `cache`; call `step()` or `generate()`."""

    def __init__(
        self,
        model: MoETransformer,
        moe: MoEFn,
        cache: KVCache,
        *,
        max_step_tokens: int = 256,
        gate_bias_LE: Tensor | None = None,
        keep_logits: bool = False,
    ) -> None:
        self.model, self.moe, self.cache = model, moe, cache
        self.max_step_tokens = max_step_tokens
        self.gate_bias_LE = gate_bias_LE
        self.keep_logits = keep_logits
        self.max_context = model.spec.max_context
        self.eos_token_ids = model.spec.eos_token_ids
        self.waiting: deque[_Sequence] = deque()
        self.running: list[_Sequence] = []

    @classmethod
    def from_source(
        cls,
        source: WeightSource,
        kv_cache_tokens: int,
        *,
        device: torch.device | str = "cpu",
        dtype: torch.dtype | None = None,
        max_step_tokens: int = 256,
        keep_logits: bool = False,
    ) -> Generator:
        """Model, all experts and a KV cache of `kv_cache_tokens` from one weight source."""
        dtype = serving_dtype(source, dtype)
        model = build_model(source, device, dtype)
        cache = KVCache.for_shape(source.spec.shape, kv_cache_tokens, dtype=dtype, device=device)
        experts = local_experts(source, device, dtype)
        return cls(model, experts, cache, max_step_tokens=max_step_tokens, keep_logits=keep_logits)

    def submit(self, request: Request) -> None:
        prompt = len(request.prompt_ids)
        if any(s.request.request_id == request.request_id for s in (*self.waiting, *self.running)):
            raise ValueError(f"request {request.request_id!r} is already being served")
        if prompt == 0:
            raise ValueError(f"request {request.request_id!r} has an empty prompt")
        if prompt >= self.max_context:
            raise ValueError(
                f"request {request.request_id!r}: prompt of {prompt} tokens leaves no room in the "
                f"context of {self.max_context}"
            )
        if self._reservation(request) > self.cache.capacity_tokens:
            raise ValueError(
                f"request {request.request_id!r} needs {self._reservation(request)} KV tokens, "
                f"more than the whole cache ({self.cache.capacity_tokens})"
            )
        seed = request.params.seed if request.params.seed is not None else secrets.randbits(63)
        self.waiting.append(_Sequence(request, seed))

    @property
    def idle(self) -> bool:
        return not self.waiting and not self.running

    def generate(self, requests: Iterable[Request]) -> dict[Hashable, Completion]:
        """Run `requests` to completion; completions by request id."""
        sequences = []
        for request in requests:
            self.submit(request)
            sequences.append(self.waiting[-1])
        while not self.idle:
            self.step()
        return {s.request.request_id: s.completion for s in sequences}

    @torch.no_grad()
    def step(self) -> list[TokenEvent]:
        """One forward step over decodes and prompt chunks; the tokens it produced."""
        self._admit()
        items, sampled = [], []
        budget = self.max_step_tokens
        for seq in self.running:
            if seq.prompt_left == 0:  # decoding: feed back its last token
                position = len(seq.request.prompt_ids) + len(seq.completion.token_ids) - 1
                items.append((seq.request.request_id, [seq.completion.token_ids[-1]], position))
                sampled.append(seq)
                budget -= 1
        for seq in self.running:
            if seq.prompt_left and budget > 0:
                chunk = min(seq.prompt_left, budget)
                start = seq.prefilled
                tokens = list(seq.request.prompt_ids[start : start + chunk])
                items.append((seq.request.request_id, tokens, start))
                seq.prefilled += chunk
                budget -= chunk
                if seq.prompt_left == 0:
                    sampled.append(seq)
        if not items:
            return []
        row_of = {item[0]: row for row, item in enumerate(items)}
        batch = StepBatch.build(items, self.cache.k_LPHd.device)
        logits_BV = self.model(batch, self.cache, self.moe, self.gate_bias_LE)
        rows = [row_of[seq.request.request_id] for seq in sampled]
        return self._sample(logits_BV[rows], sampled)

    def _sample(self, logits_BV: Tensor, sequences: list[_Sequence]) -> list[TokenEvent]:
        params = [s.request.params for s in sequences]
        steps = [len(s.completion.token_ids) for s in sequences]
        tokens = sample(logits_BV, params, [s.seed for s in sequences], steps).tolist()
        events = []
        for seq, token, logits_V in zip(sequences, tokens, logits_BV, strict=True):
            done = seq.completion
            done.token_ids.append(token)
            if self.keep_logits:
                done.logits.append(logits_V.cpu())
            context = len(seq.request.prompt_ids) + len(done.token_ids)
            done.finish_reason = finish_reason(
                token,
                len(done.token_ids),
                seq.request.params,
                self.eos_token_ids,
                context,
                self.max_context,
            )
            events.append(TokenEvent(seq.request.request_id, token, done.finish_reason))
            if done.finish_reason is not None:
                self.running.remove(seq)
                self.cache.free(seq.request.request_id)
        return events

    def _admit(self) -> None:
        while self.waiting:
            seq = self.waiting[0]
            if not self.cache.can_reserve(seq.request.request_id, self._reservation(seq.request)):
                return  # first come, first served: later requests wait too
            self.cache.reserve(seq.request.request_id, self._reservation(seq.request))
            self.running.append(self.waiting.popleft())

    def _reservation(self, request: Request) -> int:
        return min(len(request.prompt_ids) + request.params.max_tokens, self.max_context)
