"""The demo's last act: one worker rank killed (SIGKILL) under the clients' load, after the
rebalance. The survivors keep serving without it (no whole-group restart), its container comes
back and rejoins; the summary says how long serving paused, how many requests failed (none),
whether any survivor restarted (none), whether any answer changed (none: greedy and seeded
answers equal those before the loss), and when the whole group served again.
"""

from __future__ import annotations

import itertools
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from moe_local import install
from moe_local.load import Completion, LoadGenerator


@dataclass(frozen=True)
class LossFigures:
    victim: str
    resumed_s: float | None
    """From the kill to the end of the serving pause it caused: the first answer after the
    longest gap between two answers around it."""
    failed: int
    answered: int
    """Requests answered from the kill on."""
    changed: int
    """Answers after the kill that differ from the same prompt's answer before it."""
    survivors_restarted: int
    whole_again_s: float | None
    """From the kill to every rank serving again (the victim back, its experts in)."""
    epoch: int | None

    def lines(self) -> list[str]:
        resumed = "not seen" if self.resumed_s is None else f"{self.resumed_s:.1f}s after"
        whole = "not within the wait" if self.whole_again_s is None else (
            f"{self.whole_again_s:.0f}s after (epoch {self.epoch})"
        )  # fmt: skip
        return [
            f"  rank lost (kill -9 of {self.victim}) serving resumed {resumed}",
            f"    requests failed         {self.failed} of {self.answered} answered since",
            f"    answers changed         {self.changed}",
            f"    survivors restarted     {self.survivors_restarted}",
            f"    whole group again       {whole}",
        ]


def _workers(kubeconfig: Path, namespace: str, name: str) -> dict[str, dict[str, Any]]:
    found = install.get_json(
        kubeconfig, "pods", "-n", namespace, "-l", f"moe-ep.io/deployment={name}"
    ) or {"items": []}
    out = {}
    for pod in found["items"]:
        container = ((pod.get("status") or {}).get("containerStatuses") or [{}])[0]
        cid = container.get("containerID") or ""
        out[pod["metadata"]["name"]] = {
            "pid": int(cid.removeprefix("local://")) if cid.startswith("local://") else None,
            "restarts": int(container.get("restartCount") or 0),
        }
    return out


def lose_a_rank(
    kubeconfig: Path,
    namespace: str,
    name: str,
    load: LoadGenerator,
    ordinal: int,
    wait_s: float = 120.0,
) -> LossFigures:
    """Kill pod `ordinal`'s worker (a non-leader) and follow the group until it is whole
    again or `wait_s` passed."""
    before = _workers(kubeconfig, namespace, name)
    victim = f"{name}-{ordinal}"
    pid = before[victim]["pid"]
    killed = time.time()
    if pid is not None:
        os.kill(pid, signal.SIGKILL)
    print(f"  killed the worker of {victim} (pid {pid}) under load", flush=True)
    whole, epoch = None, None
    while time.time() - killed < wait_s:
        status = (install.get_json(kubeconfig, "moed", name, "-n", namespace) or {}).get(
            "status"
        ) or {}
        membership = status.get("membership") or {}
        ranks = membership.get("ranks")
        full = ranks and len(membership.get("liveRanks") or []) == ranks
        if full and membership.get("state") == "Serving" and membership.get("epoch", 0) > 0:
            whole, epoch = time.time() - killed, membership.get("epoch")
            break
        time.sleep(1)
    time.sleep(2)  # a few answers on the whole group
    after = _workers(kubeconfig, namespace, name)
    restarted = sum(
        after[pod]["restarts"] - info["restarts"] + (after[pod]["pid"] != info["pid"])
        for pod, info in before.items()
        if pod != victim and pod in after
    )
    return _figures(victim, load.results[:], killed, restarted, whole, epoch)


def _figures(
    victim: str,
    results: list[Completion],
    killed: float,
    restarted: int,
    whole: float | None,
    epoch: int | None,
) -> LossFigures:
    since = [done for done in results if done.ended >= killed]
    ends = sorted(done.ended for done in results if done.ok and done.ended > killed - 5)
    gaps = [(b - a, b) for a, b in itertools.pairwise(ends) if b > killed]
    reference = {done.index: done.tokens for done in results if done.ended < killed and done.ok}
    changed = sum(
        1 for done in since if done.ok and done.index in reference
        and done.tokens != reference[done.index]
    )  # fmt: skip
    return LossFigures(
        victim=victim,
        resumed_s=max(gaps)[1] - killed if gaps else None,
        failed=sum(not done.ok for done in since),
        answered=len(since),
        changed=changed,
        survivors_restarted=restarted,
        whole_again_s=whole,
        epoch=epoch,
    )
