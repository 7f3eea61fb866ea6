"""Typed PRM clients (HTTP and gRPC, sync and async). Imports no model library.

    from services.prm.client import PrmHttpClient
    with PrmHttpClient("http://127.0.0.1:8001") as prm:
        result = prm.score([("def f(x):\\n", "    return x + 1")])
        result[0].lines[0].score

Failures raise PrmError (never a made-up score). Overload (429 / RESOURCE_EXHAUSTED) and
unavailability (503 / UNAVAILABLE, connection errors) are retried a bounded number of times.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import grpc
import httpx

from psgpo.v1 import prm_pb2, prm_pb2_grpc
from services.common.channels import TlsOption, make_aio_channel, make_channel

T = TypeVar("T")
RETRYABLE_HTTP = {429, 502, 503, 504}
RETRYABLE_GRPC = {grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.UNAVAILABLE}
AGGREGATE_ENUM = {
    "min": prm_pb2.AGGREGATE_MIN,
    "mean": prm_pb2.AGGREGATE_MEAN,
    "last": prm_pb2.AGGREGATE_LAST,
}


class PrmError(Exception):
    def __init__(self, message: str, status: int | str | None = None, retryable: bool = False) -> None:
        super().__init__(message)
        self.status = status
        self.retryable = retryable


@dataclass(frozen=True, slots=True)
class LineScore:
    line: int
    start: int
    end: int
    token_index: int
    score: float | None  # None: neutral line


@dataclass(frozen=True, slots=True)
class ItemScore:
    score: float | None
    num_tokens: int
    lines: list[LineScore]


def _items_json(items: Sequence[tuple[str, str]]) -> list[dict[str, str]]:
    return [{"prompt": p, "response": r} for p, r in items]


def _from_json(body: dict[str, Any]) -> list[ItemScore]:
    return [
        ItemScore(r["score"], r["num_tokens"], [LineScore(**x) for x in r["lines"]]) for r in body["results"]
    ]


def _from_pb(resp: prm_pb2.ScoreResponse) -> list[ItemScore]:
    return [
        ItemScore(
            r.score if r.HasField("score") else None,
            r.num_tokens,
            [
                LineScore(x.line, x.start, x.end, x.token_index, x.score if x.HasField("score") else None)
                for x in r.lines
            ],
        )
        for r in resp.results
    ]


def _request_pb(items: Sequence[tuple[str, str]], aggregate: str) -> prm_pb2.ScoreRequest:
    if aggregate not in AGGREGATE_ENUM:
        raise ValueError(f"aggregate must be one of {sorted(AGGREGATE_ENUM)}")
    return prm_pb2.ScoreRequest(
        items=[prm_pb2.ScoreItem(prompt=p, response=r) for p, r in items], aggregate=AGGREGATE_ENUM[aggregate]
    )


def _http_error(resp: httpx.Response) -> PrmError:
    try:
        message = resp.json().get("error", resp.text)
    except ValueError:
        message = resp.text
    return PrmError(
        f"PRM HTTP {resp.status_code}: {message}", resp.status_code, resp.status_code in RETRYABLE_HTTP
    )


def _grpc_error(exc: grpc.RpcError) -> PrmError:
    code = exc.code()
    return PrmError(f"PRM gRPC {code.name}: {exc.details()}", code.name, code in RETRYABLE_GRPC)


def _backoff(attempt: int) -> float:
    return min(2.0, 0.05 * 2**attempt)


def _retry(call: Callable[[], T], retries: int) -> T:
    for attempt in range(retries + 1):
        try:
            return call()
        except PrmError as exc:
            if not exc.retryable or attempt == retries:
                raise
        time.sleep(_backoff(attempt))
    raise AssertionError("unreachable")


async def _aretry(call: Callable[[], Awaitable[T]], retries: int) -> T:
    for attempt in range(retries + 1):
        try:
            return await call()
        except PrmError as exc:
            if not exc.retryable or attempt == retries:
                raise
        await asyncio.sleep(_backoff(attempt))
    raise AssertionError("unreachable")


def _auth(token: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"} if token else {}


class PrmHttpClient:
    def __init__(
        self, base_url: str, token: str | None = None, timeout: float = 60.0, retries: int = 3
    ) -> None:
        self._http = httpx.Client(base_url=base_url, headers=_auth(token), timeout=timeout)
        self.retries = retries
        self.model = ""  # the served model's name, set by each score call

    def _post(self, path: str, payload: dict[str, Any]) -> dict[str, Any]:
        def call() -> dict[str, Any]:
            try:
                resp = self._http.post(path, json=payload)
            except httpx.TransportError as exc:
                raise PrmError(f"PRM unreachable: {exc}", None, True) from exc
            if resp.status_code != 200:
                raise _http_error(resp)
            return resp.json()

        return _retry(call, self.retries)

    def score(self, items: Sequence[tuple[str, str]], aggregate: str = "min") -> list[ItemScore]:
        body = self._post("/v1/score", {"items": _items_json(items), "aggregate": aggregate})
        self.model = body["model"]
        return _from_json(body)

    def get_reward(self, queries: Sequence[str], prompts: Sequence[str]) -> list[float]:
        return self._post("/get_reward", {"query": list(queries), "prompts": list(prompts)})["rewards"]

    def info(self) -> dict[str, Any]:
        resp = self._http.get("/v1/info")
        if resp.status_code != 200:
            raise _http_error(resp)
        return resp.json()

    def ready(self) -> bool:
        try:
            return self._http.get("/readyz").status_code == 200
        except httpx.TransportError:
            return False

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> PrmHttpClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncPrmHttpClient:
    def __init__(
        self, base_url: str, token: str | None = None, timeout: float = 60.0, retries: int = 3
    ) -> None:
        self._http = httpx.AsyncClient(base_url=base_url, headers=_auth(token), timeout=timeout)
        self.retries = retries
        self.model = ""

    async def _post(self, path: str, payload: dict[str, Any]) -> dict[str, Any]:
        async def call() -> dict[str, Any]:
            try:
                resp = await self._http.post(path, json=payload)
            except httpx.TransportError as exc:
                raise PrmError(f"PRM unreachable: {exc}", None, True) from exc
            if resp.status_code != 200:
                raise _http_error(resp)
            return resp.json()

        return await _aretry(call, self.retries)

    async def score(self, items: Sequence[tuple[str, str]], aggregate: str = "min") -> list[ItemScore]:
        return _from_json(
            await self._post("/v1/score", {"items": _items_json(items), "aggregate": aggregate})
        )

    async def get_reward(self, queries: Sequence[str], prompts: Sequence[str]) -> list[float]:
        body = await self._post("/get_reward", {"query": list(queries), "prompts": list(prompts)})
        return body["rewards"]

    async def aclose(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> AsyncPrmHttpClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


# round_robin: behind a headless Service (several PRM pods), spread calls over every address.
GRPC_OPTIONS = [("grpc.max_receive_message_length", 64 * 1024 * 1024), ("grpc.lb_policy_name", "round_robin")]


class PrmGrpcClient:
    def __init__(
        self,
        target: str,
        token: str | None = None,
        timeout: float = 60.0,
        retries: int = 3,
        tls: TlsOption = None,
    ) -> None:
        """tls: None (plaintext), True (system CAs), or a CA PEM path; `grpcs://host:port` also means TLS."""
        self._channel = make_channel(target, GRPC_OPTIONS, tls)
        self._stub = prm_pb2_grpc.PrmServiceStub(self._channel)
        self._metadata = [("authorization", f"Bearer {token}")] if token else None
        self.timeout = timeout
        self.retries = retries
        self.model = ""

    def _call(self, method: Callable[..., T], request: Any) -> T:
        def call() -> T:
            try:
                return method(request, timeout=self.timeout, metadata=self._metadata)
            except grpc.RpcError as exc:
                raise _grpc_error(exc) from exc

        return _retry(call, self.retries)

    def score(self, items: Sequence[tuple[str, str]], aggregate: str = "min") -> list[ItemScore]:
        resp = self._call(self._stub.Score, _request_pb(items, aggregate))
        self.model = resp.model
        return _from_pb(resp)

    def get_reward(self, queries: Sequence[str], prompts: Sequence[str]) -> list[float]:
        resp = self._call(self._stub.GetReward, prm_pb2.RewardRequest(query=queries, prompts=prompts))
        return list(resp.rewards)

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> PrmGrpcClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncPrmGrpcClient:
    def __init__(
        self,
        target: str,
        token: str | None = None,
        timeout: float = 60.0,
        retries: int = 3,
        tls: TlsOption = None,
    ) -> None:
        """tls: None (plaintext), True (system CAs), or a CA PEM path; `grpcs://host:port` also means TLS."""
        self._channel = make_aio_channel(target, GRPC_OPTIONS, tls)
        self._stub = prm_pb2_grpc.PrmServiceStub(self._channel)
        self._metadata = [("authorization", f"Bearer {token}")] if token else None
        self.timeout = timeout
        self.retries = retries
        self.model = ""

    async def _call(self, method: Callable[..., Any], request: Any) -> Any:
        async def call() -> Any:
            try:
                return await method(request, timeout=self.timeout, metadata=self._metadata)
            except grpc.RpcError as exc:
                raise _grpc_error(exc) from exc

        return await _aretry(call, self.retries)

    async def score(self, items: Sequence[tuple[str, str]], aggregate: str = "min") -> list[ItemScore]:
        resp = await self._call(self._stub.Score, _request_pb(items, aggregate))
        self.model = resp.model
        return _from_pb(resp)

    async def get_reward(self, queries: Sequence[str], prompts: Sequence[str]) -> list[float]:
        resp = await self._call(self._stub.GetReward, prm_pb2.RewardRequest(query=queries, prompts=prompts))
        return list(resp.rewards)

    async def close(self) -> None:
        await self._channel.close()

    async def __aenter__(self) -> AsyncPrmGrpcClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
