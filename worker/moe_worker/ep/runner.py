"""The model runner of one rank: how a step runs, given what the leader's scheduler decided.

It keeps this rank's sequences (prompt, sampling parameters, seed, sampled tokens) and their KV
cache, turns its chunks of a `StepDescriptor` into one `StepBatch`, runs the collective forward
through the EP engine, and samples the sequences whose chunk ends with a token. The
log-probabilities a request asks for are computed here, where the logits are
(`moe_worker.ep.sampling.token_logprobs`), and travel back in the `StepResult`.

A step the group did not finish (a member was lost during it: the leader never had every rank's
result) is undone on the survivors (`rewind`): the sequences admitted in it are dropped, the
others go back to their cached length and tokens before it, and the leader runs it again. A
request resumed from a lost rank is admitted with the tokens it had generated, prefilled after
its prompt (one re-prefill), and sampling goes on at its next token index: the same tokens as
if nothing had happened.

A request that fails here (an unknown id, a position that disagrees with the cache, a full cache,
a sampling error: bugs, all of them) fails alone: it is reported in the `StepResult` and freed,
and the rank still joins the step's forward with its other sequences, or with zero tokens, so the
collectives stay in step. Everything that can fail per request happens before the forward
(`KVCache.prepare` first) or after it (sampling); the forward itself is the only collective part.

Legend: B sequences in the step, V vocabulary.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import torch

from moe_worker.ep.engine import EPEngine
from moe_worker.ep.sampling import sample, token_logprobs
from moe_worker.ep.two_batch import Item, last_rows, split_items
from moe_worker.models.kv_cache import KVCache, StepBatch, StepMeta
from moe_worker.serving.generation import SamplingParams, TokenLogprob
from moe_worker.serving.step import Chunk, NewSequence, PrefixCopy, StepResult

log = logging.getLogger("moe_worker.ep.runner")


@dataclass
class _Sequence:
    prompt: tuple[int, ...]
    sampling: SamplingParams
    seed: int
    generated: list[int] = field(default_factory=list)
    resumed: int = 0
    """Tokens it had generated before it was resumed here: prefilled after the prompt."""

    @property
    def prefill_length(self) -> int:
        return len(self.prompt) + self.resumed

    def prefill(self, start: int, length: int) -> list[int]:
        if start < len(self.prompt) and start + length <= len(self.prompt):
            return list(self.prompt[start : start + length])
        tokens = (*self.prompt, *self.generated[: self.resumed])
        return list(tokens[start : start + length])


@dataclass
class _Undo:
    """What a step changed on this rank, to undo it when the group did not finish it."""

    step: int
    before: dict[str, tuple[int, int]]
    """Each sequence held before the step: (cached tokens, generated tokens)."""
    admitted: list[str] = field(default_factory=list)


class ModelRunner:
    def __init__(self, engine: EPEngine, cache: KVCache, rank: int) -> None:
        self.engine, self.cache, self.rank = engine, cache, rank
        self.sequences: dict[str, _Sequence] = {}
        self.tokens_run = 0
        """New tokens of this rank's sequences run through the model (for metrics)."""
        self._undo: _Undo | None = None

    # ------------------------------------------------------------ steps the group may not finish

    def begin_step(self, step: int) -> None:
        """Remember this rank's state before `step` (undone by `rewind` if the group does not
        finish it)."""
        before = {
            rid: (self.cache.length(rid), len(seq.generated)) for rid, seq in self.sequences.items()
        }
        self._undo = _Undo(step, before)

    @property
    def last_step(self) -> int | None:
        """The last step this rank began (None: none yet)."""
        return None if self._undo is None else self._undo.step

    def rewind(self) -> None:
        """Undo the last step begun: its admissions dropped, every other sequence back to what
        it had cached and generated before it (its releases stand: those requests had ended)."""
        undo, self._undo = self._undo, None
        if undo is None:
            return
        for rid in undo.admitted:
            self.sequences.pop(rid, None)
            self.cache.free(rid)
        for rid, (cached, generated) in undo.before.items():
            seq = self.sequences.get(rid)
            if seq is not None:
                self.cache.rewind(rid, cached)
                del seq.generated[generated:]

    def release(self, request_ids: Iterable[str]) -> None:
        """Free finished sequences (ids of other ranks are ignored), in the leader's order."""
        for rid in request_ids:
            self.sequences.pop(rid, None)
            self.cache.free(rid)  # idempotent: a failed sequence was freed when it failed

    def copy_prefixes(self, copies: Sequence[PrefixCopy]) -> list[tuple[str, str]]:
        """Sibling sequences of this rank get their source's prompt K/V; (id, error) of
        failures (the target fails alone)."""
        errors = []
        for copy in copies:
            if copy.target not in self.sequences:
                continue  # another rank's
            try:
                self.cache.copy_prefix(copy.source, copy.target, copy.tokens)
            except Exception as error:
                errors.append(self._fail(copy.target, error))
        return errors

    def admit(self, admitted: Sequence[NewSequence]) -> list[tuple[str, str]]:
        """Take this rank's new sequences and reserve their KV budget; (id, error) of failures."""
        errors = []
        for new in admitted:
            if new.rank != self.rank:
                continue
            try:
                self.cache.reserve(new.request_id, new.reserve_tokens)
                self.sequences[new.request_id] = _Sequence(
                    new.prompt_token_ids,
                    new.sampling,
                    new.seed,
                    list(new.generated),
                    resumed=len(new.generated),
                )
                if self._undo is not None:
                    self._undo.admitted.append(new.request_id)
            except Exception as error:  # one request fails, the group goes on
                errors.append(self._fail(new.request_id, error))
        return errors

    @torch.no_grad()
    def step(self, chunks: Sequence[Chunk], two_batch: bool = False) -> StepResult:
        """Collective: this rank's chunks through the model (maybe none), then sampling.

        `two_batch` (the same on every rank: the step descriptor says it) runs the tokens as two
        micro-batches whose all-to-alls overlap the other's compute (`moe_worker.ep.two_batch`)."""
        items, sampled, errors = [], [], []
        for chunk in chunks:
            if chunk.rank != self.rank:
                continue
            try:
                items.append((chunk.request_id, self._new_tokens(chunk), chunk.start))
                if chunk.sample:
                    sampled.append(chunk.request_id)
            except Exception as error:  # a bug in one request: it fails alone
                errors.append(self._fail(chunk.request_id, error))
        parts = split_items(items) if two_batch else (items,)
        try:
            batches, metas = self._prepare(parts)
        except Exception as error:  # every chunk of the step fails, not the rank
            errors += [self._fail(rid, error) for rid, _, _ in items]
            items, sampled = [], []
            parts = tuple([] for _ in parts)
            batches, metas = self._prepare(parts)
        scoring = [item for item in items if self._scores_prompt(item)]
        logits = self._forward(items, parts, batches, metas, bool(scoring))  # the collective part
        self.tokens_run += sum(b.num_tokens for b in batches)
        last_BV, prompt_logprobs = logits, []
        if scoring:  # every position's logits came back: the prompt's, then each item's last
            ends = torch.tensor([len(tokens) for _, tokens, _ in items]).cumsum(0)
            try:
                prompt_logprobs = self._prompt_logprobs(logits, items, ends)
            except Exception as error:
                errors += [self._fail(rid, error) for rid, _, _ in scoring]
            last_BV = logits[ends - 1]
        tokens: list[tuple[str, int]] = []
        logprobs: list[tuple[str, TokenLogprob]] = []
        sampled = [rid for rid in sampled if rid in self.sequences]
        if sampled:
            row_of = {rid: row for row, (rid, _, _) in enumerate(items)}
            try:
                tokens, logprobs = self._sample(last_BV[[row_of[rid] for rid in sampled]], sampled)
            except Exception as error:  # the tokens are lost, the group goes on
                errors += [self._fail(rid, error) for rid in sampled]
        return StepResult(tuple(tokens), tuple(errors), None, tuple(logprobs), prompt_logprobs)

    def _scores_prompt(self, item: Item) -> bool:
        """The item's rows predict prompt tokens of a request that asked for their logprobs."""
        seq = self.sequences[item[0]]
        return seq.sampling.prompt_logprobs is not None and item[2] + 1 < len(seq.prompt)

    def _prompt_logprobs(
        self, logits_NV: torch.Tensor, items: Sequence[Item], ends: torch.Tensor
    ) -> tuple[tuple[str, int, tuple[TokenLogprob, ...]], ...]:
        """Each scoring chunk's rows predict its next prompt tokens: positions start+1 up to
        the chunk's end, or the prompt's last (its own last row then predicts a sampled one)."""
        out = []
        for (rid, tokens, start), end in zip(items, ends.tolist(), strict=True):
            seq = self.sequences[rid]
            if seq.sampling.prompt_logprobs is None or start >= len(seq.prompt):
                continue
            targets = seq.prompt[start + 1 : start + len(tokens) + 1]
            if not targets:
                continue
            rows = logits_NV[end - len(tokens) : end - len(tokens) + len(targets)]
            entries = token_logprobs(rows, list(targets), seq.sampling.prompt_logprobs)
            out.append((rid, start + 1, tuple(entries)))
        return tuple(out)

    def _prepare(self, parts: Sequence[Sequence[Item]]) -> tuple[list[StepBatch], list[StepMeta]]:
        """Each micro-batch's batch and cache layout, in order (a cut prompt's second part
        follows its first)."""
        device = self.cache.k_LPHd.device
        batches = [StepBatch.build(part, device) for part in parts]
        return batches, [self.cache.prepare(batch) for batch in batches]

    def _forward(
        self,
        items: Sequence[Item],
        parts: Sequence[Sequence[Item]],
        batches: list[StepBatch],
        metas: list[StepMeta],
        all_positions: bool = False,
    ) -> torch.Tensor:
        """Logits [B, V], one row per item (its last token); with `all_positions` [N, V], a row
        per token in the items' order (micro-batches keep it: A's tokens come first)."""
        if len(batches) == 1:
            return self.engine.forward(
                batches[0], self.cache, metas[0], all_positions=all_positions
            )
        logits = self.engine.forward_overlapped(
            batches, self.cache, metas, all_positions=all_positions
        )
        return torch.cat(logits) if all_positions else torch.cat(logits)[last_rows(items, parts)]

    def _new_tokens(self, chunk: Chunk) -> list[int]:
        seq = self.sequences.get(chunk.request_id)
        if seq is None:
            raise KeyError(f"rank {self.rank} holds no sequence {chunk.request_id!r}")
        cached = self.cache.length(chunk.request_id)
        if chunk.start != cached:
            raise ValueError(
                f"the leader runs {chunk.request_id!r} from position {chunk.start}, "
                f"rank {self.rank} has {cached} tokens cached"
            )
        if chunk.start < seq.prefill_length:
            return seq.prefill(chunk.start, chunk.length)
        if chunk.length != 1 or not seq.generated:
            raise ValueError(f"{chunk.request_id!r}: a decode step feeds exactly its last token")
        return [seq.generated[-1]]

    def _sample(
        self, logits_BV: torch.Tensor, request_ids: list[str]
    ) -> tuple[list[tuple[str, int]], list[tuple[str, TokenLogprob]]]:
        seqs = [self.sequences[rid] for rid in request_ids]
        next_B = sample(
            logits_BV,
            [s.sampling for s in seqs],
            [s.seed for s in seqs],
            [len(s.generated) for s in seqs],
        ).tolist()
        for seq, token in zip(seqs, next_B, strict=True):
            seq.generated.append(int(token))
        asking = [row for row, seq in enumerate(seqs) if seq.sampling.logprobs is not None]
        logprobs = []
        if asking:
            top = max(seqs[row].sampling.logprobs or 0 for row in asking)
            entries = token_logprobs(logits_BV[asking], [next_B[row] for row in asking], top)
            for row, entry in zip(asking, entries, strict=True):
                wanted = seqs[row].sampling.logprobs or 0
                logprobs.append((request_ids[row], TokenLogprob(entry.logprob, entry.top[:wanted])))
        tokens = [(rid, int(t)) for rid, t in zip(request_ids, next_B, strict=True)]
        return tokens, logprobs

    def _fail(self, request_id: str, error: Exception) -> tuple[str, str]:
        log.error("rank %d failed request %s: %s", self.rank, request_id, error)
        self.sequences.pop(request_id, None)
        self.cache.free(request_id)
        return request_id, f"{type(error).__name__}: {error}"
