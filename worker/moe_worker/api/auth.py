"""Bearer tokens: the control token (one per deployment) and the OpenAI API keys (any number).

Both are files mounted from Secrets, read on every request so a rotated Secret takes effect
without a restart (they are a few bytes; the page cache serves them). Comparisons are
constant-time. A file that is named but missing or empty refuses every request: a mount that
failed must not silently open the API. Tokens never appear in logs or error messages.
"""

from __future__ import annotations

import hmac
from pathlib import Path

from starlette.requests import Request

from moe_worker.api.errors import ApiError

BEARER = {"WWW-Authenticate": "Bearer"}


def read_secrets(path: str) -> list[bytes]:
    """Non-empty lines of `path` (one key per line); [] when it cannot be read."""
    try:
        lines = Path(path).read_bytes().splitlines()
    except OSError:
        return []
    return [line.strip() for line in lines if line.strip()]


def bearer(request: Request) -> bytes | None:
    scheme, _, given = request.headers.get("authorization", "").partition(" ")
    return given.strip().encode() if scheme.lower() == "bearer" and given.strip() else None


def matches(given: bytes | None, accepted: list[bytes]) -> bool:
    if given is None:
        return False
    # Compare against every key, not up to the first match: the time says nothing about which.
    found = False
    for key in accepted:
        found |= hmac.compare_digest(given, key)
    return found


def require(request: Request, path: str | None, *, what: str, optional: bool) -> None:
    """Raise a 401 unless the request bears a token listed in the file at `path`.

    `optional`: no file named means no authentication (the OpenAI API keys); otherwise a missing
    file refuses everything (the control token).
    """
    if path is None:
        if optional:
            return
        raise ApiError(401, f"no {what} configured on this worker", headers=BEARER)
    accepted = read_secrets(path)
    if not accepted:
        raise ApiError(401, f"no {what} configured on this worker", headers=BEARER)
    given = bearer(request)
    if given is None:
        raise ApiError(401, f"missing {what}: send Authorization: Bearer <{what}>", headers=BEARER)
    if not matches(given, accepted):
        raise ApiError(401, f"wrong {what}", headers=BEARER)
