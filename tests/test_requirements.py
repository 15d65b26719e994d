"""The one rule for missing tools and modules: fail under CI, skip elsewhere."""

from __future__ import annotations

import pytest

from tests.requirements import require_module, require_tool


def test_under_ci_a_missing_tool_fails(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CI", "1")
    with pytest.raises(pytest.fail.Exception, match="required under CI"):
        require_tool("no-such-tool-anywhere")
    with pytest.raises(pytest.fail.Exception, match="required under CI"):
        require_module("no_such_module_anywhere")


def test_elsewhere_a_missing_tool_skips(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception):
        require_tool("no-such-tool-anywhere")
    with pytest.raises(pytest.skip.Exception):
        require_module("no_such_module_anywhere")


def test_what_is_there_is_returned() -> None:
    assert require_tool("sh").endswith("/sh")
    assert require_module("json").dumps([]) == "[]"
