"""The Redis fixtures (`redis_server`, `r`) live in tests/conftest.py; a run name for these tests."""

from __future__ import annotations

import pytest


@pytest.fixture
def run() -> str:
    return "test-run"
