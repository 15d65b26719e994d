"""The leader's scheduler: which requests run, on which rank, and how many of their tokens each
step. Pure logic (no torch, no process group); the runtime calls it at every step boundary.

- Admission (continuous batching): a waiting request joins at a step boundary on ONE rank (its
  attention and KV cache stay there; experts are expert-parallel): the rank with the most free
  KV budget that can also take another sequence. Its whole need, prompt + max_tokens, is reserved
  at once, so a running sequence never runs out of cache and nothing is ever preempted.
  First come, first served: while the oldest waiting request fits nowhere, younger ones wait too,
  so a long request is never starved by a stream of short ones.
- The budget: the scheduler keeps a mirror of every rank's `BlockAllocator` (same calls in the same
  order as the rank's KV cache, hence the same answers), so it knows what fits without asking.
- A step: on each rank every decoding sequence feeds its last token, then prompts are prefilled in
  admission order, chunked, up to `max_batch_tokens` new tokens per rank. A rank keeps at most
  `max_batch_tokens` sequences, so every decoding sequence advances every step.
- Refusals: prompt + max_tokens beyond the context or beyond one rank's whole KV budget is an
  `InvalidRequest` naming max_tokens; a full waiting queue (`max_queued_requests`) is `QueueFull`.
- Finishing: EOS, a stop token or max_tokens (`generation.finish_reason`); aborts; a rank's error.
- Sibling choices (`n`): a request naming `prefill_from` is admitted on its sibling's rank when
  that rank has room, waits until the sibling's prompt is cached but its last token, has those
  K/V copied (`PrefixCopy`, first thing in a step: the sibling may be released in it) and runs
  the last prompt token itself. Elsewhere, or once the sibling failed, it prefills alone.
- Log-probabilities come back with the tokens (`StepResult`); a request's prompt's arrive chunk
  by chunk and go to its client with its first token, as does its time in the queue.
- Losing a rank (`lose`): its requests go back to the front of the queue with the tokens they
  generated, and are admitted again on a live rank (`live`), prefilling prompt + those tokens
  (one re-prefill); their clients see a stall, never an error, and no token twice. A step the
  group did not finish is undone (`rewind`) and scheduled again.

Thread safety: `add` and `abort` come from HTTP threads, the rest from the serving loop; one lock
guards the state. Events are returned with their sinks, to be delivered outside the lock.
"""

from __future__ import annotations

import secrets
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from moe_worker.serving.blocks import BlockAllocator
from moe_worker.serving.generation import (
    EventSink,
    FinishReason,
    GenerationRequest,
    InvalidRequest,
    QueueFull,
    ServingLoad,
    TokenEvent,
    TokenLogprob,
    finish_reason,
)
from moe_worker.serving.step import Chunk, NewSequence, PrefixCopy, StepResult

Delivery = tuple[EventSink, TokenEvent]


@dataclass(frozen=True)
class SchedulerConfig:
    world_size: int
    kv_cache_tokens: int
    """KV budget of each rank, in tokens (rounded down to whole blocks)."""
    max_context: int
    """Longest prompt + completion of one sequence (the model's context length)."""
    vocab_size: int
    eos_token_ids: tuple[int, ...] = ()
    block_size: int = 16
    max_batch_tokens: int = 512
    """New tokens one rank runs per step (decodes + prompt chunks); also its most sequences."""
    max_queued_requests: int = 128
    """Requests waiting for admission; one more is refused with QueueFull (HTTP 429)."""

    def __post_init__(self) -> None:
        if self.kv_cache_tokens < self.block_size:
            raise ValueError(
                f"kv_cache_tokens {self.kv_cache_tokens} is less than one block of "
                f"{self.block_size} tokens"
            )
        if self.max_batch_tokens < 1 or self.max_queued_requests < 0 or self.world_size < 1:
            raise ValueError("max_batch_tokens and world_size must be >= 1, the queue >= 0")


@dataclass
class _Sequence:
    request: GenerationRequest
    sink: EventSink
    seed: int
    reserve: int
    rank: int = -1
    prefilled: int = 0
    generated: int = 0
    arrived: float = field(default_factory=time.monotonic)
    queued: float | None = None
    """Seconds between `add` and admission; told to the client with the first token."""
    copy_from: str | None = None
    """The sibling whose prompt K/V this sequence waits to copy (None: it prefills alone)."""
    prompt_logprobs: list[TokenLogprob | None] | None = None
    tokens: list[int] = field(default_factory=list)
    """The tokens generated so far (a request resumed on another rank prefills them again)."""
    resumed: int = 0
    """Tokens it had generated when its rank was lost: prefilled after the prompt."""

    @property
    def prefill_length(self) -> int:
        """Prompt tokens, and those generated before it was resumed (prefilled again)."""
        return len(self.request.prompt_token_ids) + self.resumed

    @property
    def prompt_left(self) -> int:
        return self.prefill_length - self.prefilled

    @property
    def copy_tokens(self) -> int:
        """The prompt positions a sibling's cache gives it: all but the last."""
        return len(self.request.prompt_token_ids) - 1

    @property
    def request_id(self) -> str:
        return self.request.request_id


@dataclass(frozen=True)
class Scheduled:
    """One step's decisions: what every rank frees, admits and runs; events to deliver now."""

    release: tuple[str, ...] = ()
    admit: tuple[NewSequence, ...] = ()
    chunks: tuple[Chunk, ...] = ()
    deliveries: tuple[Delivery, ...] = field(default=())
    copies: tuple[PrefixCopy, ...] = ()


class Scheduler:
    def __init__(
        self, config: SchedulerConfig, draw_seed: Callable[[], int] = lambda: secrets.randbits(63)
    ) -> None:
        self.config, self._draw_seed = config, draw_seed
        blocks = config.kv_cache_tokens // config.block_size
        self.allocators = [
            BlockAllocator(blocks, config.block_size) for _ in range(config.world_size)
        ]
        self._lock = threading.Lock()
        self._waiting: deque[_Sequence] = deque()
        self._running: dict[str, _Sequence] = {}  # admission order (dicts keep insertion order)
        self._release: list[str] = []  # ended since the last step: ranks free them next step
        self._aborts: list[str] = []
        self._expected: set[str] = set()  # sequences whose sampled token the last step owes
        self._copy_ready: dict[str, _Sequence] = {}  # ended, K/V cached until released
        self.live = set(range(config.world_size))
        """Ranks that take sequences (the group's members)."""
        self._last: Scheduled | None = None  # the step scheduled and not yet completed
        self.resumed_total = 0
        """Requests resumed on another rank after theirs was lost."""

    # ------------------------------------------------------------ HTTP threads

    def add(self, request: GenerationRequest, sink: EventSink) -> None:
        """Queue `request`; InvalidRequest if it can never run, QueueFull if the queue is full."""
        reserve = self.check(request)
        with self._lock:
            rid = request.request_id
            if rid in self._running or any(s.request_id == rid for s in self._waiting):
                raise InvalidRequest(f"request id {rid!r} is already being served")
            if len(self._waiting) >= self.config.max_queued_requests:
                raise QueueFull(
                    f"{len(self._waiting)} requests are already waiting for a KV cache budget "
                    "(max_queued_requests); retry later"
                )
            seed = request.sampling.seed
            seq = _Sequence(request, sink, self._draw_seed() if seed is None else seed, reserve)
            if request.prefill_from is not None and seq.copy_tokens > 0:
                seq.copy_from = request.prefill_from
            if request.sampling.prompt_logprobs is not None:
                seq.prompt_logprobs = [None]
            self._waiting.append(seq)

    def check(self, request: GenerationRequest) -> int:
        """The KV tokens `request` needs; InvalidRequest (naming the parameter) if it never fits."""
        c, prompt = self.config, request.prompt_token_ids
        if not prompt:
            raise InvalidRequest("the prompt must have at least one token", param="prompt")
        bad = [t for t in prompt if not 0 <= t < c.vocab_size]
        if bad:
            raise InvalidRequest(
                f"prompt token ids {bad[:5]} are outside the vocabulary 0..{c.vocab_size - 1}",
                param="prompt",
            )
        need = len(prompt) + request.sampling.max_tokens
        if need > c.max_context:
            raise InvalidRequest(
                f"the prompt ({len(prompt)} tokens) plus max_tokens ({request.sampling.max_tokens})"
                f" is {need} tokens, more than the model's context length of {c.max_context}; "
                "lower max_tokens or shorten the prompt",
                param="max_tokens",
            )
        capacity = self.allocators[0].capacity_tokens
        if need > capacity:
            raise InvalidRequest(
                f"the prompt ({len(prompt)} tokens) plus max_tokens ({request.sampling.max_tokens})"
                f" is {need} tokens, more than a rank's whole KV cache of {capacity} tokens; lower "
                "max_tokens or raise kv_cache_tokens",
                param="max_tokens",
            )
        return need

    def abort(self, request_id: str) -> None:
        """End `request_id` at the next step boundary (unknown or finished ids are ignored)."""
        with self._lock:
            self._aborts.append(request_id)

    # ------------------------------------------------------------ the serving loop

    @property
    def has_work(self) -> bool:
        return bool(self._waiting or self._running or self._release or self._aborts)

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    @property
    def running(self) -> int:
        return len(self._running)

    def free_tokens(self, rank: int) -> int:
        return self.allocators[rank].free_tokens

    def load(self) -> ServingLoad:
        """Running and waiting sequences, and the fraction of KV blocks reserved, now."""
        capacity = sum(a.capacity_tokens for a in self.allocators)
        free = sum(a.free_tokens for a in self.allocators)
        used = capacity - free
        return ServingLoad(len(self._running), len(self._waiting), used / capacity, used, capacity)

    def schedule(self) -> Scheduled:
        """Decide the next step: releases, admissions, and each rank's chunks."""
        with self._lock:
            deliveries = self._apply_aborts()
            release = tuple(self._release)
            for rid in release:  # the ranks free in this order before admitting: same answers
                for allocator in self.allocators:
                    allocator.free(rid)
            self._release.clear()
            admitted = self._admit()
            copies = self._copies({seq.request_id for seq in admitted})
            chunks = self._chunks()
            self._expected = {c.request_id for c in chunks if c.sample}
            admit = tuple(
                NewSequence(
                    s.request_id,
                    s.rank,
                    s.request.prompt_token_ids,
                    s.request.sampling,
                    s.seed,
                    s.reserve,
                    tuple(s.tokens[: s.resumed]),
                )
                for s in admitted
            )
            self._last = Scheduled(release, admit, chunks, (), copies)
        return Scheduled(release, admit, chunks, tuple(deliveries), copies)

    def rewind(self) -> None:
        """Undo the last step scheduled (the group did not finish it; the ranks undo it too):
        its admissions wait again at the front, its prompt chunks are to run again, its
        releases are sent again (freeing twice is harmless)."""
        with self._lock:
            last, self._last = self._last, None
            self._expected = set()
            if last is None:
                return
            for chunk in last.chunks:
                seq = self._running.get(chunk.request_id)
                if seq is not None and chunk.start < seq.prefill_length:
                    seq.prefilled = min(seq.prefilled, chunk.start)
            for new in reversed(last.admit):
                seq = self._running.pop(new.request_id, None)
                if seq is not None:
                    self.allocators[seq.rank].free(seq.request_id)
                    seq.rank, seq.prefilled = -1, 0
                    self._waiting.appendleft(seq)
            self._release = list(last.release) + self._release
            for copy in last.copies:  # the ranks undid the copy: the sibling prefills alone
                seq = self._running.get(copy.target)
                if seq is not None:
                    seq.prefilled = 0

    def lose(self, ranks: Sequence[int]) -> list[str]:
        """`ranks` left the group: their requests wait again at the front of the queue, to be
        prefilled again (prompt + what they generated) on a live rank; their KV mirrors are
        emptied. Returns the ids resumed."""
        lost = set(ranks)
        with self._lock:
            self.live -= lost
            moved = [s for s in self._running.values() if s.rank in lost]
            for seq in reversed(moved):
                del self._running[seq.request_id]
                seq.rank, seq.prefilled, seq.resumed = -1, 0, seq.generated
                seq.copy_from = None  # resumed: it prefills alone, wherever it lands
                self._waiting.appendleft(seq)
            for rank in lost:
                blocks = self.allocators[rank].num_blocks
                self.allocators[rank] = BlockAllocator(blocks, self.config.block_size)
            self._expected -= {s.request_id for s in moved}
            self.resumed_total += len(moved)
        return [s.request_id for s in moved]

    def welcome(self, ranks: Sequence[int]) -> None:
        """`ranks` joined the group (empty caches): they take sequences again."""
        with self._lock:
            for rank in ranks:
                blocks = self.allocators[rank].num_blocks
                self.allocators[rank] = BlockAllocator(blocks, self.config.block_size)
            self.live |= set(ranks)

    def complete(self, results: Sequence[StepResult]) -> list[Delivery]:
        """Take every rank's sampled tokens and failures; events for the clients."""
        deliveries: list[Delivery] = []
        c = self.config
        with self._lock:
            failed = {rid: error for result in results for rid, error in result.errors}
            for rid, error in failed.items():
                if rid in self._running:
                    deliveries.append(self._end(rid, "error", error=error))
            for result in results:
                self._take_prompt_logprobs(result)
                logprobs = dict(result.logprobs)
                for rid, token in result.tokens:
                    seq = self._running.get(rid)
                    if seq is None or rid not in self._expected:
                        continue
                    self._expected.discard(rid)
                    seq.generated += 1
                    seq.tokens.append(token)
                    context = len(seq.request.prompt_token_ids) + seq.generated
                    reason = finish_reason(
                        token,
                        seq.generated,
                        seq.request.sampling,
                        c.eos_token_ids,
                        context,
                        c.max_context,
                    )
                    event = self._token_event(seq, token, logprobs.get(rid), reason)
                    deliveries.append((seq.sink, event))
                    if reason is not None:
                        self._running.pop(rid)
                        self._release.append(rid)
                        self._copy_ready[rid] = seq
            for rid in sorted(self._expected & self._running.keys()):
                deliveries.append(self._end(rid, "error", error="its rank returned no token"))
            self._expected = set()
            self._last = None
        return deliveries

    def _take_prompt_logprobs(self, result: StepResult) -> None:
        for rid, start, entries in result.prompt_logprobs:
            seq = self._running.get(rid)
            if seq is None or seq.prompt_logprobs is None or start != len(seq.prompt_logprobs):
                continue  # a chunk's entries come in order; anything else is a stale answer
            seq.prompt_logprobs.extend(entries)

    @staticmethod
    def _token_event(
        seq: _Sequence, token: int, logprob: TokenLogprob | None, reason: FinishReason | None
    ) -> TokenEvent:
        wanted = seq.request.sampling.logprobs is not None and logprob is not None
        first = seq.generated == 1
        prompt = seq.prompt_logprobs
        return TokenEvent(
            seq.request_id,
            (token,),
            reason,
            logprobs=(logprob,) if wanted and logprob is not None else (),
            prompt_logprobs=tuple(prompt) if first and prompt is not None else None,
            queue_seconds=seq.queued if first else None,
        )

    def drain(self, reason: FinishReason = "abort", error: str | None = None) -> list[Delivery]:
        """End every waiting and running request (the group is stopping)."""
        with self._lock:
            deliveries = [
                (s.sink, TokenEvent(s.request_id, (), reason, error)) for s in self._waiting
            ]
            self._waiting.clear()
            deliveries += [self._end(rid, reason, error=error) for rid in list(self._running)]
        return deliveries

    # ------------------------------------------------------------ under the lock

    def _apply_aborts(self) -> list[Delivery]:
        deliveries = []
        for rid in self._aborts:
            if rid in self._running:
                deliveries.append(self._end(rid, "abort"))
                continue
            for seq in self._waiting:
                if seq.request_id == rid:
                    self._waiting.remove(seq)
                    deliveries.append((seq.sink, TokenEvent(rid, (), "abort")))
                    break
        self._aborts.clear()
        return deliveries

    def _end(self, rid: str, reason: FinishReason, error: str | None = None) -> Delivery:
        seq = self._running.pop(rid)
        self._release.append(rid)
        if reason != "error":  # a failed sequence's rank freed its cache already
            self._copy_ready[rid] = seq
        return seq.sink, TokenEvent(rid, (), reason, error)

    def _admit(self) -> list[_Sequence]:
        admitted = []
        now = time.monotonic()
        while self._waiting:
            seq = self._waiting[0]
            rank = self._pick_rank(seq)
            if rank is None:
                break  # first come, first served: the younger requests wait behind it
            self._waiting.popleft()
            self.allocators[rank].reserve(seq.request_id, seq.reserve)
            seq.rank, seq.queued = rank, now - seq.arrived
            source = self._running.get(seq.copy_from or "")
            if source is None or source.rank != rank:
                seq.copy_from = None  # its sibling is elsewhere or gone: it prefills alone
            self._running[seq.request_id] = seq
            admitted.append(seq)
        return admitted

    def _pick_rank(self, seq: _Sequence) -> int | None:
        per_rank = [0] * self.config.world_size
        for running in self._running.values():
            per_rank[running.rank] += 1
        fits = [
            rank
            for rank, allocator in enumerate(self.allocators)
            if rank in self.live
            and per_rank[rank] < self.config.max_batch_tokens
            and allocator.can_reserve(seq.request_id, seq.reserve)
        ]
        if not fits:
            return None
        source = self._running.get(seq.copy_from or "")
        if source is not None and source.rank in fits:
            return source.rank  # beside its sibling: its prompt's K/V are copied, not computed
        return max(fits, key=lambda r: (self.allocators[r].free_tokens, -per_rank[r], -r))

    def _copies(self, admitted_now: set[str]) -> tuple[PrefixCopy, ...]:
        """Siblings whose source has cached all but the prompt's last token (in steps already
        run) get its K/V now; one whose source ended without them prefills alone. Ranks copy
        before they release and admit, so a sibling admitted in this step copies in the next."""
        copies = []
        for seq in self._running.values():
            if seq.copy_from is None or seq.request_id in admitted_now:
                continue
            running = self._running.get(seq.copy_from)
            source = running or self._copy_ready.get(seq.copy_from)
            moved = source is not None and source.rank != seq.rank  # resumed elsewhere
            if source is None or moved or (running is None and source.prefilled < seq.copy_tokens):
                seq.copy_from = None  # failed, moved, or ended before its prompt was cached
            elif source.prefilled >= seq.copy_tokens:
                copies.append(PrefixCopy(seq.copy_from, seq.request_id, seq.copy_tokens))
                seq.prefilled, seq.copy_from = seq.copy_tokens, None
                if seq.prompt_logprobs is not None and source.prompt_logprobs is not None:
                    seq.prompt_logprobs = list(source.prompt_logprobs)  # the prompt's, scored
        self._copy_ready.clear()  # released this step: their K/V are gone after it
        return tuple(copies)

    def _chunks(self) -> tuple[Chunk, ...]:
        budget = [self.config.max_batch_tokens] * self.config.world_size
        chunks = []
        running = list(self._running.values())
        for seq in running:  # decodes first: one token each, always within the budget
            if seq.prompt_left == 0:
                position = len(seq.request.prompt_token_ids) + seq.generated - 1
                chunks.append(Chunk(seq.request_id, seq.rank, position, 1, True))
                budget[seq.rank] -= 1
        for seq in running:  # then prompts, oldest first, chunked to what is left
            if seq.copy_from is None and seq.prompt_left and budget[seq.rank] > 0:
                length = min(seq.prompt_left, budget[seq.rank])
                start = seq.prefilled
                seq.prefilled += length
                budget[seq.rank] -= length
                chunks.append(Chunk(seq.request_id, seq.rank, start, length, seq.prompt_left == 0))
        return tuple(chunks)
