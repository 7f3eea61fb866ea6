"""GuardMiddleware sheds POSTs with 429 before reading the body when the service says it is full; auth
still comes first; GETs (health, metrics) are never shed."""

from __future__ import annotations

import asyncio

import httpx
from fastapi import FastAPI
from prometheus_client import CollectorRegistry

from services.common.http_util import install_common


def _app(state: dict[str, bool], seen: list[bytes], token: str | None = None) -> FastAPI:
    app = FastAPI()

    @app.post("/v1/work")
    async def work(body: dict) -> dict:
        seen.append(repr(body).encode())
        return {"ok": True}

    install_common(app, CollectorRegistry(), "t", 1 << 20, token, lambda: True, lambda: state["full"])
    return app


def _call(app: FastAPI, method: str, path: str, **kwargs) -> httpx.Response:
    async def go() -> httpx.Response:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            return await client.request(method, path, **kwargs)

    return asyncio.run(go())


def test_a_full_service_sheds_posts_without_parsing_them():
    state, seen = {"full": True}, []
    app = _app(state, seen)
    shed = _call(app, "POST", "/v1/work", content=b"{not json at all")
    assert shed.status_code == 429 and shed.headers["retry-after"] == "1"
    assert shed.json() == {"error": "overloaded: the queue is full; retry later"}
    assert seen == []  # the route never ran; the bad body was never parsed (a 400 would say it was)
    assert _call(app, "GET", "/healthz").status_code == 200
    metrics = _call(app, "GET", "/metrics").text
    assert 'http_shed_total{service="t"} 1.0' in metrics
    state["full"] = False
    assert _call(app, "POST", "/v1/work", json={"a": 1}).json() == {"ok": True} and len(seen) == 1


def test_authentication_is_checked_before_shedding():
    app = _app({"full": True}, [], token="s3cret")
    assert _call(app, "POST", "/v1/work", json={}).status_code == 401
    ok = _call(app, "POST", "/v1/work", json={}, headers={"Authorization": "Bearer s3cret"})
    assert ok.status_code == 429
