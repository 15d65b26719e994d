"""Spreading an expert's replicas over pods, for the hierarchical (network-aware) placement.

The worker keeps a token in its pod up to the share of the expert's replicas the pod holds
(`planning.arrays` has the model): of expert e's tokens, sum_p max(0, 1 / P - n_p / c) leave
their pod, least when the c replicas are spread evenly, one per pod while c <= P. Two in one pod
while another has none send tokens across for nothing. So a placement aware of pods keeps at
most quota(e) = ceil(replicas(e) / P) replicas of e in any pod.

Legend: B rows, E experts, P pods, R ranks.
"""

from __future__ import annotations

import numpy as np

from moe_operator.planning.arrays import rows


class Spread:
    """Replicas of each expert per pod [B, E, P] against their quota [B, E], kept up to date."""

    def __init__(self, counts_BE: np.ndarray, ranks: int, ranks_per_pod: int) -> None:
        self.pods = ranks // ranks_per_pod
        self.pod_of_rank = np.arange(ranks) // ranks_per_pod
        self.quota = -(-counts_BE // self.pods)  # ceil
        self.held = np.zeros((*counts_BE.shape, self.pods), dtype=np.int64)

    @classmethod
    def of(cls, slots_BRS: np.ndarray, counts_BE: np.ndarray, ranks_per_pod: int) -> Spread:
        """The spread of a whole placement."""
        spread = cls(counts_BE, slots_BRS.shape[1], ranks_per_pod)
        b, r, s = slots_BRS.shape
        row = np.repeat(rows(b), r * s)
        rank = np.tile(np.repeat(np.arange(r), s), b)
        np.add.at(spread.held, (row, slots_BRS.ravel(), spread.pod_of_rank[rank]), 1)
        return spread

    def room(self, row: np.ndarray, expert: np.ndarray, rank: np.ndarray) -> np.ndarray:
        """Whether `rank`'s pod may take one more replica of `expert` (arrays broadcast)."""
        pod = self.pod_of_rank[rank]
        return self.held[row, expert, pod] < self.quota[row, expert]

    def reorder(self, order: np.ndarray) -> None:
        """Rows taken in `order` from now on."""
        self.quota, self.held = self.quota[order], self.held[order]

    def room_by_rank(self, row: np.ndarray, expert: np.ndarray) -> np.ndarray:
        """[B, R]: whether each rank's pod may take one more replica of `expert` [B]."""
        open_pods = self.held[row, expert] < self.quota[row, expert][:, None]  # [B, P]
        return open_pods[:, self.pod_of_rank]

    def add(self, row: np.ndarray, expert: np.ndarray, rank: np.ndarray, step: int = 1) -> None:
        """One replica of `expert` more (step -1: fewer) in `rank`'s pod, one per row."""
        self.held[row, expert, self.pod_of_rank[rank]] += step
