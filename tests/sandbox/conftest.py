"""A real sandbox service (HTTP + gRPC on free ports, real worker processes) shared by the sandbox tests,
and the checks every hostile run must pass: nothing outlives it, the service keeps serving."""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from services.common.runner import Running, start_in_thread
from services.sandbox.client import AssertTests, RunResult, SandboxClient, TestSpec
from services.sandbox.config import SandboxSettings
from services.sandbox.core import SandboxCore
from services.sandbox.server import make_factory
from services.sandbox.uids import processes_of_uid

# Put in the service's own environment before it starts: no run may ever see it.
SECRET = f"psgpo-sandbox-secret-{uuid.uuid4().hex}"
MARGIN_S = 1.5  # a contained run returns within its timeout plus this


def start_sandbox(**overrides: object) -> Running:
    settings = SandboxSettings(host="127.0.0.1", http_port=0, grpc_port=0, **overrides)
    return start_in_thread(make_factory(settings))


@dataclass
class Sandbox:
    running: Running
    client: SandboxClient

    @property
    def core(self) -> SandboxCore:
        service = self.running.service
        assert service is not None
        return service.core  # type: ignore[attr-defined]

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.running.http_port}"

    @property
    def grpc_target(self) -> str:
        return f"127.0.0.1:{self.running.grpc_port}"

    def layer(self, name: str) -> bool:
        return any(layer.name == name and layer.active for layer in self.core.pool.layers)

    def run(
        self, code: str, tests: TestSpec | None = None, timeout_s: float = 5.0, memory_mb: int | None = None
    ) -> RunResult:
        return self.client.run(code, tests or AssertTests("assert True\n"), timeout_s, memory_mb)

    def worker_pids(self) -> list[int]:
        return sorted(handle.pid for handle in self.core.pool.handles.values())

    def assert_clean(self) -> None:
        """No process of any run slot is alive, every run dir is empty (seen inside the worker's own
        mount namespace through /proc/PID/root)."""
        for handle in self.core.pool.handles.values():
            if handle.uid is not None:
                deadline = time.monotonic() + 1.0
                while processes_of_uid(handle.uid) and time.monotonic() < deadline:
                    time.sleep(0.02)  # a SIGKILLed process may take a moment to be torn down
                assert processes_of_uid(handle.uid) == [], f"processes of uid {handle.uid} survived"
            run_dir = f"/proc/{handle.pid}/root{self.core.pool.worker_config(handle.slot).root}/run"
            assert os.listdir(run_dir) == [], f"files left in {run_dir}"

    def assert_serving(self) -> None:
        result = self.run("def f(x):\n    return x + 1\n", AssertTests("assert f(1) == 2\n"))
        assert result.passed, result


@pytest.fixture(scope="session")
def sandbox() -> Iterator[Sandbox]:
    os.environ["PSGPO_SANDBOX_TEST_SECRET"] = SECRET
    running = start_sandbox(workers=2, max_timeout_s=30.0)
    client = SandboxClient(f"http://127.0.0.1:{running.http_port}", timeout_s=120.0)
    yield Sandbox(running, client)
    client.close()
    running.stop()
