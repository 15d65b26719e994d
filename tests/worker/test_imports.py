"""Layering: the worker imports no Kubernetes client; the plan contract imports without torch."""

from __future__ import annotations

import subprocess
import sys
import textwrap

WORKER_MODULES = [
    "moe_worker.model",
    "moe_worker.dispatch",
    "moe_worker.engine",
    "moe_worker.runtime",
    "moe_worker.server",
    "moe_worker.metrics",
    "moe_worker.baseline",
    "moe_worker.bench",
    "moe_worker.main",
    "moe_worker.settings",
    "moe_worker.traffic",
    "moe_worker.gpu_check",
]


def run_python(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=120
    )


def test_worker_imports_no_kubernetes_client_and_model_no_http() -> None:
    result = run_python(
        f"""
        import importlib, sys
        import moe_worker.model, moe_worker.dispatch, moe_worker.engine
        leaked = [m for m in ("prometheus_client", "http.server", "aiohttp") if m in sys.modules]
        assert not leaked, f"model/dispatch/engine pulled in {{leaked}}"
        for name in {WORKER_MODULES!r}:
            importlib.import_module(name)
        bad = sorted(m for m in sys.modules if m.split(".")[0] in ("kubernetes", "kopf", "kmock"))
        assert not bad, bad
        """
    )
    assert result.returncode == 0, result.stderr


def test_plan_and_env_import_without_torch() -> None:
    result = run_python(
        """
        import sys
        class Block:
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in ("torch", "numpy"):
                    raise ImportError(f"blocked: {name}")
        sys.meta_path.insert(0, Block())
        import moe_worker.plan, moe_worker.env, moe_worker.settings
        plan = moe_worker.plan.round_robin_plan(2, 4, 4)
        assert "torch" not in sys.modules
        """
    )
    assert result.returncode == 0, result.stderr
