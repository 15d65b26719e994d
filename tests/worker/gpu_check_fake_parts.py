"""Parts for the gpu-check runner's own test (`--device none`: no torch): one records a figure and
fails, one records and dies without a word, one records and hangs, one finishes."""

from __future__ import annotations

import os
import time
from typing import Any

GPU = TINY = None


def failing(out: Any, device: None, options: None) -> None:
    out.put("first", 1.5)
    raise ValueError("planted failure")


def dying(out: Any, device: None, options: None) -> None:
    out.put("first", 2.5)
    os._exit(7)


def hanging(out: Any, device: None, options: None) -> None:
    out.put("first", 3.5)
    time.sleep(600)


def finishing(out: Any, device: None, options: None) -> None:
    out.put("cases", "one", {"ok": True})
    out.put("ok", True)
