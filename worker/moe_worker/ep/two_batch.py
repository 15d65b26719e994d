"""Two-batch overlap: a step's tokens as two micro-batches, so that one micro-batch's all-to-all
is in flight while the other computes its attention or its experts (the seed's "async transfer",
sections 3.5 and 5.2; SGLang's two-batch overlap and DeepSeek's dual micro-batch do the same).

A micro-batch's forward is a generator (`forward_steps`) that yields right after issuing each
big all-to-all of its MoE layers (`EPEngine.moe_steps`: tokens out, outputs back; asynchronous
collectives, which nccl runs on its own stream). `interleave` advances the micro-batches in
turn, each up to its next yield:

    A: attention, gate, counts, tokens out ->   | B: attention, gate, counts, tokens out ->
    A: <- tokens, experts, outputs back ->      | B: <- tokens, experts, outputs back ->
    A: <- outputs, combine, next attention ...  | B: ...

so each big transfer of one micro-batch flies while the other runs attention or experts. Every
micro-batch yields twice per layer whatever its tokens (zero included), so every rank issues the
same collectives in the same order; the step descriptor tells all ranks whether a step runs two
micro-batches.

Micro-batches are split by tokens (`split_items`): sequences in order, the one straddling the
half cut in two (its first part in micro-batch A). Within a layer A's attention always runs
before B's (A leads every turn), so B's part of a cut prompt reads A's keys and values, written
into the cache by then, exactly as in one batch.

Legend: N tokens, D hidden, B sequences, V vocabulary.
"""

from __future__ import annotations

from collections.abc import Callable, Generator, Sequence
from typing import Any, TypeVar

from torch import Tensor

from moe_worker.models import GateBias, MoETransformer, Routing
from moe_worker.models.kv_cache import KVCache, StepBatch, StepMeta

T = TypeVar("T")
Item = tuple[Any, Sequence[int], int]
"""(sequence id, new token ids, position of the first): one sequence's part of a step."""
MoESteps = Callable[[int, Tensor, Routing], Generator[Any, None, Tensor]]


def split_items(items: Sequence[Item]) -> tuple[list[Item], list[Item]]:
    """Two micro-batches of about half the tokens each, in order; at most one prompt chunk is
    cut, A taking its first tokens. A single decode token is never cut."""
    half = (sum(len(tokens) for _, tokens, _ in items) + 1) // 2
    first: list[Item] = []
    second: list[Item] = []
    taken = 0
    for seq_id, tokens, position in items:
        if taken >= half:
            second.append((seq_id, tokens, position))
        elif taken + len(tokens) <= half:
            first.append((seq_id, tokens, position))
            taken += len(tokens)
        else:
            cut = half - taken
            first.append((seq_id, tokens[:cut], position))
            second.append((seq_id, tokens[cut:], position + cut))
            taken = half
    return first, second


def last_rows(items: Sequence[Item], parts: Sequence[Sequence[Item]]) -> list[int]:
    """Row of each item's last piece in the micro-batches' logits concatenated in order."""
    row_of = {}
    for row, (seq_id, _, _) in enumerate(item for part in parts for item in part):
        row_of[seq_id] = row  # a cut sequence: its second piece wins
    return [row_of[seq_id] for seq_id, _, _ in items]


def forward_steps(
    model: MoETransformer,
    moe_steps: MoESteps,
    batch: StepBatch,
    cache: KVCache,
    meta: StepMeta,
    gate: GateBias | None,
    all_positions: bool = False,
) -> Generator[Any, None, Tensor]:
    """`model.forward` of one micro-batch, yielding inside its MoE layers; returns its logits."""
    return (yield from model.forward_steps(moe_steps, batch, cache, meta, gate, all_positions))


def interleave(steps: Sequence[Generator[Any, None, T]]) -> list[T]:
    """Advance each generator in turn up to its next yield until all are done; their results."""
    results: list[Any] = [None] * len(steps)
    live = list(range(len(steps)))
    while live:
        for index in list(live):
            try:
                next(steps[index])
            except StopIteration as done:
                results[index] = done.value
                live.remove(index)
    return results


def run_through(steps: Generator[Any, None, T]) -> T:
    """One generator alone, straight through (no overlap)."""
    return interleave([steps])[0]
