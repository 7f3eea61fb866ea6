"""A short run of `psgpo bench load`'s driver (services/loadtest.py) against both services, as deployed
(own processes, loopback): at capacity nothing fails; beyond it the excess is shed with 429 /
RESOURCE_EXHAUSTED, fast; never a 5xx or a timeout; memory after the cool-down within the bound."""

from __future__ import annotations

from pathlib import Path

import pytest

from services.loadtest import SHED_P99_LIMIT_S, Plan, run_load

FAILURES = ("server_error", "timeout", "transport_error", "client_error", "bad_result")


@pytest.fixture(scope="module")
def report(tiny_models: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    plan = Plan(multiples=(1, 4), level_s=2.5, warmup_s=1.0, cooldown_s=1.5, request_timeout_s=10.0)
    out = tmp_path_factory.mktemp("load")
    return run_load(out, ["prm", "sandbox"], plan, model_dir=tiny_models / "prm", log=lambda _: None)


@pytest.mark.timeout(180)
@pytest.mark.parametrize("service", ["prm", "sandbox"])
def test_load_smoke(report: dict, service: str) -> None:
    result = report["services"][service]
    at_capacity, beyond = result["levels"]
    for row in result["levels"]:
        assert {kind: row[kind] for kind in FAILURES} == dict.fromkeys(FAILURES, 0), row
        assert row["ok"] > 0, row
    assert at_capacity["multiple"] == 1 and at_capacity["shed"] == 0, at_capacity
    assert beyond["multiple"] == 4 and beyond["shed"] > 0, beyond
    assert beyond["shed_p99_ms"] < 1000 * SHED_P99_LIMIT_S, beyond
    memory = result["memory"]
    assert memory["growth_mb"] <= memory["allowed_mb"], memory
    assert memory["tree_growth_mb"] <= memory["tree_allowed_mb"], memory
    assert result["recovery"]["kind"] == "ok", result["recovery"]
    assert result["exit_code"] == 0
    assert result["flags"] == []
