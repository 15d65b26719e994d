"""Handing a plan to the workers: the leader's (rank 0's) plan endpoint, over plain HTTP.

Safe to repeat: the leader ignores a plan whose version it already serves (409 "stale"), so a
plan that may or may not have arrived is simply sent again. The token is sent, never logged.
What the leader serves is judged by version *and* digest: a plan of the right version with other
contents (posted by someone else) is not the operator's plan.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from typing import Any

from moe_contract.group import GroupStatus, lost_document
from moe_contract.plan import Plan, PlanError, parse_plan
from moe_contract.switch import SwitchAnswer


class HandoffError(RuntimeError):
    """The leader could not be reached or refused the plan; the message says which."""


class PlanRefused(HandoffError):
    """The leader refused the plan itself (HTTP 400/422: it does not fit the model, the world,
    maxSlotsPerRank or a rank's memory): sending it again will not help; the reason says why."""


@dataclass(frozen=True)
class HandoffResult:
    applied_version: int  # the version the workers now serve
    pause_seconds: float | None  # serving pause of the switch (None when nothing switched)
    # 409: the leader serves this version or newer; only `serving()`'s digest says whose. How the
    # answer came, not what it says: results compare equal with or without it.
    stale: bool = field(default=False, compare=False)


@dataclass(frozen=True)
class Served:
    """What the leader serves: a version and the digest of its document (`Plan.digest()`)."""

    version: int
    digest: str


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


def serving(leader: str, token: str, *, timeout: float = 5.0) -> Served:
    """The plan the leader serves (it switches only once every rank has): version and digest.
    GET /v1/plan needs the control token too (the plan is the operator's business)."""
    status, document = _request(f"{leader}/v1/plan", token=token, timeout=timeout)
    version, digest = document.get("version"), document.get("digest")
    if status != 200 or not isinstance(version, int) or not isinstance(digest, str):
        raise HandoffError(f"GET {leader}/v1/plan answered {status} without a version and digest")
    return Served(version, digest)


def serving_version(leader: str, token: str, *, timeout: float = 5.0) -> int:
    """The version alone. The operator judges by `serving()` (version and digest); this stays for
    the worker's contract test (tests/worker/test_api_control.py) until it moves to `serving()`."""
    return serving(leader, token, timeout=timeout).version


def served_plan(leader: str, token: str, *, timeout: float = 5.0) -> Plan:
    """The whole plan the leader serves, its digest checked against its contents."""
    status, document = _request(f"{leader}/v1/plan", token=token, timeout=timeout)
    if status != 200:
        raise HandoffError(f"GET {leader}/v1/plan answered {status}")
    try:
        return parse_plan(document)
    except PlanError as error:
        raise HandoffError(f"GET {leader}/v1/plan: {error}") from None


def post_plan(leader: str, plan: Plan, token: str, *, timeout: float = 90.0) -> HandoffResult:
    """POST the plan; returns once every rank serves it, or raises HandoffError."""
    status, document = _request(
        f"{leader}/v1/plan",
        method="POST",
        body=plan.to_json().encode(),
        token=token,
        timeout=timeout,
    )
    answer = SwitchAnswer.from_document(document)
    if status == 200 and answer.applied:
        if (answer.digest or plan.digest()) != plan.digest():
            raise HandoffError(f"leader applied plan {plan.version} with another digest")
        version = plan.version if answer.version is None else answer.version
        return HandoffResult(version, answer.pause_seconds)
    if status == 409 and answer.version is not None:
        # The leader serves this version or a newer one already (a resend after a lost answer,
        # or someone else's plan): only `serving()`'s digest tells which.
        return HandoffResult(answer.version, None, stale=True)
    reason = answer.error or answer.reason or "no reason given"
    error = PlanRefused if status in (400, 422) else HandoffError
    raise error(f"leader refused plan {plan.version}: HTTP {status}: {reason}")


def group_status(leader: str, *, timeout: float = 2.0) -> GroupStatus | None:
    """The group's membership as the leader serves it; None when the group has none of its own
    (workers that restart whole on any rank's loss). HandoffError: no answer."""
    status, document = _request(f"{leader}/v1/group", timeout=timeout)
    if status == 404:
        return None
    found = GroupStatus.from_document(document) if status == 200 else None
    if found is None:
        raise HandoffError(f"GET {leader}/v1/group answered {status} without a membership")
    return found


def report_lost(
    leader: str, ranks: list[int], reason: str, token: str, *, timeout: float = 3.0
) -> bool:
    """Tell the leader these ranks are gone (their pod was deleted or its worker exited): it
    drops them at once. False: the group cannot take the news (no membership of its own)."""
    status, document = _request(
        f"{leader}/v1/group/lost",
        method="POST",
        body=json.dumps(lost_document(ranks, reason)).encode(),
        token=token,
        timeout=timeout,
    )
    if status == 202:
        return True
    if status == 409:
        return False
    raise HandoffError(f"POST {leader}/v1/group/lost answered {status}: {document.get('error')}")
