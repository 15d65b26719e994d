"""Handing a plan to the workers: the leader's (rank 0's) plan endpoint, over plain HTTP.

Safe to repeat: the leader ignores a plan whose version it already serves (409 "stale"), so a
plan that may or may not have arrived is simply sent again. The token is sent, never logged.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import Any

from moe_worker.plan import Plan


class HandoffError(RuntimeError):
    """The leader could not be reached or refused the plan; the message says which."""


@dataclass(frozen=True)
class HandoffResult:
    applied_version: int  # the version the workers now serve
    pause_seconds: float | None  # serving pause of the switch (None when nothing switched)


def _request(
    url: str,
    *,
    method: str = "GET",
    body: bytes | None = None,
    token: str | None = None,
    timeout: float,
) -> tuple[int, dict[str, Any]]:
    headers = {"Content-Type": "application/json"}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    request = urllib.request.Request(url, data=body, method=method, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            status, raw = response.status, response.read(1 << 20)
    except urllib.error.HTTPError as error:
        status, raw = error.code, error.read(1 << 20)
    except Exception as error:  # connection refused, timeout, DNS: all mean "not now"
        raise HandoffError(f"{method} {url}: {type(error).__name__}: {str(error)[:120]}") from None
    try:
        document = json.loads(raw or b"{}")
    except ValueError:
        document = {}
    return status, document if isinstance(document, dict) else {}


def serving_version(leader: str, *, timeout: float = 5.0) -> int:
    """The plan version the leader serves (it switches only once every rank has)."""
    status, document = _request(f"{leader}/v1/plan", timeout=timeout)
    if status != 200 or not isinstance(document.get("version"), int):
        raise HandoffError(f"GET {leader}/v1/plan answered {status}")
    return int(document["version"])


def post_plan(leader: str, plan: Plan, token: str, *, timeout: float = 90.0) -> HandoffResult:
    """POST the plan; returns once every rank serves it, or raises HandoffError."""
    status, document = _request(
        f"{leader}/v1/plan",
        method="POST",
        body=plan.to_json().encode(),
        token=token,
        timeout=timeout,
    )
    if status == 200 and document.get("applied"):
        return HandoffResult(
            int(document.get("version", plan.version)), document.get("pauseSeconds")
        )
    if status == 409 and int(document.get("version", 0)) >= plan.version:
        return HandoffResult(int(document["version"]), None)  # already serving it (resend)
    reason = document.get("error") or document.get("reason") or "no reason given"
    raise HandoffError(f"leader refused plan {plan.version}: HTTP {status}: {reason}")
