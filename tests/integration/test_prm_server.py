"""The PRM service end to end: real server, real tiny PRM, real HTTP and gRPC."""

from __future__ import annotations

import asyncio

import grpc
import httpx
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.prm.client import AsyncPrmGrpcClient, PrmGrpcClient, PrmHttpClient

PROMPT = "# Return the sum of the squares of xs.\ndef sum_squares(xs):\n"
RESPONSE = (
    "    total = 0\n"
    "\n"
    "    # accumulate\n"
    "    for x in xs:\n"
    "        total += x * x  # square\n"
    "    return total\n"
)
TOL = 1e-4


def test_score_shape_offsets_and_neutral_lines(http_url: str):
    resp = httpx.post(f"{http_url}/v1/score", json={"items": [{"prompt": PROMPT, "response": RESPONSE}]})
    assert resp.status_code == 200
    body = resp.json()
    assert body["model"] == "prm"
    (result,) = body["results"]
    lines = result["lines"]
    assert len(lines) == RESPONSE.count("\n") + 1
    for i, (line, text) in enumerate(zip(lines, RESPONSE.split("\n"), strict=True)):
        assert line["line"] == i
        assert RESPONSE[line["start"] : line["end"]] == text
        neutral = not text.strip() or text.strip().startswith("#")
        assert (line["score"] is None) == neutral
    indices = [line["token_index"] for line in lines]
    assert indices == sorted(indices) and indices[0] >= 0
    scored = [line["score"] for line in lines if line["score"] is not None]
    assert result["score"] == pytest.approx(min(scored))
    assert result["num_tokens"] > indices[-1]


def test_prefix_scored_alone_agrees_with_full_response(http_url: str):
    texts = RESPONSE.split("\n")
    with PrmHttpClient(http_url) as prm:
        (full,) = prm.score([(PROMPT, RESPONSE)])
        prefixes = [(PROMPT, "\n".join(texts[: m + 1])) for m in range(len(texts))]
        alone = prm.score(prefixes)
    for m, item in enumerate(alone):
        assert item.lines[m].token_index == full.lines[m].token_index
        if full.lines[m].score is None:
            assert item.lines[m].score is None
        else:
            assert item.lines[m].score == pytest.approx(full.lines[m].score, abs=TOL)


def test_aggregates(http_url: str):
    out = {}
    for how in ("min", "mean", "last"):
        resp = httpx.post(
            f"{http_url}/v1/score",
            json={"items": [{"prompt": PROMPT, "response": RESPONSE}], "aggregate": how},
        )
        out[how] = resp.json()["results"][0]
    scores = [x["score"] for x in out["min"]["lines"] if x["score"] is not None]
    assert out["min"]["score"] == pytest.approx(min(scores))
    assert out["mean"]["score"] == pytest.approx(sum(scores) / len(scores))
    assert out["last"]["score"] == pytest.approx(scores[-1])


def test_all_neutral_response_has_null_score(http_url: str):
    resp = httpx.post(f"{http_url}/v1/score", json={"items": [{"prompt": PROMPT, "response": "# todo\n\n"}]})
    assert resp.status_code == 200
    result = resp.json()["results"][0]
    assert result["score"] is None and all(x["score"] is None for x in result["lines"])


def test_http_and_grpc_agree(http_url: str, grpc_target: str):
    items = [(PROMPT, RESPONSE), ("", "x = 1\ny = 2"), ("def f():\n", "    pass")]
    with PrmHttpClient(http_url) as h, PrmGrpcClient(grpc_target) as g:
        a, b = h.score(items, "mean"), g.score(items, "mean")
        ra, rb = (
            h.get_reward([p + r for p, r in items], [p for p, _ in items]),
            g.get_reward([p + r for p, r in items], [p for p, _ in items]),
        )
    for x, y in zip(a, b, strict=True):
        assert x.num_tokens == y.num_tokens
        assert x.score == pytest.approx(y.score, abs=TOL)
        assert [(ln.line, ln.start, ln.end, ln.token_index) for ln in x.lines] == [
            (ln.line, ln.start, ln.end, ln.token_index) for ln in y.lines
        ]
        for lx, ly in zip(x.lines, y.lines, strict=True):
            assert (lx.score is None) == (ly.score is None)
            if lx.score is not None:
                assert lx.score == pytest.approx(ly.score, abs=TOL)
    assert ra == pytest.approx(rb, abs=TOL)


def test_openrlhf_get_reward(http_url: str):
    payload = {"query": [PROMPT + RESPONSE, "hello\n"], "prompts": [PROMPT, "hello\n"], "labels": ["", ""]}
    resp = httpx.post(f"{http_url}/get_reward", json=payload)
    assert resp.status_code == 200
    body = resp.json()
    assert set(body) == {"rewards", "scores", "extra_logs"}
    assert len(body["rewards"]) == 2 and body["rewards"] == body["scores"]
    with PrmHttpClient(http_url) as prm:
        (item,) = prm.score([(PROMPT, RESPONSE)], "min")
    assert body["rewards"][0] == pytest.approx(item.score, abs=TOL)
    assert isinstance(body["rewards"][1], float)  # empty response: the final-token output, a real model value
    bad = httpx.post(f"{http_url}/get_reward", json={"query": ["abc"], "prompts": ["xyz"]})
    assert bad.status_code == 422 and "does not start with" in bad.json()["error"]


async def test_concurrent_requests_are_batched_and_exact(grpc_target: str, http_url: str):
    items = [(PROMPT, RESPONSE[: 20 + 7 * i]) for i in range(24)]
    with PrmHttpClient(http_url) as prm:
        sequential = [prm.score([it])[0] for it in items]
    async with AsyncPrmGrpcClient(grpc_target) as client:
        concurrent = await asyncio.gather(*(client.score([it]) for it in items))
    for seq, (con,) in zip(sequential, concurrent, strict=True):
        assert seq.num_tokens == con.num_tokens
        for a, b in zip(seq.lines, con.lines, strict=True):
            assert (a.score is None and b.score is None) or a.score == pytest.approx(b.score, abs=TOL)
    metrics = httpx.get(f"{http_url}/metrics").text
    assert "prm_items_total" in metrics and "prm_batch_items_bucket" in metrics
    batches = [ln for ln in metrics.splitlines() if ln.startswith("prm_batch_items_count")]
    items_total = [ln for ln in metrics.splitlines() if ln.startswith("prm_items_total")]
    assert float(batches[0].split()[-1]) < float(items_total[0].split()[-1])  # some batch held >1 item


def test_ops_endpoints(http_url: str, grpc_target: str):
    assert httpx.get(f"{http_url}/healthz").json() == {"status": "ok"}
    assert httpx.get(f"{http_url}/readyz").status_code == 200
    assert httpx.get(f"{http_url}/docs").status_code == 200
    spec = httpx.get(f"{http_url}/openapi.json").json()
    assert "/v1/score" in spec["paths"] and "/get_reward" in spec["paths"]
    info = httpx.get(f"{http_url}/v1/info").json()
    assert info["max_length"] == 512 and info["model"] == "prm"
    with grpc.insecure_channel(grpc_target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        for name in ("", "psgpo.v1.PrmService"):
            status = stub.Check(health_pb2.HealthCheckRequest(service=name)).status
            assert status == health_pb2.HealthCheckResponse.SERVING


def test_grpc_reflection_lists_the_service(grpc_target: str):
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    with grpc.insecure_channel(grpc_target) as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        responses = stub.ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")])
        )
        names = {s.name for r in responses for s in r.list_services_response.service}
    assert "psgpo.v1.PrmService" in names
