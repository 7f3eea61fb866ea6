"""The typed clients: HTTP and gRPC, sync and async, auth, bounded retries, never a made-up result."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Iterator

import pytest

from services.common.runner import Running
from services.sandbox.client import (
    AssertTests,
    AsyncSandboxClient,
    AsyncSandboxGrpcClient,
    CallCase,
    CallTests,
    RetryPolicy,
    RunRequest,
    SandboxClient,
    SandboxError,
    SandboxGrpcClient,
    SandboxRejected,
    Status,
)
from tests.sandbox.conftest import Sandbox, start_sandbox

TOKEN = "s3cret-token"
CODE = "def add(a, b):\n    return a + b\n"
REQUESTS = [
    RunRequest(CODE, AssertTests("assert add(1, 2) == 3\n")),
    RunRequest(CODE, CallTests("add", (CallCase([1, 2], 3), CallCase([1.5, 1], 2.5)))),
    RunRequest("def add(a, b):\n    return 0\n", AssertTests("assert add(1, 2) == 3\n")),
]
FAST = RetryPolicy(attempts=3, backoff_s=0.01, max_backoff_s=0.02)


def _dead_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_sync_http_client(sandbox: Sandbox):
    result = sandbox.client.run(CODE, AssertTests("assert add(1, 2) == 3\n"))
    assert result.passed and result.status is Status.PASSED
    assert [r.passed for r in sandbox.client.run_batch(REQUESTS)] == [True, True, False]
    assert sandbox.client.ready() and sandbox.client.info()["workers"] == 2
    with pytest.raises(SandboxRejected) as err:
        sandbox.client.run(CODE, AssertTests("assert True"), timeout_s=-1)
    assert err.value.status == 422 and "timeout_s" in err.value.message


def test_async_http_client(sandbox: Sandbox):
    async def main() -> list[bool]:
        async with AsyncSandboxClient(sandbox.http_url) as client:
            singles = await asyncio.gather(*(client.run_request(r) for r in REQUESTS))
            batch = await client.run_batch(REQUESTS)
            assert [r.passed for r in batch] == [r.passed for r in singles]
            return [r.passed for r in singles]

    assert asyncio.run(main()) == [True, True, False]


def test_grpc_clients(sandbox: Sandbox):
    with SandboxGrpcClient(sandbox.grpc_target) as client:
        assert [r.passed for r in client.run_batch(REQUESTS)] == [True, True, False]
        assert client.run_request(REQUESTS[1]).tests_total == 2
        with pytest.raises(SandboxRejected) as err:
            client.run(CODE, AssertTests("assert True"), memory_mb=-3)
        assert err.value.status == "INVALID_ARGUMENT"

    async def main() -> list[bool]:
        async with AsyncSandboxGrpcClient(sandbox.grpc_target) as client:
            results = await asyncio.gather(*(client.run_request(r) for r in REQUESTS))
            return [r.passed for r in results]

    assert asyncio.run(main()) == [True, True, False]


def test_unreachable_service_raises_after_bounded_retries():
    port = _dead_port()
    started = time.monotonic()
    with SandboxClient(f"http://127.0.0.1:{port}", retry=FAST) as client:
        with pytest.raises(SandboxError, match="after 3 attempts"):
            client.run(CODE, AssertTests("assert True"))
        assert client.failures == 1
    with SandboxGrpcClient(f"127.0.0.1:{port}", retry=FAST, timeout_s=2.0) as grpc_client:
        with pytest.raises(SandboxError, match="UNAVAILABLE"):
            grpc_client.run(CODE, AssertTests("assert True"))
    assert time.monotonic() - started < 10


@pytest.fixture(scope="module")
def authed() -> Iterator[Running]:
    running = start_sandbox(workers=1, auth_token=TOKEN)
    yield running
    running.stop()


def test_auth_token(authed: Running):
    url, target = f"http://127.0.0.1:{authed.http_port}", f"127.0.0.1:{authed.grpc_port}"
    with SandboxClient(url, retry=FAST) as anonymous, pytest.raises(SandboxRejected) as err:
        anonymous.run_request(REQUESTS[0])
    assert err.value.status == 401
    with SandboxClient(url, token=TOKEN) as client:
        assert client.run_request(REQUESTS[0]).passed
    with SandboxGrpcClient(target, retry=FAST) as anonymous_grpc, pytest.raises(SandboxRejected) as err:
        anonymous_grpc.run_request(REQUESTS[0])
    assert err.value.status == "UNAUTHENTICATED"
    with SandboxGrpcClient(target, token=TOKEN) as grpc_client:
        assert grpc_client.run_request(REQUESTS[0]).passed


def test_overload_is_retried_then_reported():
    running = start_sandbox(workers=1, max_queue=1)
    url = f"http://127.0.0.1:{running.http_port}"
    slow = RunRequest("import time\ntime.sleep(0.3)\n", AssertTests("assert True\n"))
    try:
        with SandboxClient(url, retry=RetryPolicy(attempts=2, backoff_s=0.01)) as client:
            with pytest.raises(SandboxError, match="429"):
                client.run_batch([slow] * 3)  # always over the queue: retried, then an error
            assert client.failures == 1
            assert all(r.passed for r in client.run_batch([slow]))
    finally:
        running.stop()
