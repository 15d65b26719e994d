"""A part's figures as they come: every `put` rewrites the part's JSON file at once (write, then
rename), so a part stopped at its time budget, or killed by a CUDA fault, still leaves what it
measured before."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


class Recorder:
    """Nested figures of one part (`put("cases", name, figures)`), mirrored to `path`."""

    def __init__(self, path: Path | None = None) -> None:
        self.path = path
        self.data: dict[str, Any] = {}

    def put(self, *keys_then_value: Any) -> None:
        *keys, value = keys_then_value
        if not keys:
            raise ValueError("put needs at least one key before the value")
        node = self.data
        for key in keys[:-1]:
            node = node.setdefault(key, {})
        node[keys[-1]] = value
        self.flush()
        if self.path is not None:  # a part's own process: its progress goes to the log
            print(
                f"   {'.'.join(map(str, keys))} = {json.dumps(value, default=str)[:300]}",
                flush=True,
            )

    def flush(self) -> None:
        if self.path is None:
            return
        partial = self.path.with_suffix(".tmp")
        partial.write_text(json.dumps(self.data, indent=1, default=str))
        os.replace(partial, self.path)
