"""The answer to a plan switch: what the leader's POST /v1/plan returns, and how the operator
reads it.

Part of the operator -> worker contract (with `plan`, `shape` and `env`). The worker builds one
`SwitchAnswer` wherever a switch ends (applied, stale, refused, abandoned, timed out) and the
control app sends `to_document()` with `http_status`; the operator's `handoff` decodes the body
with `from_document`. docs/worker.md's control-app table is the wire format:

    200 {"applied": true, "version", "digest", "pauseSeconds", "mode"[, "transferSeconds"]}
    409 {"applied": false, "reason": "stale", "version": current}
    422 {"applied": false, "reason": "does not fit", "error", "version"}
    503 {"applied": false, "reason": "not ready" | "transfer failed" | "group failed", ...}
    504 {"applied": false, "reason": "timeout"[, "error", "version"]}

Keys whose value is unknown are left out. Imports nothing beyond the standard library and `plan`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from moe_contract.plan import Plan

STALE = "stale"
"""The version is not newer than the one served (equal: already applied)."""
NOT_READY = "not ready"
TIMEOUT = "timeout"
"""Not every rank switched within the switch timeout; the old plan serves."""
DOES_NOT_FIT = "does not fit"
"""A rank refused the plan before moving anything (its memory): sending it again will not help."""
TRANSFER_FAILED = "transfer failed"
"""Moving experts failed on some rank; the old plan serves and a later try may succeed."""
GROUP_FAILED = "group failed"
"""The serving loop failed (a rank died): the group restarts as a whole on the plan of record."""

BACKGROUND = "background"
"""Experts moved while the old plan served; the pause is the flip."""
BLOCKING = "blocking"
"""Serving stopped while experts moved; the pause is the whole switch."""

_STATUS = {STALE: 409, DOES_NOT_FIT: 422, TIMEOUT: 504}
"""The HTTP status of a switch not applied, by reason; any other reason is 503."""


@dataclass(frozen=True)
class SwitchAnswer:
    applied: bool
    reason: str | None = None
    """Why it was not applied (one of the reasons above); None when applied."""
    version: int | None = None
    """Applied: the version now served; stale or abandoned: the version still served."""
    digest: str | None = None
    """Applied: the digest of the plan served (`Plan.digest()`)."""
    pause_seconds: float | None = None
    """Applied: how long serving paused."""
    mode: str | None = None
    """Applied: BACKGROUND or BLOCKING."""
    transfer_seconds: float | None = None
    """Applied in the background: from posting the expert messages to the last one landed."""
    error: str | None = None
    """Not applied: what failed, naming the rank."""

    @classmethod
    def switched(
        cls, plan: Plan, pause_seconds: float, mode: str, transfer_seconds: float | None = None
    ) -> SwitchAnswer:
        """Every rank serves `plan` now."""
        return cls(
            applied=True,
            version=plan.version,
            digest=plan.digest(),
            pause_seconds=pause_seconds,
            mode=mode,
            transfer_seconds=transfer_seconds,
        )

    @classmethod
    def refused(
        cls, reason: str, *, version: int | None = None, error: str | None = None
    ) -> SwitchAnswer:
        """Not applied, for `reason`; `version` is the one still served, when known."""
        return cls(applied=False, reason=reason, version=version, error=error)

    @property
    def http_status(self) -> int:
        """200 applied; 409 stale; 422 a rank cannot hold the plan (its memory; the error says
        how much); 504 the switch timed out; 503 otherwise (not ready, a transfer failed, the
        group failed: the old plan serves, try again later)."""
        if self.applied:
            return 200
        return _STATUS.get(self.reason or "", 503)

    def to_document(self) -> dict[str, Any]:
        """The JSON body, camelCase, without the keys whose value is unknown."""
        document = {
            "applied": self.applied,
            "reason": self.reason,
            "version": self.version,
            "digest": self.digest,
            "pauseSeconds": self.pause_seconds,
            "mode": self.mode,
            "transferSeconds": self.transfer_seconds,
            "error": self.error,
        }
        return {key: value for key, value in document.items() if value is not None}

    @classmethod
    def from_document(cls, document: Mapping[str, Any]) -> SwitchAnswer:
        """Read an answer, leniently: a key missing or of the wrong type is unknown (None), so
        any body (an error document `{"error", "field"}` too) decodes."""
        return cls(
            applied=document.get("applied") is True,
            reason=_of(document, "reason", str),
            version=_of(document, "version", int),
            digest=_of(document, "digest", str),
            pause_seconds=_number(document, "pauseSeconds"),
            mode=_of(document, "mode", str),
            transfer_seconds=_number(document, "transferSeconds"),
            error=_of(document, "error", str),
        )


def _of(document: Mapping[str, Any], key: str, kind: type) -> Any:
    value = document.get(key)
    if isinstance(value, bool) and kind is not bool:  # JSON true is no version
        return None
    return value if isinstance(value, kind) else None


def _number(document: Mapping[str, Any], key: str) -> float | None:
    value = document.get(key)
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value)
