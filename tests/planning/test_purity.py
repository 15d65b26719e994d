"""planning/ is pure: no Kubernetes, HTTP or torch imports (checked on the source, by AST)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import moe_operator.planning

FORBIDDEN = {"kopf", "kubernetes", "aiohttp", "torch", "requests", "httpx", "prometheus_client"}
PACKAGE = Path(moe_operator.planning.__file__).parent


def imported_roots(path: Path) -> set[str]:
    roots = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            roots |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            roots.add(node.module.split(".")[0])
    return roots


@pytest.mark.parametrize("path", sorted(PACKAGE.glob("*.py")), ids=lambda path: path.name)
def test_planning_module_imports_nothing_impure(path: Path) -> None:
    assert not imported_roots(path) & FORBIDDEN


def test_the_check_sees_imports() -> None:
    assert imported_roots(Path(__file__)) >= {"ast", "pytest", "moe_operator"}
