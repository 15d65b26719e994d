"""Layering, checked by a tool rather than by memory (STYLE.md): what each layer may import.

Each check imports modules in a fresh interpreter and inspects `sys.modules`, so transitive
imports count too.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

PURE_CORE = [
    "moe_operator.api",
    "moe_operator.crd",
    "moe_operator.validation",
    "moe_operator.status",
    "moe_operator.manifests.children",
    "moe_operator.planning.placement",
    "moe_operator.planning.replace",
    "moe_operator.planning.gating",
    "moe_operator.planning.planners",
    "moe_operator.planning.detection",
    "moe_operator.planning.perf",
    "moe_worker.plan",
    "moe_worker.env",
]
OPERATOR = [
    "moe_operator.handlers",
    "moe_operator.main",
    "moe_operator.cli",
    "moe_operator.rebalance",
    # The local tooling (distribution moe-ep-local) neither: worker pods are separate processes.
    "moe_local.demo",
    "moe_local.nodeagent",
]


def _loaded_after_import(modules: list[str], *, full: bool = False) -> set[str]:
    code = (
        f"import importlib, json, sys\nfor m in {modules!r}: importlib.import_module(m)\n"
        "print(json.dumps(sorted(sys.modules)))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True
    )
    names = json.loads(result.stdout)
    return set(names) if full else {name.split(".")[0] for name in names}


@pytest.mark.parametrize("module", PURE_CORE)
def test_pure_core_imports_no_io_framework(module: str) -> None:
    loaded = _loaded_after_import([module])
    assert not loaded & {"kopf", "kubernetes", "aiohttp", "torch", "urllib3", "requests"}


def test_the_operator_never_imports_torch() -> None:
    assert "torch" not in _loaded_after_import(OPERATOR)


def test_the_model_imports_no_http_or_metrics_code() -> None:
    # (torch itself imports http.client, so the check names our HTTP and metrics modules.)
    loaded = _loaded_after_import(["moe_worker.model", "moe_worker.dispatch"], full=True)
    assert not loaded & {
        "prometheus_client",
        "moe_worker.server",
        "moe_worker.metrics",
        "aiohttp",
        "kubernetes",
        "kopf",
        "http.server",
    }
