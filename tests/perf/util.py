"""Helpers for the performance-model tests."""

from __future__ import annotations

from moe_operator.perf import HardwareProfile, NetworkProfile, Profile


def round_profile(gpus_per_node: int = 2) -> Profile:
    """Peak 1000 FLOP/s, HBM 100 B/s, NVLink 100 B/s, IB 10 B/s, all efficiencies 1, no latency."""
    hw = HardwareProfile("round", 1000.0, 100.0, 1e6, 1.0, 1.0, 1.0, 1.0, 1.0, 0.0)
    net = NetworkProfile(gpus_per_node, 100.0, 0.0, 10.0, 0.0)
    return Profile("round", hw, net)
