"""Bad input gets a clear 4xx / gRPC status (never a 5xx) and the service keeps serving.

Limits policy under test: non-positive or non-finite limits are refused (422); limits above the
server maxima are clamped; memory below the minimum is raised to it.
"""

from __future__ import annotations

from collections.abc import Iterator

import grpc
import httpx
import pytest

from psgpo.v1 import sandbox_pb2 as pb
from psgpo.v1 import sandbox_pb2_grpc
from services.common.runner import Running
from tests.sandbox.conftest import start_sandbox

GOOD = {"code": "def f():\n    return 1\n", "tests": {"kind": "assert", "code": "assert f() == 1\n"}}
JSON = {"Content-Type": "application/json"}


@pytest.fixture(scope="module")
def small() -> Iterator[Running]:
    """Tight limits so the limit paths are cheap to hit."""
    running = start_sandbox(
        workers=1,
        max_request_bytes=64 * 1024,
        max_code_bytes=8 * 1024,
        max_test_bytes=16 * 1024,
        max_cases=4,
        max_batch=3,
        default_timeout_s=2.0,
        max_timeout_s=2.0,
        default_memory_mb=128,
        max_memory_mb=256,
    )
    yield running
    running.stop()


def _url(running: Running) -> str:
    return f"http://127.0.0.1:{running.http_port}"


def _with(**changes: object) -> dict:
    return {**GOOD, **changes}


def _stdio(n: int) -> dict:
    return {"kind": "stdio", "cases": [{"stdin": "", "stdout": ""}] * n}


@pytest.mark.parametrize(
    ("body", "status", "needle"),
    [
        (b"{not json", 422, "json"),
        (b"[1, 2]", 422, "body"),
        (b"{}", 422, "code"),
        (b'{"code": 1, "tests": {"kind": "assert", "code": ""}}', 422, "code"),
        (b'{"code": "x", "tests": {"kind": "bogus", "code": ""}}', 422, "bogus"),
        (b'{"code": "x"}', 422, "tests"),
        (b'{"code": "x", "tests": {"kind": "assert"}}', 422, "code"),
        (
            b'{"code": "x", "tests": {"kind": "call", "fn": "f", "cases": [{"args": 1, "expected": 1}]}}',
            422,
            "args",
        ),
        (b'{"code": "x", "tests": {"kind": "call", "fn": "f", "cases": [{"args": []}]}}', 422, "expected"),
        (b'{"code": "\\ud800", "tests": {"kind": "assert", "code": "assert True"}}', 422, "encod"),
        (b'{"code": "x", "tests": {"kind": "assert", "code": ""}, "timeout_s": -1}', 422, "timeout_s"),
        (b'{"code": "x", "tests": {"kind": "assert", "code": ""}, "timeout_s": 0}', 422, "timeout_s"),
        (b'{"code": "x", "tests": {"kind": "assert", "code": ""}, "timeout_s": NaN}', 422, "timeout_s"),
        (b'{"code": "x", "tests": {"kind": "assert", "code": ""}, "timeout_s": "soon"}', 422, "timeout_s"),
        (b'{"code": "x", "tests": {"kind": "assert", "code": ""}, "memory_mb": -5}', 422, "memory_mb"),
        (b'{"code": "x", "tests": {"kind": "assert", "code": ""}, "memory_mb": 1.5}', 422, "memory_mb"),
        (
            b'{"code": "x", "tests": {"kind": "humaneval", "test": "", "entry_point": "1x"}}',
            422,
            "entry_point",
        ),
        (
            b'{"code": "x", "tests": {"kind": "call", "fn": "a b", "cases": [{"args": [], "expected": 1}]}}',
            422,
            "fn",
        ),
        (b'{"code": "x", "tests": {"kind": "stdio", "cases": []}}', 422, "empty"),
        (
            b'{"code": "x", "tests": {"kind": "assert", "code": ""}}' + b" " * 70000,
            413,
            "body over the limit",
        ),
    ],
)
def test_http_bad_input(small: Running, body: bytes, status: int, needle: str):
    response = httpx.post(f"{_url(small)}/v1/run", content=body, headers=JSON)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert needle.lower() in error.lower() and "\n" not in error
    assert httpx.post(f"{_url(small)}/v1/run", json=GOOD).status_code == 200


@pytest.mark.parametrize(
    ("body", "status", "needle"),
    [
        (_with(code="x = 1\n" * 2000), 413, "code is over"),
        (_with(tests={"kind": "assert", "code": "assert True\n" * 2000}), 413, "tests are over"),
        (_with(tests=_stdio(5)), 413, "limit of 4"),
    ],
)
def test_http_size_limits(small: Running, body: dict, status: int, needle: str):
    response = httpx.post(f"{_url(small)}/v1/run", json=body)
    assert response.status_code == status and needle in response.json()["error"]


def test_batch_limits(small: Running):
    url = f"{_url(small)}/v1/run/batch"
    assert httpx.post(url, json={"requests": [GOOD] * 4}).status_code == 413
    empty = httpx.post(url, json={"requests": []})
    assert empty.status_code == 422 and "empty" in empty.json()["error"]
    bad_item = httpx.post(url, json={"requests": [GOOD, _with(tests=_stdio(5))]})
    assert bad_item.status_code == 413 and "requests[1]" in bad_item.json()["error"]
    assert httpx.post(url, json={"requests": [GOOD] * 3}).status_code == 200


def test_absurd_limits_are_clamped(small: Running):
    url = f"{_url(small)}/v1/run"
    slow = {"code": "while True:\n    pass\n", "tests": {"kind": "assert", "code": "assert True"}}
    response = httpx.post(url, json={**slow, "timeout_s": 1e9}, timeout=30)
    assert response.status_code == 200 and response.json()["status"] == "timeout"
    assert response.json()["duration_ms"] < 2000 + 1500  # the server maximum, 2 s, applied
    assert httpx.post(url, json={**GOOD, "memory_mb": 10**9}).json()["passed"] is True
    assert httpx.post(url, json={**GOOD, "memory_mb": 1}).json()["passed"] is True


def test_null_bytes_and_odd_code_are_run_results_not_errors(small: Running):
    url = f"{_url(small)}/v1/run"
    nul = httpx.post(url, json=_with(code="x = 1\x00\n")).json()
    assert nul["status"] == "error" and "null" in nul["detail"]
    deep = httpx.post(url, json=_with(code="x = " + "(" * 300 + ")" * 300 + "\n")).json()
    assert deep["status"] == "error"
    empty = httpx.post(url, json=_with(code="")).json()
    assert empty["status"] == "failed" and "NameError" in empty["detail"]


def test_grpc_bad_input(small: Running):
    channel = grpc.insecure_channel(f"127.0.0.1:{small.grpc_port}")
    stub = sandbox_pb2_grpc.SandboxServiceStub(channel)

    def call_case(args: str, expected: str) -> pb.RunRequest:
        case = pb.CallCase(args_json=args, expected_json=expected)
        return pb.RunRequest(code="def f(): pass", tests=pb.TestSpec(call=pb.CallTests(fn="f", cases=[case])))

    bad = [
        (pb.RunRequest(code="x"), "tests"),
        (pb.RunRequest(code="x", tests=pb.TestSpec()), "no test kind"),
        (call_case("[1", "1"), "args_json"),
        (call_case("{}", "1"), "JSON array"),
        (call_case("[]", ""), "expected_json"),
        (
            pb.RunRequest(code="x", tests=pb.TestSpec(assert_tests=pb.AssertTests(code="")), timeout_s=-1),
            "timeout",
        ),
        (
            pb.RunRequest(code="x", tests=pb.TestSpec(assert_tests=pb.AssertTests(code="")), memory_mb=-1),
            "memory",
        ),
        (
            pb.RunRequest(code="x" * 9000, tests=pb.TestSpec(assert_tests=pb.AssertTests(code=""))),
            "code is over",
        ),
    ]
    for message, needle in bad:
        with pytest.raises(grpc.RpcError) as err:
            stub.Run(message, timeout=10)
        assert err.value.code() is grpc.StatusCode.INVALID_ARGUMENT, (needle, err.value.details())
        assert needle in (err.value.details() or "")
    with pytest.raises(grpc.RpcError) as err:
        stub.Run(pb.RunRequest(code="x" * 100_000), timeout=10)
    assert err.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
    good = pb.RunRequest(
        code="def f():\n    return 1\n", tests=pb.TestSpec(assert_tests=pb.AssertTests(code="assert f()"))
    )
    assert stub.Run(good, timeout=10).passed
    assert stub.Run(call_case("[]", "null"), timeout=10).passed
    channel.close()
