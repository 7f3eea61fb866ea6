"""Start-up: refusing an unauthenticated public bind, logging which isolation layers are on, and still
containing runs when the optional layers are unavailable (as on an older or locked-down kernel)."""

from __future__ import annotations

import logging
import os
import signal
import sys
import time

import httpx
import pytest

from services.common.errors import UserError
from services.sandbox.client import (
    AssertTests,
    RetryPolicy,
    RunRequest,
    SandboxClient,
    SandboxGrpcClient,
    SandboxRejected,
    Status,
)
from services.sandbox.config import SandboxSettings
from services.sandbox.server import check_exposure, is_loopback
from tests.sandbox.conftest import MARGIN_S, start_sandbox


def test_loopback_detection():
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("10.1.2.3") and not is_loopback("example.org")


def test_public_bind_needs_a_token_or_an_explicit_opt_out():
    with pytest.raises(UserError, match="auth token"):
        check_exposure(SandboxSettings(host="0.0.0.0"))
    check_exposure(SandboxSettings(host="0.0.0.0", auth_token="t"))
    check_exposure(SandboxSettings(host="0.0.0.0", allow_insecure_public=True))
    check_exposure(SandboxSettings(host="127.0.0.1"))


def test_cli_refuses_public_bind_without_token():
    import subprocess

    result = subprocess.run(
        [sys.executable, "-m", "services.cli", "serve", "sandbox", "--host", "0.0.0.0", "--http-port", "0"],
        capture_output=True,
        text=True,
        timeout=60,
        env={"PATH": "/usr/bin:/bin"},
    )
    assert result.returncode == 2 and "auth token" in result.stderr


def test_startup_logs_every_isolation_layer(caplog: pytest.LogCaptureFixture):
    caplog.set_level(logging.INFO, logger="services.sandbox.server")
    running = start_sandbox(workers=1)
    running.stop()
    text = caplog.text
    for layer in ("network namespace", "tmpfs quota", "separate uid", "seccomp", "landlock", "rlimits"):
        assert layer in text, layer
    assert "isolation layers active" in text


def test_runs_stay_contained_with_optional_layers_off(caplog: pytest.LogCaptureFixture):
    caplog.set_level(logging.INFO, logger="services.sandbox.server")
    running = start_sandbox(workers=1, namespaces=False, landlock=False, seccomp=False, separate_uid=False)
    try:
        assert "isolation OFF: landlock" in caplog.text and "disabled by configuration" in caplog.text
        with SandboxClient(f"http://127.0.0.1:{running.http_port}") as client:
            assert client.run("def f():\n    return 1\n", AssertTests("assert f() == 1\n")).passed
            started = time.monotonic()
            result = client.run("while True:\n    pass\n", AssertTests("assert True\n"), timeout_s=1.0)
            assert result.status is Status.TIMEOUT and time.monotonic() - started < 1.0 + MARGIN_S
            cheat = client.run("import sys\nsys.exit(0)\n", AssertTests("assert f() == 1\n"))
            assert not cheat.passed
            assert client.run("def f():\n    return 1\n", AssertTests("assert f() == 1\n")).passed
    finally:
        running.stop()


def test_a_worker_that_died_while_idle_is_replaced_before_it_gets_a_run():
    running = start_sandbox(workers=1)
    try:
        core = running.service.core  # type: ignore[union-attr]
        victim = core.pool.handles[0].pid
        os.kill(victim, signal.SIGKILL)
        time.sleep(0.2)
        with SandboxClient(f"http://127.0.0.1:{running.http_port}") as client:
            results = [
                client.run("def f():\n    return 1\n", AssertTests("assert f() == 1\n")) for _ in range(3)
            ]
        assert all(r.passed for r in results)
        assert core.pool.stats.restarts == 1 and core.pool.stats.alive == 1
        assert core.pool.handles[0].pid != victim
        metrics = httpx.get(f"http://127.0.0.1:{running.http_port}/metrics").text
        # found dead when the pool picked it (before sending the run): no run failed
        assert "sandbox_failures_total 0.0" in metrics and "sandbox_worker_restarts 1.0" in metrics
    finally:
        running.stop()


def test_cancelled_calls_give_their_worker_back():
    running = start_sandbox(workers=1)
    target = f"127.0.0.1:{running.grpc_port}"
    slow = RunRequest("import time\ntime.sleep(1.0)\n", AssertTests("assert True\n"))
    try:
        with SandboxGrpcClient(target, timeout_s=0.2, retry=RetryPolicy(attempts=1)) as impatient:
            for _ in range(3):
                with pytest.raises(SandboxRejected, match="DEADLINE_EXCEEDED"):
                    impatient.run_request(slow)
        with SandboxGrpcClient(target, timeout_s=30) as patient:
            assert patient.run("def f():\n    return 1\n", AssertTests("assert f() == 1\n")).passed
        core = running.service.core  # type: ignore[union-attr]
        assert core.pool.busy() == 0 and core.pool.free_slots() == core.pool.depth
    finally:
        running.stop()
