"""Fixtures for the chart tests: the chart rendered by Helm's own engine (helm-python-sdk)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.requirements import require_module

helm = require_module("helm_python")

ROOT = Path(__file__).resolve().parents[2]
CHART_DIR = ROOT / "charts" / "moe-ep"
RELEASE = "moe-ep"
NAMESPACE = "moe-ep-system"

Obj = dict[str, Any]
Render = Callable[..., list[Obj]]


@pytest.fixture(scope="session")
def chart() -> Iterator[Any]:
    with helm.Chart.load(CHART_DIR) as loaded:
        yield loaded


@pytest.fixture(scope="session")
def render(chart: Any) -> Render:
    """render(values, release=..., namespace=...) -> every rendered object (NOTES.txt excluded)."""

    def _render(
        values: dict[str, Any] | None = None,
        *,
        release: str = RELEASE,
        namespace: str = NAMESPACE,
    ) -> list[Obj]:
        rendered = chart.render(values or {}, name=release, namespace=namespace, is_install=True)
        objects: list[Obj] = []
        for path, text in sorted(rendered.items()):
            if path.endswith("NOTES.txt"):
                continue
            objects.extend(doc for doc in yaml.safe_load_all(text) if doc)
        return objects

    return _render
