"""Real PRM and sandbox services (HTTP + gRPC on free loopback ports, in this process) for the fuzz
tests, with tight limits so that hostile input is cheap; the hypothesis settings every fuzz test uses
(derandomized: CI sees the same examples every run); and the "still serving" checks."""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from hypothesis import HealthCheck, settings

from services.common.runner import Running
from tests.integration.conftest import start_prm
from tests.sandbox.conftest import start_sandbox

SCALE = float(os.environ.get("PSGPO_FUZZ_SCALE", "1"))  # more examples for a longer local run
TIMEOUT_S = 15.0  # no answer within this is a hang
GOOD_SCORE = {"items": [{"prompt": "def f():\n", "response": "    return 1"}]}
GOOD_RUN = {"code": "def f():\n    return 1\n", "tests": {"kind": "assert", "code": "assert f() == 1\n"}}


def fuzz_settings(examples: int) -> settings:
    return settings(
        max_examples=max(1, int(examples * SCALE)),
        deadline=None,
        derandomize=True,
        database=None,
        print_blob=False,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much,
                               HealthCheck.function_scoped_fixture],
    )  # fmt: skip


@dataclass(frozen=True)
class Target:
    name: str
    running: Running
    good_path: str
    good_body: dict

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.running.http_port}"

    @property
    def grpc_target(self) -> str:
        return f"127.0.0.1:{self.running.grpc_port}"

    def assert_serving(self) -> None:
        """A good request still gets a good answer, in time."""
        resp = httpx.post(self.http_url + self.good_path, json=self.good_body, timeout=TIMEOUT_S)
        assert resp.status_code == 200, resp.text
        if self.name == "sandbox":
            assert resp.json()["passed"] is True, resp.text


@pytest.fixture(scope="session")
def prm_target(tiny_models: Path) -> Iterator[Target]:
    running = start_prm(
        tiny_models / "prm", max_items_per_request=8, max_request_bytes=256 * 1024, max_length=256
    )
    yield Target("prm", running, "/v1/score", GOOD_SCORE)
    running.stop()


@pytest.fixture(scope="session")
def sandbox_target() -> Iterator[Target]:
    running = start_sandbox(
        workers=2,
        default_timeout_s=2.0,
        max_timeout_s=2.0,
        max_request_bytes=256 * 1024,
        max_batch=8,
        max_cases=16,
    )
    yield Target("sandbox", running, "/v1/run", GOOD_RUN)
    running.stop()


@pytest.fixture(params=["prm", "sandbox"])
def target(request: pytest.FixtureRequest) -> Target:
    return request.getfixturevalue(f"{request.param}_target")
