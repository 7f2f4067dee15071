"""``tests.requirements_in_ci``: a missing requirement skips on a laptop and fails under ``CI=true``."""

from __future__ import annotations

import json
from collections.abc import Callable

import pytest

from tests.requirements_in_ci import require, require_module

pytestmark = pytest.mark.unit


def outcome(call: Callable[[], object]) -> BaseException:
    """What ``call`` raised; a skip is caught too, so that a skip where a failure belongs fails the test."""
    with pytest.raises(BaseException) as info:
        call()
    return info.value


def test_a_missing_requirement_skips_outside_ci(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CI", raising=False)
    skipped = outcome(lambda: require(False, "no Chromium at /nowhere"))
    assert type(skipped) is pytest.skip.Exception and "no Chromium at /nowhere" in str(skipped)
    skipped = outcome(lambda: require_module("visuray_no_such_module", "visuray_no_such_module is missing"))
    assert type(skipped) is pytest.skip.Exception and "is missing" in str(skipped)


@pytest.mark.parametrize("value", ["true", "1", "TRUE"])
def test_a_missing_requirement_fails_in_ci(monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    monkeypatch.setenv("CI", value)
    failed = outcome(lambda: require(False, "no Chromium at /nowhere"))
    assert type(failed) is pytest.fail.Exception
    assert "no Chromium at /nowhere (CI=true: this test must run in CI" in str(failed)
    failed = outcome(lambda: require_module("visuray_no_such_module", "visuray_no_such_module is missing"))
    assert type(failed) is pytest.fail.Exception and "is missing" in str(failed)


def test_a_met_requirement_passes_in_and_out_of_ci(monkeypatch: pytest.MonkeyPatch) -> None:
    for value in ("true", "false"):
        monkeypatch.setenv("CI", value)
        require(True, "never shown")
        assert require_module("json", "never shown") is json
