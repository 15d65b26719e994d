"""The KV cache of one rank's sequences, and the batch a forward step runs.

One preallocated budget of `tokens` token slots serves every layer: slots are grouped in blocks of
`block_size`, a sequence holds a list of blocks (its block table), gets blocks when admitted or
when it grows, and gives them back when it finishes. The budget is therefore about token count, not
sequence count, and a full cache is an error the scheduler sees before the step (`reserve`).

A step (`StepBatch`) mixes sequences that prefill (a whole prompt, or a chunk of one) with sequences
that decode (one token): flat token ids and positions, plus one span per sequence. `prepare` turns
it into `StepMeta`, computed once per step and used by every layer: where each new token's K/V
go, and attention groups (decoding sequences in padded groups of similar lengths, each prefill in
its own) so one SDPA call serves many sequences without padding queries and with little padding
of keys. A prompt chunk that starts the sequence attends to the step's own keys (causal), with
nothing read back from the cache.

What a token leaves per layer: its keys and values ([Hkv, Hd] each); under multi-head latent
attention (DeepSeek-V3) one entry [1, C + R], its compressed latent and rotary key, and no
values (`value_dim=0`; `models.mla`). Layers are blocks: dense ones included.

Legend: L layers, P token slots (blocks x block size), Hkv kv heads, Hd head dim, N new tokens,
B sequences in a group, Q new tokens per sequence in a group, T keys per sequence (padded).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from moe_contract.shape import ModelShape
from moe_worker.serving.blocks import BlockAllocator, KVCacheFull, SeqId

__all__ = ["BlockAllocator", "KVCache", "KVCacheFull", "SeqId", "StepBatch", "StepMeta"]


@dataclass(frozen=True)
class SeqSpan:
    """One sequence's new tokens in a step."""

    seq_id: SeqId
    start: int
    """Index of its first new token in the step's flat tokens."""
    length: int
    """New tokens this step: a prompt (chunk), or 1 when decoding."""
    position: int
    """Position of its first new token: how many of its tokens are already cached."""


@dataclass(frozen=True)
class StepBatch:
    """The tokens of one forward step: flat ids and positions [N], one span per sequence."""

    token_ids_N: Tensor
    positions_N: Tensor
    spans: tuple[SeqSpan, ...]

    @classmethod
    def build(
        cls, items: Sequence[tuple[SeqId, Sequence[int], int]], device: torch.device | str = "cpu"
    ) -> StepBatch:
        """From (sequence id, new token ids, position of the first) per sequence; may be empty."""
        spans, ids, positions, start = [], [], [], 0
        for seq_id, tokens, position in items:
            if not tokens:
                raise ValueError(f"sequence {seq_id!r} has no new tokens in this step")
            spans.append(SeqSpan(seq_id, start, len(tokens), position))
            ids.extend(tokens)
            positions.extend(range(position, position + len(tokens)))
            start += len(tokens)
        if len({s.seq_id for s in spans}) != len(spans):
            raise ValueError("a sequence appears twice in one step")
        return cls(
            torch.tensor(ids, dtype=torch.int64, device=device),
            torch.tensor(positions, dtype=torch.int64, device=device),
            tuple(spans),
        )

    @property
    def num_tokens(self) -> int:
        return int(self.token_ids_N.shape[0])

    def last_index_B(self) -> Tensor:
        """Index of each span's last token in the flat tokens [B]."""
        last = [s.start + s.length - 1 for s in self.spans]
        return torch.tensor(last, dtype=torch.int64, device=self.token_ids_N.device)


DECODE_PADDING = 1.5
"""A decode group's longest sequence is at most this many times its shortest: fewer keys read
and attended as padding, for a few more (small) attention calls."""


@dataclass(frozen=True)
class AttentionGroup:
    """Sequences whose attention runs as one padded SDPA call."""

    token_index_BQ: Tensor
    """Flat index of each query token (no padding: Q is equal within a group)."""
    key_slots_BT: Tensor | None
    """Cache slot of each key position 0..T-1; padding points at slot 0 and is masked. None:
    one sequence's first tokens, whose keys are the step's own (`token_index_BQ`), causal."""
    mask_B1QT: Tensor | None
    """True where a query may attend a key: key position <= query position (causal)."""

    @property
    def fresh(self) -> bool:
        return self.key_slots_BT is None


@dataclass(frozen=True)
class StepMeta:
    """What every layer's attention needs for one step."""

    slots_N: Tensor
    """Cache slot receiving each new token's K/V."""
    groups: tuple[AttentionGroup, ...]


class KVCache:
    """Paged K/V storage for all layers in one budget; `blocks` says which slots a sequence owns."""

    def __init__(
        self,
        *,
        layers: int,
        kv_heads: int,
        head_dim: int,
        tokens: int,
        block_size: int = 16,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
        value_dim: int | None = None,
    ) -> None:
        """`value_dim`: per-head width of the values (None: head_dim; 0: no values, the keys'
        entries hold everything, as MLA's latents do)."""
        if tokens < block_size:
            raise ValueError(f"kv_cache_tokens {tokens} is less than one block of {block_size}")
        self.blocks = BlockAllocator(tokens // block_size, block_size)
        slots = self.blocks.capacity_tokens
        self.k_LPHd = torch.zeros(layers, slots, kv_heads, head_dim, dtype=dtype, device=device)
        value_dim = head_dim if value_dim is None else value_dim
        self.v_LPHd: Tensor | None = None
        if value_dim:
            self.v_LPHd = torch.zeros(
                layers, slots, kv_heads, value_dim, dtype=dtype, device=device
            )
        self._lengths: dict[SeqId, int] = {}
        self._slot_of: dict[SeqId, Tensor] = {}  # slot of every position a table covers

    @classmethod
    def for_shape(
        cls,
        shape: ModelShape,
        tokens: int,
        *,
        block_size: int = 16,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> KVCache:
        """The cache of every block of `shape`: K and V per kv head, or MLA's [latent, rotary
        key] per token (`ModelShape.kv_bytes_per_token_layer` either way)."""
        if shape.latent_attention:
            heads, width, values = 1, shape.kv_lora_rank + shape.rope_head_dim, 0
        else:
            heads, width, values = shape.key_value_heads, shape.head_dim, shape.head_dim
        return cls(
            layers=shape.total_layers,
            kv_heads=heads,
            head_dim=width,
            tokens=tokens,
            block_size=block_size,
            dtype=dtype,
            device=device,
            value_dim=values,
        )

    @property
    def capacity_tokens(self) -> int:
        return self.blocks.capacity_tokens

    @property
    def free_tokens(self) -> int:
        return self.blocks.free_tokens

    def can_reserve(self, seq_id: SeqId, tokens: int) -> bool:
        return self.blocks.can_reserve(seq_id, tokens)

    def reserve(self, seq_id: SeqId, tokens: int) -> None:
        """Admit `seq_id` (or grow it) to hold `tokens` tokens; KVCacheFull if it cannot."""
        self.blocks.reserve(seq_id, tokens)
        self._lengths.setdefault(seq_id, 0)

    def free(self, seq_id: SeqId) -> None:
        self.blocks.free(seq_id)
        self._lengths.pop(seq_id, None)
        self._slot_of.pop(seq_id, None)

    def copy_prefix(self, source: SeqId, target: SeqId, tokens: int) -> None:
        """`target` (reserved, nothing cached yet) gets the K/V of `source`'s first `tokens`
        positions, every layer: a sibling sharing its prompt skips that prefill."""
        if self.length(source) < tokens:
            raise ValueError(
                f"sequence {source!r} has {self.length(source)} tokens cached, not {tokens}"
            )
        if target not in self or self.length(target):
            raise ValueError(f"sequence {target!r} is not admitted, or has tokens cached")
        self.reserve(target, tokens)
        device = self.k_LPHd.device
        into = self._slots(target, 0, tokens).to(device)
        out_of = self._slots(source, 0, tokens).to(device)
        self.k_LPHd[:, into] = self.k_LPHd[:, out_of]
        self.v_LPHd[:, into] = self.v_LPHd[:, out_of]
        self._lengths[target] = tokens

    def length(self, seq_id: SeqId) -> int:
        """Tokens of `seq_id` whose K/V are cached."""
        return self._lengths.get(seq_id, 0)

    def __contains__(self, seq_id: SeqId) -> bool:
        return seq_id in self.blocks

    def rewind(self, seq_id: SeqId, length: int) -> None:
        """Forget what `seq_id` cached past `length` (a step the group did not finish): its
        later positions are written again. Its blocks stay reserved."""
        if seq_id in self._lengths:
            self._lengths[seq_id] = min(self._lengths[seq_id], length)

    # ------------------------------------------------------------ one step

    def prepare(self, batch: StepBatch) -> StepMeta:
        """Reserve room for the batch's new tokens and lay out its attention (once per step).

        A span may start before the cached end (its later tokens are then overwritten), never
        after it. Under expert parallelism call this before the step's collective forward, so a
        full cache fails on its own rank before any all-to-all.
        """
        device = self.k_LPHd.device
        missing = 0
        for span in batch.spans:  # check everything first, so a refused step changes nothing
            cached = self._lengths.get(span.seq_id, 0)
            if span.position > cached:
                raise ValueError(
                    f"sequence {span.seq_id!r} starts at position {span.position} but only "
                    f"{cached} tokens are cached"
                )
            missing += self.blocks.missing_blocks(span.seq_id, span.position + span.length)
        if missing * self.blocks.block_size > self.free_tokens:
            raise KVCacheFull(
                f"KV cache full: this step needs {missing} more blocks of {self.blocks.block_size} "
                f"tokens, {self.free_tokens} of {self.capacity_tokens} tokens are free; run fewer "
                "sequences or raise kv_cache_tokens"
            )
        slots, decodes, groups = [], [], []
        keys: dict[SeqId, Tensor] = {}  # each sequence's slots 0..end, computed once per step
        for span in batch.spans:
            end = span.position + span.length
            self.reserve(span.seq_id, end)
            self._lengths[span.seq_id] = end
            keys[span.seq_id] = self._slots(span.seq_id, 0, end)
            slots.append(keys[span.seq_id][span.position :])
            if span.length == 1:
                decodes.append(span)
            elif span.position == 0:  # its keys are its own new tokens: nothing to read back
                offsets = torch.arange(span.start, span.start + span.length)
                groups.append(AttentionGroup(offsets[None, :].to(device), None, None))
            else:
                groups.append(self._group([span], keys, device))
        for similar in _by_length(decodes):
            groups.append(self._group(similar, keys, device))
        slots_N = torch.cat(slots) if slots else torch.zeros(0, dtype=torch.int64)
        return StepMeta(slots_N.to(device), tuple(groups))

    def write(self, layer: int, meta: StepMeta, k_NHd: Tensor, v_NHd: Tensor | None = None) -> None:
        """The step's new keys and values (values only where the cache holds them)."""
        self.k_LPHd[layer].index_copy_(0, meta.slots_N, k_NHd)
        if self.v_LPHd is not None:
            assert v_NHd is not None, "this cache holds values: write them"
            self.v_LPHd[layer].index_copy_(0, meta.slots_N, v_NHd)

    def read(self, layer: int, key_slots_BT: Tensor) -> tuple[Tensor, Tensor]:
        """Keys and values at the given slots: [B, T, Hkv, Hd] each (`index_select`: a gather,
        measured faster than indexing with a 2-d tensor)."""
        assert self.v_LPHd is not None, "this cache holds no values: read_keys"
        flat = key_slots_BT.reshape(-1)
        shape = (*key_slots_BT.shape, *self.k_LPHd.shape[2:])
        k = self.k_LPHd[layer].index_select(0, flat).view(shape)
        return k, self.v_LPHd[layer].index_select(0, flat).view(shape)

    def read_keys(self, layer: int, key_slots_BT: Tensor) -> Tensor:
        """The key entries at the given slots [B, T, Hkv, Hd] (MLA: [B, T, 1, C + R])."""
        flat = key_slots_BT.reshape(-1)
        shape = (*key_slots_BT.shape, *self.k_LPHd.shape[2:])
        return self.k_LPHd[layer].index_select(0, flat).view(shape)

    def _slots(self, seq_id: SeqId, start: int, end: int) -> Tensor:
        """Cache slots of positions start..end-1. A block table only grows, so the slots of
        every position it covers are computed once and sliced afterwards."""
        size = self.blocks.block_size
        table = self.blocks.table(seq_id)
        slots = self._slot_of.get(seq_id)
        if slots is None or slots.numel() < len(table) * size:
            blocks = torch.tensor(table, dtype=torch.int64)
            slots = (blocks[:, None] * size + torch.arange(size)[None, :]).reshape(-1)
            self._slot_of[seq_id] = slots
        return slots[start:end]

    def _group(
        self, spans: list[SeqSpan], key_slots: dict[SeqId, Tensor], device: torch.device
    ) -> AttentionGroup:
        q = spans[0].length
        keys = max(s.position + s.length for s in spans)
        key_slots_BT = torch.zeros(len(spans), keys, dtype=torch.int64)
        for row, span in enumerate(spans):
            key_slots_BT[row, : span.position + span.length] = key_slots[span.seq_id]
        offsets_Q = torch.arange(q)
        token_index_BQ = torch.stack([span.start + offsets_Q for span in spans])
        query_pos_BQ = torch.stack([span.position + offsets_Q for span in spans])
        mask_BQT = torch.arange(keys)[None, None, :] <= query_pos_BQ[:, :, None]
        return AttentionGroup(
            token_index_BQ.to(device), key_slots_BT.to(device), mask_BQT.unsqueeze(1).to(device)
        )


def _by_length(decodes: list[SeqSpan]) -> list[list[SeqSpan]]:
    """Decoding spans in groups of similar key counts (longest <= DECODE_PADDING x shortest)."""
    groups: list[list[SeqSpan]] = []
    for span in sorted(decodes, key=lambda s: s.position):
        if groups and span.position + 1 <= DECODE_PADDING * (groups[-1][0].position + 1):
            groups[-1].append(span)
        else:
            groups.append([span])
    return groups
