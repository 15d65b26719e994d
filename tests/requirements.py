"""What a test needs from the machine: under CI a missing tool or module fails, elsewhere it skips.

One helper for every suite, so CI can never pass by skipping: `.ci/run` sets CI=1 and the README's
`make test` installs every tool (hack/install-system-deps.sh) and module (the `test` extra).
"""

from __future__ import annotations

import importlib
import os
import shutil
from types import ModuleType

import pytest

INSTALL_HINT = "hack/install-system-deps.sh and `pip install -e '.[worker,test]'` install it"


def missing(what: str) -> None:
    """Fail under CI, skip elsewhere (also at module level, during collection)."""
    message = f"{what} ({INSTALL_HINT})"
    if os.environ.get("CI"):
        pytest.fail(f"required under CI: {message}", pytrace=False)
    pytest.skip(message, allow_module_level=True)


def require_tool(name: str) -> str:
    """The path of executable `name` on PATH."""
    path = shutil.which(name)
    if path is None:
        missing(f"{name} is not installed")
    assert path is not None
    return path


def require_module(name: str) -> ModuleType:
    """Module `name`, imported."""
    try:
        return importlib.import_module(name)
    except ImportError as error:
        missing(f"Python module {name} is not importable: {error}")
        raise
