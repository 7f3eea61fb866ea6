"""HTTP bootstrap shared by the services: body limits, auth, metrics, one-line error bodies."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import orjson
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from services.common.auth import bearer_ok
from services.common.errors import RequestError

log = logging.getLogger(__name__)
OPEN_PATHS = frozenset({"/healthz", "/readyz", "/metrics"})


class JSONBytes(JSONResponse):
    """JSON rendered by orjson (FastAPI's ORJSONResponse is deprecated); NaN/inf become null. A
    JSONResponse subclass: with any other Response class FastAPI documents every route's 200 body in
    the OpenAPI schema as a string instead of its response_model."""

    media_type = "application/json"

    def render(self, content: object) -> bytes:
        return orjson.dumps(content, option=orjson.OPT_SERIALIZE_NUMPY)


class ApiError(Exception):
    """An error with an HTTP status and a one-line message, raised by core logic adapters."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class ErrorOut(BaseModel):
    error: str = Field(description="what was wrong, one line")


# The error answers a POST route can give, all `{"error": "..."}`, for its OpenAPI entry (FastAPI would
# otherwise document 422 as its own validation-error shape, which these services never send).
ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorOut, "description": why}
    for status, why in [
        (400, "the body is not valid JSON or not UTF-8"),
        (401, "missing or invalid bearer token (when auth is on)"),
        (413, "over a size limit"),
        (422, "missing, mistyped or malformed fields"),
        (429, "overloaded: retry later"),
        (503, "not ready, or no answer could be produced: retry later"),
    ]
}


def error_response(status: int, message: str) -> JSONBytes:
    return JSONBytes({"error": message}, status_code=status)


class GuardMiddleware:
    """Pure ASGI: bearer auth (except health/metrics), load shedding, a hard cap on request body size.

    Shedding happens here, before the body is read, parsed and validated: when `full()` says the
    service's queue is full, a POST gets 429 at once. Beyond capacity a refusal must cost next to
    nothing, or refusals compete with the work (measured: shed p99 2.1 s at 8x load on 2 cores when
    the refusal came after parsing; docs/reliability.md)."""

    def __init__(
        self,
        app: ASGIApp,
        max_body: int,
        token: str | None,
        full: Callable[[], bool] | None = None,
        on_shed: Callable[[], None] | None = None,
    ) -> None:
        self.app = app
        self.max_body = max_body
        self.token = token
        self.full = full
        self.on_shed = on_shed

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        if scope["path"] not in OPEN_PATHS and not bearer_ok(headers.get("authorization"), self.token):
            resp = error_response(401, "missing or invalid bearer token")
            resp.headers["WWW-Authenticate"] = "Bearer"
            await resp(scope, receive, send)
            return
        if self.full is not None and scope.get("method") == "POST" and self.full():
            if self.on_shed is not None:
                self.on_shed()
            resp = error_response(429, "overloaded: the queue is full; retry later")
            resp.headers["Retry-After"] = "1"
            await resp(scope, receive, send)
            return
        declared = headers.get("content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.max_body):
            await error_response(413, f"request body over the limit of {self.max_body} bytes")(
                scope, receive, send
            )
            return
        chunks: list[bytes] = []
        size = 0
        more = True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body:
                await error_response(413, f"request body over the limit of {self.max_body} bytes")(
                    scope, receive, send
                )
                return
            chunks.append(chunk)
            more = message.get("more_body", False)
        body = b"".join(chunks)
        sent = False

        async def replay() -> Message:
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


class MetricsMiddleware:
    """Requests and latency per route (pure ASGI: Starlette's `@app.middleware("http")` runs every
    request through an extra task and memory streams, ~0.2 ms of CPU each). An exception no handler
    turned into a response is logged and answered 500, never a traceback to the client."""

    def __init__(self, app: ASGIApp, service: str, latency: Histogram, requests: Counter) -> None:
        self.app = app
        self.service = service
        self.latency = latency
        self.requests = requests

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        t0 = time.perf_counter()
        path = scope["path"]
        route = path if path in scope["app"].state.known_paths else "other"
        status = 0

        async def sending(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, sending)
        except Exception:  # never a traceback to the client
            log.exception("unhandled error on %s", route)
            if status:
                raise  # the response had started: the server can only drop the connection
            status = 500
            await error_response(500, "internal error")(scope, receive, send)
        finally:
            self.latency.labels(self.service, route).observe(time.perf_counter() - t0)
            self.requests.labels(self.service, route, str(status or 500)).inc()


def _one_line_validation(exc: RequestValidationError) -> str:
    parts = []
    errors = exc.errors()
    if len(errors) == 1 and tuple(errors[0].get("loc", ())) == ("body",):
        return "request body must be a JSON object (send Content-Type: application/json)"
    if errors and errors[0].get("type") == "json_invalid":
        return f"invalid JSON: {errors[0].get('ctx', {}).get('error', 'decode error')}"
    for err in errors[:5]:
        loc = ".".join(str(p) for p in err.get("loc", ()) if p != "body")
        parts.append(f"{loc or 'body'}: {err.get('msg', 'invalid')}")
    return "; ".join(parts) or "invalid request"


def install_common(
    app: FastAPI,
    registry: CollectorRegistry,
    service: str,
    max_body: int,
    token: str | None,
    ready: Callable[[], bool],
    full: Callable[[], bool] | None = None,
) -> None:
    """Health, readiness, metrics, error handlers, request metrics, guards (`full`: the service's queue
    is full; POSTs are then shed with 429 before their body is read)."""
    requests = Counter(
        "http_requests_total", "HTTP requests", ["service", "route", "status"], registry=registry
    )
    latency = Histogram(
        "http_request_seconds",
        "HTTP request latency",
        ["service", "route"],
        registry=registry,
        buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
    )

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONBytes:
        return error_response(422, _one_line_validation(exc))

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONBytes:
        return error_response(exc.status_code, str(exc.detail))

    @app.exception_handler(ApiError)
    async def _api(_: Request, exc: ApiError) -> JSONBytes:
        return error_response(exc.status, exc.message)

    @app.exception_handler(RequestError)
    async def _request_error(_: Request, exc: RequestError) -> JSONBytes:
        return error_response(exc.http_status, exc.message)

    @app.get("/healthz", tags=["ops"])
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz", tags=["ops"])
    async def readyz() -> JSONBytes:
        if ready():
            return JSONBytes({"status": "ready"})
        return JSONBytes({"status": "not ready"}, status_code=503)

    @app.get("/metrics", tags=["ops"])
    async def metrics() -> Response:
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    app.add_middleware(MetricsMiddleware, service=service, latency=latency, requests=requests)
    shed = Counter("http_shed_total", "POSTs refused with 429 before parsing", ["service"], registry=registry)
    app.add_middleware(
        GuardMiddleware, max_body=max_body, token=token, full=full, on_shed=shed.labels(service).inc
    )
    refresh_known_paths(app)


def refresh_known_paths(app: FastAPI) -> None:
    """Paths used as metric labels (anything else is counted as "other": bounded label cardinality)."""
    paths = {getattr(route, "path", None) for route in app.routes}
    app.state.known_paths = {p for p in paths if p}


def parse_json_body(body: bytes) -> object:
    """orjson parse with a one-line 400 for bad JSON or bytes that are not UTF-8."""
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise ApiError(400, f"invalid JSON: {exc}") from None
