"""The KV-cache budget as block tables: which fixed-size blocks of token slots each sequence owns.

Torch-free, so the leader's scheduler keeps an exact mirror of every rank's cache (same calls in the
same order give the same answers) without holding any tensor; `moe_worker.models.kv_cache` puts
storage behind it.
"""

from __future__ import annotations

from collections.abc import Hashable

SeqId = Hashable


class KVCacheFull(RuntimeError):
    """The KV cache budget cannot hold what a sequence needs; the message says how much."""


class BlockAllocator:
    """Block tables and the free list of one budget; no storage, so a scheduler can keep an
    exact mirror of every rank's cache (same calls, same answers) without holding tensors."""

    def __init__(self, num_blocks: int, block_size: int) -> None:
        self.num_blocks, self.block_size = num_blocks, block_size
        self._free = list(range(num_blocks - 1, -1, -1))  # a stack: lowest block first
        self._tables: dict[SeqId, list[int]] = {}

    @property
    def capacity_tokens(self) -> int:
        return self.num_blocks * self.block_size

    @property
    def free_tokens(self) -> int:
        return len(self._free) * self.block_size

    def blocks_for(self, tokens: int) -> int:
        return -(-tokens // self.block_size)

    def missing_blocks(self, seq_id: SeqId, tokens: int) -> int:
        """Blocks `seq_id` lacks to hold `tokens` tokens in all."""
        return max(self.blocks_for(tokens) - len(self._tables.get(seq_id, ())), 0)

    def can_reserve(self, seq_id: SeqId, tokens: int) -> bool:
        return self.missing_blocks(seq_id, tokens) <= len(self._free)

    def reserve(self, seq_id: SeqId, tokens: int) -> None:
        """Make `seq_id` able to hold `tokens` tokens in all (admits it if new); all or nothing."""
        missing = self.missing_blocks(seq_id, tokens)
        if missing > len(self._free):
            raise KVCacheFull(
                f"KV cache full: sequence {seq_id!r} needs {tokens} tokens "
                f"({missing} more blocks of {self.block_size}), {self.free_tokens} of "
                f"{self.capacity_tokens} tokens are free; wait for sequences to finish or raise "
                "kv_cache_tokens"
            )
        table = self._tables.setdefault(seq_id, [])
        table.extend(self._free.pop() for _ in range(missing))

    def free(self, seq_id: SeqId) -> None:
        """Give a finished sequence's blocks back; unknown ids are ignored (idempotent)."""
        self._free.extend(reversed(self._tables.pop(seq_id, [])))

    def table(self, seq_id: SeqId) -> list[int]:
        return self._tables[seq_id]

    def __contains__(self, seq_id: SeqId) -> bool:
        return seq_id in self._tables
