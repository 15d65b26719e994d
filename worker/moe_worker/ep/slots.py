"""The experts one rank serves, as stacked tensors: per layer, one tensor per expert matrix with
the local slots first ([S, rows, cols]), so one grouped GEMM reads every slot of a layer.

Built from the experts the plan places on the rank. A plan switch (`flip`) rewrites only the
slots whose expert changed, from the experts received (staging buffers) or from another local
slot; in place while the slot count stays, into new stacks when a plan gives a rank more (or
fewer) slots per rank than it had. A slot's matrices are contiguous views (`matrices`), sent as
they are when another rank needs the expert.

Legend: L layers, S slots per rank, O rows and I columns of one expert matrix.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from moe_worker.models import ExpertWeights

Matrices = tuple[Tensor, ...]
"""One expert's matrices, in its family's `expert_matrices` order."""


class SlotStacks:
    """stacks[layer][m]: matrix m of every local slot of `layer`, [S, O, I]."""

    def __init__(self, stacks: list[Matrices], experts: list[tuple[int, ...]]) -> None:
        self._stacks, self._experts = stacks, experts

    @classmethod
    def build(
        cls,
        local_experts: Sequence[Sequence[int]],
        weights: Mapping[tuple[int, int], ExpertWeights],
    ) -> SlotStacks:
        """`local_experts[layer][s]`: the expert of slot s; `weights` holds each (layer, expert)
        once (two slots of one expert get two copies: slots are what the GEMM reads)."""
        stacks = [
            tuple(
                torch.stack([weights[(layer, e)].matrices[m] for e in experts])
                for m in range(len(weights[(layer, experts[0])].matrices))
            )
            for layer, experts in enumerate(local_experts)
        ]
        return cls(stacks, [tuple(experts) for experts in local_experts])

    @classmethod
    def empty(
        cls,
        layers: int,
        shapes: Sequence[tuple[int, int]],
        dtype: torch.dtype,
        device: torch.device,
    ) -> SlotStacks:
        """No slot in any layer (a rank out of the plan: joining), [0, O, I] per matrix."""
        stacks = [
            tuple(torch.empty((0, rows, cols), dtype=dtype, device=device) for rows, cols in shapes)
            for _ in range(layers)
        ]
        return cls(stacks, [() for _ in range(layers)])

    def layer(self, layer: int) -> Matrices:
        return self._stacks[layer]

    def experts(self, layer: int) -> tuple[int, ...]:
        """The logical expert of each local slot."""
        return self._experts[layer]

    def held(self) -> list[set[int]]:
        return [set(experts) for experts in self._experts]

    def matrices(self, layer: int, expert: int) -> Matrices:
        """Views of the first slot holding `expert` (contiguous: the slot index comes first)."""
        slot = self._experts[layer].index(expert)
        return tuple(stack[slot] for stack in self._stacks[layer])

    def flip(
        self,
        local_experts: Sequence[Sequence[int]],
        received: Mapping[tuple[int, int], Matrices],
    ) -> None:
        """Serve `local_experts` from now on: each changed slot is copied from `received` or,
        for an expert this rank already held, from its old slot."""
        for layer, wanted in enumerate(local_experts):
            wanted = tuple(wanted)
            old = self._experts[layer]
            if wanted == old:
                continue
            if len(wanted) == len(old):
                self._rewrite(layer, wanted, received)
            else:
                self._stacks[layer] = self._regrown(layer, wanted, received)
            self._experts[layer] = wanted

    def _source(
        self, layer: int, expert: int, received: Mapping[tuple[int, int], Matrices]
    ) -> Matrices:
        if (layer, expert) in received:
            return received[(layer, expert)]
        return self.matrices(layer, expert)  # held before the switch (checked by plan_transfers)

    def _rewrite(
        self, layer: int, wanted: tuple[int, ...], received: Mapping[tuple[int, int], Matrices]
    ) -> None:
        """Same slot count: copy the changed slots in place. Sources are gathered before any
        write, because a slot may be the source of another one that it replaces."""
        old = self._experts[layer]
        changed = [s for s, (a, b) in enumerate(zip(old, wanted, strict=True)) if a != b]
        sources = [
            received[(layer, wanted[s])]
            if (layer, wanted[s]) in received
            else tuple(m.clone() for m in self.matrices(layer, wanted[s]))  # may be overwritten
            for s in changed
        ]
        for slot, matrices in zip(changed, sources, strict=True):
            for stack, matrix in zip(self._stacks[layer], matrices, strict=True):
                stack[slot].copy_(matrix)

    def _regrown(
        self, layer: int, wanted: tuple[int, ...], received: Mapping[tuple[int, int], Matrices]
    ) -> Matrices:
        """A new slot count: new stacks, every slot copied from its source."""
        old_stacks = self._stacks[layer]
        new = tuple(s.new_empty((len(wanted), *s.shape[1:])) for s in old_stacks)
        for slot, expert in enumerate(wanted):
            for stack, matrix in zip(new, self._source(layer, expert, received), strict=True):
                stack[slot].copy_(matrix)
        return new
