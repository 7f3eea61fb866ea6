"""The full chaos suite (marker `chaos`) takes minutes: it runs only when asked for (`-m chaos`, or
`make chaos`, which runs `psgpo bench chaos`); the fast subset in test_chaos.py runs with `make test`."""

from __future__ import annotations

import pytest


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if "chaos" in (config.getoption("markexpr") or ""):
        return
    deselected = [item for item in items if item.get_closest_marker("chaos")]
    if deselected:
        config.hook.pytest_deselected(items=deselected)
        items[:] = [item for item in items if not item.get_closest_marker("chaos")]
