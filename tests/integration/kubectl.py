"""kubectl bound to one kubeconfig, for integration tests (a thin face on `moe_local.install`)."""

from __future__ import annotations

import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

from moe_local import install


class Kubectl:
    def __init__(self, kubeconfig: str) -> None:
        self.kubeconfig = Path(kubeconfig)

    def run(
        self, *args: str, stdin: str | None = None, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        try:
            return install.kubectl(self.kubeconfig, *args, stdin=stdin, check=check)
        except RuntimeError as error:
            raise AssertionError(str(error)) from None

    def get(self, *args: str) -> dict[str, Any] | None:
        return install.get_json(self.kubeconfig, *args)


def wait_for(predicate: Callable[[], Any], timeout: float = 60.0, what: str = "condition") -> Any:
    try:
        return install.wait_until(predicate, timeout, what, interval=0.5)
    except TimeoutError as error:
        raise AssertionError(str(error)) from None
