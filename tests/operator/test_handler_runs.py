"""Every handler run: one writer per object at a time, and no error escapes to kopf.

`handlers._run` with a stand-in for the work (`_sync`) and for the API server (`patch_status`):
these pin the serialisation and the error path; tests/kmock runs the real handlers.
"""

from __future__ import annotations

import threading
from typing import Any

import kopf
import pytest
from prometheus_client import REGISTRY

from moe_operator import handlers


class StatusSink:
    def __init__(self) -> None:
        self.writes: list[dict[str, Any]] = []

    def patch_status(self, namespace: str, name: str, status: dict[str, Any]) -> dict[str, Any]:
        self.writes.append(status)
        return status


def call(memo: kopf.Memo) -> handlers.Call:
    body = kopf.Body({"metadata": {"name": "m1", "namespace": "ns", "uid": "u", "generation": 3}})
    return handlers.Call.of(body, memo, handlers.logging.getLogger("test"))


@pytest.fixture
def memo() -> kopf.Memo:
    memo = kopf.Memo()
    memo.cluster = StatusSink()
    return memo


def test_a_timer_run_skips_while_a_spec_handler_holds_the_object(
    memo: kopf.Memo, monkeypatch: pytest.MonkeyPatch
) -> None:
    inside, release = threading.Event(), threading.Event()
    active, most, runs = [0], [0], []

    def work(call: handlers.Call, base: dict[str, Any], *, control: bool) -> None:
        active[0] += 1
        most[0] = max(most[0], active[0])
        runs.append("timer" if control else "spec")
        if not control and len(runs) == 1:
            inside.set()
            release.wait(10)
        active[0] -= 1

    monkeypatch.setattr(handlers, "_sync", work)
    first = threading.Thread(target=handlers._run, args=("reconcile", call(memo), {}),
                             kwargs={"control": False})  # fmt: skip
    first.start()
    assert inside.wait(10)
    handlers._run("refresh", call(memo), {}, control=True)  # busy: skipped, not queued
    second = threading.Thread(target=handlers._run, args=("reconcile", call(memo), {}),
                              kwargs={"control": False})  # fmt: skip
    second.start()  # a spec handler waits for its turn
    release.set()
    first.join(10)
    second.join(10)
    assert runs == ["spec", "spec"] and most[0] == 1


def test_an_error_is_counted_reported_and_does_not_escape(
    memo: kopf.Memo, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(call: handlers.Call, base: dict[str, Any], *, control: bool) -> None:
        raise RuntimeError("the API server said no")

    monkeypatch.setattr(handlers, "_sync", broken)
    labels = {"handler": "refresh"}
    before = REGISTRY.get_sample_value("moe_operator_reconcile_errors_total", labels) or 0
    handlers._run("refresh", call(memo), {"conditions": []}, control=True)  # does not raise
    after = REGISTRY.get_sample_value("moe_operator_reconcile_errors_total", labels)
    assert after == before + 1
    (written,) = memo.cluster.writes
    (condition,) = written["conditions"]
    assert condition["type"] == "Reconciled" and condition["status"] == "False"
    assert "the API server said no" in condition["message"]
    assert condition["observedGeneration"] == 3

    monkeypatch.setattr(handlers, "_sync", lambda call, base, *, control: None)
    handlers._run("refresh", call(memo), {}, control=True)  # the next run starts afresh
