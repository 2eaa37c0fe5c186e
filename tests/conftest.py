"""Shared test setup."""

from __future__ import annotations

import pytest


@pytest.fixture(autouse=True)
def _no_debug(monkeypatch: pytest.MonkeyPatch) -> None:
    """CLI errors as users see them: one line, no traceback (PYRAMIDFLOW_DEBUG unset)."""
    monkeypatch.delenv("PYRAMIDFLOW_DEBUG", raising=False)
