"""The request metrics of every HTTP service (MetricsMiddleware): counted per known route and status,
unknown paths under one label; an exception no handler answered is a one-line 500, never a traceback."""

from __future__ import annotations

import asyncio
import re

import httpx
from fastapi import FastAPI, HTTPException
from prometheus_client import CollectorRegistry

from services.common.http_util import install_common


def _app() -> FastAPI:
    app = FastAPI()

    @app.post("/v1/ok")
    async def ok(body: dict) -> dict:
        return {"keys": sorted(body)}

    @app.post("/v1/boom")
    async def boom() -> dict:
        raise RuntimeError("a bug with a secret path /srv/x in it")

    @app.get("/v1/teapot")
    async def teapot() -> dict:
        raise HTTPException(418, "short and stout")

    install_common(app, CollectorRegistry(), "t", 1 << 20, None, lambda: True)
    return app


def _calls(app: FastAPI, *requests: tuple[str, str, dict]) -> list[httpx.Response]:
    async def go() -> list[httpx.Response]:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            return [await client.request(method, path, **kw) for method, path, kw in requests]

    return asyncio.run(go())


def _count(metrics: str, route: str, status: str) -> float:
    pattern = rf'http_requests_total\{{route="{re.escape(route)}",service="t",status="{status}"\}} (\S+)'
    found = re.search(pattern, metrics)
    return float(found.group(1)) if found else 0.0


def test_requests_are_counted_by_route_and_status():
    app = _app()
    *answers, metrics = _calls(
        app,
        ("POST", "/v1/ok", {"json": {"b": 1, "a": 2}}),
        ("POST", "/v1/ok", {"content": b"[not json"}),
        ("GET", "/v1/teapot", {}),
        ("GET", "/no/such/path/123", {}),
        ("GET", "/metrics", {}),
    )
    assert [a.status_code for a in answers] == [200, 422, 418, 404]
    assert answers[0].json() == {"keys": ["a", "b"]}
    assert answers[2].json() == {"error": "short and stout"}
    text = metrics.text
    assert _count(text, "/v1/ok", "200") == 1 and _count(text, "/v1/ok", "422") == 1
    assert _count(text, "/v1/teapot", "418") == 1
    assert _count(text, "other", "404") == 1  # unknown paths share one label: bounded cardinality
    assert 'http_request_seconds_count{route="/v1/ok",service="t"} 2.0' in text


def test_an_unhandled_exception_is_a_one_line_500(caplog):
    app = _app()
    boom, after, metrics = _calls(
        app, ("POST", "/v1/boom", {}), ("POST", "/v1/ok", {"json": {}}), ("GET", "/metrics", {})
    )
    assert boom.status_code == 500 and boom.json() == {"error": "internal error"}
    assert "secret" not in boom.text and "Traceback" not in boom.text
    assert any("unhandled error on /v1/boom" in r.getMessage() for r in caplog.records)
    assert after.status_code == 200  # the service goes on
    assert _count(metrics.text, "/v1/boom", "500") == 1
