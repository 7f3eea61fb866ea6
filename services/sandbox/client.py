"""Typed clients for the sandbox service, for the rollout workers, the trainer and the labeller.

    with SandboxClient("http://127.0.0.1:8002") as sandbox:
        result = sandbox.run(code, HumanEvalTests(test, "add"))
        results = sandbox.run_batch([RunRequest(code, AssertTests(asserts)) for code in samples])

HTTP (httpx) and gRPC, each sync and async, with the same methods. Overload (429 / RESOURCE_EXHAUSTED)
and transport or 5xx failures are retried with exponential backoff a bounded number of times; after
that the call raises SandboxError, never returns a made-up result. A request the server refuses
(other 4xx, INVALID_ARGUMENT) raises SandboxRejected at once. Importing this module loads neither
the service nor any model library.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import grpc
import httpx

from psgpo.v1 import sandbox_pb2 as pb
from psgpo.v1 import sandbox_pb2_grpc
from services.common.channels import TlsOption, make_aio_channel, make_channel
from services.sandbox.convert import request_to_pb, result_from_pb
from services.sandbox.model import (
    AssertTests,
    CallCase,
    CallTests,
    HumanEvalTests,
    RunRequest,
    RunResult,
    Status,
    StdioCase,
    StdioTests,
    TestSpec,
)

__all__ = [
    "AssertTests",
    "AsyncSandboxClient",
    "AsyncSandboxGrpcClient",
    "CallCase",
    "CallTests",
    "HumanEvalTests",
    "RetryPolicy",
    "RunRequest",
    "RunResult",
    "SandboxClient",
    "SandboxError",
    "SandboxGrpcClient",
    "SandboxRejected",
    "Status",
    "StdioCase",
    "StdioTests",
]

RETRY_HTTP = frozenset({429, 502, 503, 504})
RETRY_GRPC = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED})
# round_robin: behind a headless Service (several sandbox pods), spread calls over every address.
GRPC_OPTIONS = [
    ("grpc.max_send_message_length", 256 << 20),
    ("grpc.max_receive_message_length", 256 << 20),
    ("grpc.lb_policy_name", "round_robin"),
]


class SandboxError(Exception):
    """No verdict: the service was unreachable, overloaded or failing for longer than the retries."""


class SandboxRejected(SandboxError):
    """The service refused the request (bad input, too large, unauthorised); retrying will not help."""

    def __init__(self, status: int | str, message: str) -> None:
        super().__init__(f"{status}: {message}")
        self.status = status
        self.message = message


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    attempts: int = 5
    backoff_s: float = 0.1
    max_backoff_s: float = 5.0

    def delay(self, attempt: int) -> float:
        base = min(self.max_backoff_s, self.backoff_s * 2**attempt)
        return base * (0.5 + random.random() / 2)


def _request(code: str, tests: TestSpec, timeout_s: float | None, memory_mb: int | None) -> RunRequest:
    return RunRequest(code, tests, timeout_s, memory_mb)


def _error_message(response: httpx.Response) -> str:
    try:
        body = response.json()
    except ValueError:
        return response.text[:500]
    return str(body.get("error", body)) if isinstance(body, dict) else str(body)[:500]


def _headers(token: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"} if token else {}


# ---------------------------------------------------------------------------------------------- HTTP


class SandboxClient:
    """Synchronous HTTP client (thread-safe: httpx.Client is)."""

    def __init__(
        self,
        base_url: str = "http://127.0.0.1:8002",
        token: str | None = None,
        timeout_s: float = 600.0,
        retry: RetryPolicy | None = None,
    ) -> None:
        self.retry = retry or RetryPolicy()
        self.failures = 0  # calls that ended in SandboxError: callers export it as a metric
        self._http = httpx.Client(base_url=base_url, headers=_headers(token), timeout=timeout_s)

    def run(
        self, code: str, tests: TestSpec, timeout_s: float | None = None, memory_mb: int | None = None
    ) -> RunResult:
        return self.run_request(_request(code, tests, timeout_s, memory_mb))

    def run_request(self, request: RunRequest) -> RunResult:
        return RunResult.from_dict(self._post("/v1/run", request.to_dict()))

    def run_batch(self, requests: Sequence[RunRequest]) -> list[RunResult]:
        body = self._post("/v1/run/batch", {"requests": [r.to_dict() for r in requests]})
        return [RunResult.from_dict(r) for r in body["results"]]

    def info(self) -> dict[str, Any]:
        """Workers, isolation layers and limits of the service."""
        try:
            response = self._http.get("/v1/info")
        except httpx.TransportError as exc:
            raise SandboxError(f"sandbox unreachable: {exc}") from None
        if response.status_code != 200:
            raise SandboxRejected(response.status_code, _error_message(response))
        return response.json()

    def ready(self) -> bool:
        try:
            return self._http.get("/readyz").status_code == 200
        except httpx.TransportError:
            return False

    def _post(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        last = ""
        for attempt in range(self.retry.attempts):
            if attempt:
                time.sleep(self.retry.delay(attempt - 1))
            try:
                response = self._http.post(path, json=body)
            except httpx.TransportError as exc:
                last = f"{type(exc).__name__}: {exc}"
                continue
            if response.status_code == 200:
                return response.json()
            if response.status_code not in RETRY_HTTP:
                raise SandboxRejected(response.status_code, _error_message(response))
            last = f"HTTP {response.status_code}: {_error_message(response)}"
        self.failures += 1
        raise SandboxError(f"sandbox call {path} failed after {self.retry.attempts} attempts: {last}")

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> SandboxClient:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()


class AsyncSandboxClient:
    """asyncio HTTP client; one instance can carry many concurrent calls."""

    def __init__(
        self,
        base_url: str = "http://127.0.0.1:8002",
        token: str | None = None,
        timeout_s: float = 600.0,
        retry: RetryPolicy | None = None,
        max_connections: int = 64,
    ) -> None:
        self.retry = retry or RetryPolicy()
        self.failures = 0
        limits = httpx.Limits(max_connections=max_connections, max_keepalive_connections=max_connections)
        self._http = httpx.AsyncClient(
            base_url=base_url, headers=_headers(token), timeout=timeout_s, limits=limits
        )

    async def run(
        self, code: str, tests: TestSpec, timeout_s: float | None = None, memory_mb: int | None = None
    ) -> RunResult:
        return await self.run_request(_request(code, tests, timeout_s, memory_mb))

    async def run_request(self, request: RunRequest) -> RunResult:
        return RunResult.from_dict(await self._post("/v1/run", request.to_dict()))

    async def run_batch(self, requests: Sequence[RunRequest]) -> list[RunResult]:
        body = await self._post("/v1/run/batch", {"requests": [r.to_dict() for r in requests]})
        return [RunResult.from_dict(r) for r in body["results"]]

    async def info(self) -> dict[str, Any]:
        """Workers, isolation layers and limits of the service."""
        try:
            response = await self._http.get("/v1/info")
        except httpx.TransportError as exc:
            raise SandboxError(f"sandbox unreachable: {exc}") from None
        if response.status_code != 200:
            raise SandboxRejected(response.status_code, _error_message(response))
        return response.json()

    async def _post(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        last = ""
        for attempt in range(self.retry.attempts):
            if attempt:
                await asyncio.sleep(self.retry.delay(attempt - 1))
            try:
                response = await self._http.post(path, json=body)
            except httpx.TransportError as exc:
                last = f"{type(exc).__name__}: {exc}"
                continue
            if response.status_code == 200:
                return response.json()
            if response.status_code not in RETRY_HTTP:
                raise SandboxRejected(response.status_code, _error_message(response))
            last = f"HTTP {response.status_code}: {_error_message(response)}"
        self.failures += 1
        raise SandboxError(f"sandbox call {path} failed after {self.retry.attempts} attempts: {last}")

    async def aclose(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> AsyncSandboxClient:
        return self

    async def __aexit__(self, *_exc: object) -> None:
        await self.aclose()


# ---------------------------------------------------------------------------------------------- gRPC


def _metadata(token: str | None) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),) if token else ()


class SandboxGrpcClient:
    """Synchronous gRPC client."""

    def __init__(
        self,
        target: str = "127.0.0.1:50052",
        token: str | None = None,
        timeout_s: float = 600.0,
        retry: RetryPolicy | None = None,
        tls: TlsOption = None,
    ) -> None:
        """tls: None (plaintext), True (system CAs), or a CA PEM path; `grpcs://host:port` also means TLS."""
        self.retry = retry or RetryPolicy()
        self.failures = 0
        self.timeout_s = timeout_s
        self._metadata = _metadata(token)
        self._channel = make_channel(target, GRPC_OPTIONS, tls)
        self._stub = sandbox_pb2_grpc.SandboxServiceStub(self._channel)

    def run(
        self, code: str, tests: TestSpec, timeout_s: float | None = None, memory_mb: int | None = None
    ) -> RunResult:
        return self.run_request(_request(code, tests, timeout_s, memory_mb))

    def run_request(self, request: RunRequest) -> RunResult:
        return result_from_pb(self._call(self._stub.Run, request_to_pb(request)))

    def run_batch(self, requests: Sequence[RunRequest]) -> list[RunResult]:
        message = pb.RunBatchRequest(requests=[request_to_pb(r) for r in requests])
        return [result_from_pb(r) for r in self._call(self._stub.RunBatch, message).results]

    def _call(self, method: Any, message: Any) -> Any:
        last = ""
        for attempt in range(self.retry.attempts):
            if attempt:
                time.sleep(self.retry.delay(attempt - 1))
            try:
                return method(message, timeout=self.timeout_s, metadata=self._metadata)
            except grpc.RpcError as exc:
                code = exc.code()
                if code not in RETRY_GRPC:
                    raise SandboxRejected(code.name, exc.details() or "") from None
                last = f"{code.name}: {exc.details()}"
        self.failures += 1
        raise SandboxError(f"sandbox gRPC call failed after {self.retry.attempts} attempts: {last}")

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> SandboxGrpcClient:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()


class AsyncSandboxGrpcClient:
    """grpc.aio client (create it inside the event loop that uses it)."""

    def __init__(
        self,
        target: str = "127.0.0.1:50052",
        token: str | None = None,
        timeout_s: float = 600.0,
        retry: RetryPolicy | None = None,
        tls: TlsOption = None,
    ) -> None:
        """tls: None (plaintext), True (system CAs), or a CA PEM path; `grpcs://host:port` also means TLS."""
        self.retry = retry or RetryPolicy()
        self.failures = 0
        self.timeout_s = timeout_s
        self._metadata = _metadata(token)
        self._channel = make_aio_channel(target, GRPC_OPTIONS, tls)
        self._stub = sandbox_pb2_grpc.SandboxServiceStub(self._channel)

    async def run(
        self, code: str, tests: TestSpec, timeout_s: float | None = None, memory_mb: int | None = None
    ) -> RunResult:
        return await self.run_request(_request(code, tests, timeout_s, memory_mb))

    async def run_request(self, request: RunRequest) -> RunResult:
        return result_from_pb(await self._call(self._stub.Run, request_to_pb(request)))

    async def run_batch(self, requests: Sequence[RunRequest]) -> list[RunResult]:
        message = pb.RunBatchRequest(requests=[request_to_pb(r) for r in requests])
        return [result_from_pb(r) for r in (await self._call(self._stub.RunBatch, message)).results]

    async def _call(self, method: Any, message: Any) -> Any:
        last = ""
        for attempt in range(self.retry.attempts):
            if attempt:
                await asyncio.sleep(self.retry.delay(attempt - 1))
            try:
                return await method(message, timeout=self.timeout_s, metadata=self._metadata)
            except grpc.aio.AioRpcError as exc:
                code = exc.code()
                if code not in RETRY_GRPC:
                    raise SandboxRejected(code.name, exc.details() or "") from None
                last = f"{code.name}: {exc.details()}"
        self.failures += 1
        raise SandboxError(f"sandbox gRPC call failed after {self.retry.attempts} attempts: {last}")

    async def close(self) -> None:
        await self._channel.close()

    async def __aenter__(self) -> AsyncSandboxGrpcClient:
        return self

    async def __aexit__(self, *_exc: object) -> None:
        await self.close()
