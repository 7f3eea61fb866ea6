"""Bad input gets a clear 4xx / gRPC status and the server keeps serving."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import grpc
import httpx
import pytest

from psgpo.v1 import prm_pb2, prm_pb2_grpc
from services.common.runner import Running
from services.prm.client import PrmError, PrmGrpcClient, PrmHttpClient
from tests.integration.conftest import start_prm

GOOD = {"items": [{"prompt": "def f():\n", "response": "    return 1"}]}
JSON = {"Content-Type": "application/json"}


@pytest.fixture(scope="module")
def small_server(tiny_models: Path) -> Iterator[Running]:
    """Tight limits so the limit paths are cheap to hit."""
    running = start_prm(
        tiny_models / "prm", max_items_per_request=8, max_request_bytes=64 * 1024, max_length=128
    )
    yield running
    running.stop()


@pytest.mark.parametrize(
    ("body", "status", "needle"),
    [
        (b"{not json", 422, "invalid JSON"),
        (b"[1, 2]", 422, "JSON object"),
        (b"{}", 422, "items"),
        (b'{"items": []}', 422, "must not be empty"),
        (b'{"items": "abc"}', 422, "items"),
        (b'{"items": [{"prompt": "a"}]}', 422, "response"),
        (b'{"items": [{"prompt": 1, "response": "x"}]}', 422, "prompt"),
        (b'{"items": [{"prompt": null, "response": "x"}]}', 422, "prompt"),
        (b'{"items": [{"prompt": "", "response": ""}]}', 422, "both empty"),
        (b'{"items": [{"prompt": "\\ud800", "response": "x"}]}', 422, "surrogate"),
        (b'{"items": [{"prompt": "a", "response": "b"}], "aggregate": "max"}', 422, "aggregate"),
        (b'{"items": [{"prompt": "\xff\xfe", "response": "b"}]}', 400, "parsing"),
        (b'{"items": [' + b",".join([b'{"prompt": "a", "response": "b"}'] * 9) + b"]}", 413, "limit of 8"),
        (b'{"items": [{"prompt": "", "response": "' + b"x = 1\\n" * 200 + b'"}]}', 413, "exceed"),
        (b'{"items": [{"prompt": "", "response": "' + b"a" * 70000 + b'"}]}', 413, "body over the limit"),
    ],
)
def test_http_bad_input(small_server: Running, body: bytes, status: int, needle: str):
    url = f"http://127.0.0.1:{small_server.http_port}"
    resp = httpx.post(f"{url}/v1/score", content=body, headers=JSON)
    assert resp.status_code == status, resp.text
    assert needle.lower() in resp.json()["error"].lower()
    assert "\n" not in resp.json()["error"]
    assert httpx.post(f"{url}/v1/score", json=GOOD).status_code == 200  # still serving


def test_get_reward_bad_input(small_server: Running):
    url = f"http://127.0.0.1:{small_server.http_port}/get_reward"
    assert httpx.post(url, json={"query": ["ab"], "prompts": ["a", "b"]}).status_code == 422
    assert httpx.post(url, json={"query": [1]}).status_code == 422
    assert httpx.post(url, json={"query": []}).status_code == 422
    assert httpx.post(url, json={"query": ["x = 1"]}).status_code == 200  # prompts optional


def test_wrong_method_and_path(small_server: Running):
    url = f"http://127.0.0.1:{small_server.http_port}"
    assert httpx.get(f"{url}/v1/score").status_code == 405
    assert httpx.post(f"{url}/nope", json={}).status_code == 404


@pytest.mark.parametrize(
    ("request_pb", "needle"),
    [
        (prm_pb2.ScoreRequest(), "must not be empty"),
        (prm_pb2.ScoreRequest(items=[prm_pb2.ScoreItem()]), "both empty"),
        (prm_pb2.ScoreRequest(items=[prm_pb2.ScoreItem(response="x")] * 9), "limit of 8"),
        (prm_pb2.ScoreRequest(items=[prm_pb2.ScoreItem(response="x = 1\n" * 200)]), "exceed"),
        (prm_pb2.ScoreRequest(items=[prm_pb2.ScoreItem(response="x")], aggregate=99), "aggregate"),
    ],
)
def test_grpc_bad_input(small_server: Running, request_pb: prm_pb2.ScoreRequest, needle: str):
    with grpc.insecure_channel(f"127.0.0.1:{small_server.grpc_port}") as channel:
        stub = prm_pb2_grpc.PrmServiceStub(channel)
        with pytest.raises(grpc.RpcError) as err:
            stub.Score(request_pb, timeout=10)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert needle in err.value.details()
        ok = stub.Score(prm_pb2.ScoreRequest(items=[prm_pb2.ScoreItem(response="x = 1")]), timeout=10)
        assert len(ok.results) == 1


def test_grpc_undecodable_bytes(small_server: Running):
    with grpc.insecure_channel(f"127.0.0.1:{small_server.grpc_port}") as channel:
        raw = channel.unary_unary("/psgpo.v1.PrmService/Score")
        with pytest.raises(grpc.RpcError) as err:
            raw(b"\xff\xff\xff\xff garbage", timeout=10)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_clients_raise_typed_errors(small_server: Running):
    with PrmHttpClient(f"http://127.0.0.1:{small_server.http_port}") as h:
        with pytest.raises(PrmError) as err:
            h.score([("", "")])
        assert err.value.status == 422 and not err.value.retryable
    with PrmGrpcClient(f"127.0.0.1:{small_server.grpc_port}") as g:
        with pytest.raises(PrmError) as err:
            g.score([("", "x = 1\n" * 200)])
        assert err.value.status == "INVALID_ARGUMENT"
    with PrmHttpClient("http://127.0.0.1:9", retries=1, timeout=2) as dead:
        with pytest.raises(PrmError) as err:
            dead.score([("", "x")])
        assert err.value.retryable


def test_overload_sheds_with_429(tiny_models: Path):
    running = start_prm(tiny_models / "prm", max_queue_items=2, max_items_per_request=64)
    try:
        url = f"http://127.0.0.1:{running.http_port}/v1/score"
        resp = httpx.post(url, json={"items": [{"prompt": "", "response": "x"}] * 3})
        assert resp.status_code == 413  # can never fit the queue: not a retryable 429
        import concurrent.futures

        def one(_: int) -> int:
            return httpx.post(
                url, json={"items": [{"prompt": "", "response": "x = 1\n" * 60}] * 2}
            ).status_code

        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            codes = list(pool.map(one, range(24)))
        assert set(codes) <= {200, 429} and 429 in codes and 200 in codes
    finally:
        running.stop()


def test_huge_text_refused_before_tokenizing(http_url: str):
    """Megabytes of text under the body limit: a fast 413, not seconds of tokenization."""
    import time

    t0 = time.perf_counter()
    resp = httpx.post(
        f"{http_url}/v1/score", json={"items": [{"prompt": "", "response": "x = 1\n" * 500_000}]}
    )
    assert resp.status_code == 413 and "cannot fit" in resp.json()["error"]
    assert time.perf_counter() - t0 < 2.0
