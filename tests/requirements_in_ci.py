"""Tests that may skip on a developer's machine but must run in CI.

A browser test without Chromium, or the KubeRay schema tests without the schema folder, skip with a reason
on a laptop; under ``CI=true`` (what ``.ci/run`` sets) the same missing piece fails the run, so a CI
machine that lost Chromium cannot go green by skipping the tests that need it.
"""

from __future__ import annotations

import importlib
import os
from types import ModuleType

import pytest

CI_VALUES = {"1", "true", "yes"}


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in CI_VALUES


def require(condition: bool, reason: str) -> None:
    """Skip with ``reason`` when ``condition`` is false, or fail under ``CI=true``."""
    if condition:
        return
    if in_ci():
        pytest.fail(f"{reason} (CI=true: this test must run in CI, not skip)", pytrace=False)
    pytest.skip(reason)


def require_module(name: str, reason: str) -> ModuleType:
    """``importlib.import_module(name)``, or :func:`require`'s skip / CI failure when it is missing."""
    try:
        return importlib.import_module(name)
    except ImportError:
        require(False, reason)
        raise  # unreachable: require raised
