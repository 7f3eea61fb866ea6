"""HTTP and gRPC give the same verdicts; batches keep order; overload is a fast 429; ops endpoints."""

from __future__ import annotations

import concurrent.futures
import json
from collections.abc import Iterator

import grpc
import httpx
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from psgpo.v1 import sandbox_pb2 as pb
from psgpo.v1 import sandbox_pb2_grpc
from services.common.runner import Running
from services.sandbox.client import (
    AssertTests,
    CallCase,
    CallTests,
    HumanEvalTests,
    RunRequest,
    SandboxGrpcClient,
    StdioCase,
    StdioTests,
)
from tests.sandbox.conftest import Sandbox, start_sandbox

REQUESTS = [
    RunRequest("def f(x):\n    return x * 2\n", AssertTests("assert f(2) == 4\nassert f(3) == 7\n")),
    RunRequest("def f(x):\n    return x\n", HumanEvalTests("def check(c):\n    assert c(1) == 1\n", "f")),
    RunRequest("print(int(input()) + 1)\n", StdioTests((StdioCase("1\n", "2"), StdioCase("5\n", "7")))),
    RunRequest(
        "def f(x):\n    return [x, x / 2]\n", CallTests("f", (CallCase([4], [4, 2.0]), CallCase([1], [1, 1])))
    ),
    RunRequest("def f(:\n", AssertTests("assert f()\n")),
    RunRequest("while True:\n    pass\n", AssertTests("assert True\n"), timeout_s=0.5),
    RunRequest("print('x' * 10)\nraise SystemExit(0)\n", AssertTests("assert True\n")),
]


def test_http_and_grpc_agree(sandbox: Sandbox):
    http = sandbox.client.run_batch(REQUESTS)
    with SandboxGrpcClient(sandbox.grpc_target) as client:
        grpc_batch = client.run_batch(REQUESTS)
        grpc_single = [client.run_request(r) for r in REQUESTS]
    http_single = [sandbox.client.run_request(r) for r in REQUESTS]
    for results in (grpc_batch, grpc_single, http_single):
        for a, b in zip(http, results, strict=True):
            assert (a.status, a.passed, a.tests_passed, a.tests_total, a.stdout, a.stderr) == (
                b.status,
                b.passed,
                b.tests_passed,
                b.tests_total,
                b.stdout,
                b.stderr,
            )
            assert a.detail == b.detail


def test_response_shape_is_the_design_contract(sandbox: Sandbox):
    body = {"code": "def f():\n    return 1\n", "tests": {"kind": "assert", "code": "assert f() == 1\n"}}
    response = httpx.post(f"{sandbox.http_url}/v1/run", json=body)
    assert response.status_code == 200
    data = response.json()
    assert set(data) == {
        "status",
        "passed",
        "tests_passed",
        "tests_total",
        "duration_ms",
        "stdout",
        "stderr",
        "detail",
    }
    assert data["status"] == "passed" and data["passed"] is True
    assert isinstance(data["duration_ms"], float)


def test_batch_results_keep_request_order(sandbox: Sandbox):
    requests = [
        RunRequest(f"def f():\n    return {i}\n", AssertTests(f"assert f() == {i}\n")) for i in range(24)
    ]
    requests[5] = RunRequest(
        "import time\ntime.sleep(0.3)\ndef f():\n    return 5\n", AssertTests("assert f() == 5\n")
    )
    requests[7] = RunRequest("def f():\n    return -1\n", AssertTests("assert f() == 7\n"))
    results = sandbox.client.run_batch(requests)
    assert [r.passed for r in results] == [i != 7 for i in range(24)]


@pytest.fixture(scope="module")
def tiny_queue() -> Iterator[Running]:
    running = start_sandbox(workers=1, max_queue=1)
    yield running
    running.stop()


def test_overload_is_a_fast_429(tiny_queue: Running):
    url = f"http://127.0.0.1:{tiny_queue.http_port}"
    slow = {"code": "import time\ntime.sleep(1.0)\n", "tests": {"kind": "assert", "code": "assert True\n"}}
    batch = httpx.post(f"{url}/v1/run/batch", json={"requests": [slow] * 3}, timeout=30)
    assert batch.status_code == 429 and "retry" in batch.json()["error"]
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        futures = [pool.submit(httpx.post, f"{url}/v1/run", json=slow, timeout=30) for _ in range(4)]
        codes = sorted(f.result().status_code for f in futures)
    assert codes.count(200) >= 1 and 429 in codes
    channel = grpc.insecure_channel(f"127.0.0.1:{tiny_queue.grpc_port}")
    stub = sandbox_pb2_grpc.SandboxServiceStub(channel)
    message = pb.RunBatchRequest(
        requests=[
            pb.RunRequest(code="x = 1", tests=pb.TestSpec(assert_tests=pb.AssertTests(code="assert True")))
        ]
        * 3
    )
    with pytest.raises(grpc.RpcError) as err:
        stub.RunBatch(message, timeout=30)
    assert err.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
    channel.close()
    assert httpx.post(f"{url}/v1/run", json=slow, timeout=30).status_code == 200  # still serving


def test_metrics_health_info(sandbox: Sandbox):
    sandbox.assert_serving()
    metrics = httpx.get(f"{sandbox.http_url}/metrics").text
    for name in (
        'sandbox_runs_total{status="passed"}',
        "sandbox_run_seconds_bucket",
        "sandbox_latency_seconds_bucket",
        "sandbox_pool_busy",
        "sandbox_pool_workers 2.0",
        "sandbox_queue_depth",
        'sandbox_isolation_layer_active{layer="rlimits"} 1.0',
    ):
        assert name in metrics, name
    assert httpx.get(f"{sandbox.http_url}/healthz").json() == {"status": "ok"}
    assert httpx.get(f"{sandbox.http_url}/readyz").status_code == 200
    info = httpx.get(f"{sandbox.http_url}/v1/info").json()
    assert info["workers"] == 2 and info["worker_queue"] == 2 and info["limits"]["max_timeout_s"] == 30.0
    assert {layer["name"] for layer in info["isolation"]} >= {
        "seccomp",
        "landlock",
        "network namespace",
        "rlimits",
    }
    with grpc.insecure_channel(sandbox.grpc_target) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        reply = health.Check(health_pb2.HealthCheckRequest(service="psgpo.v1.SandboxService"))
        assert reply.status == health_pb2.HealthCheckResponse.SERVING


def test_sandboxfusion_run_code(sandbox: Sandbox):
    url = f"{sandbox.http_url}/run_code"
    ok = httpx.post(url, json={"code": "print(input())", "language": "python", "stdin": "hi"}).json()
    assert ok["status"] == "Success" and ok["run_result"]["stdout"] == "hi\n"
    assert ok["run_result"]["status"] == "Finished" and ok["run_result"]["return_code"] == 0
    assert set(ok) == {"status", "message", "compile_result", "run_result", "executor_pod_name", "files"}
    failed = httpx.post(url, json={"code": "assert 1 == 2", "language": "python"}).json()
    assert failed["status"] == "Failed" and failed["run_result"]["return_code"] == 1
    assert "AssertionError" in failed["run_result"]["stderr"]
    slow = httpx.post(url, json={"code": "while True: pass", "language": "python", "run_timeout": 0.5}).json()
    assert slow["status"] == "Failed" and slow["run_result"]["status"] == "TimeLimitExceeded"
    early = httpx.post(
        url, json={"code": "import sys\nsys.exit(0)\nassert 1 == 2", "language": "python"}
    ).json()
    assert early["status"] == "Failed" and early["run_result"]["return_code"] == 0 and early["message"]
    plain_exit = httpx.post(
        url, json={"code": "import sys\nprint(1)\nsys.exit(0)", "language": "python"}
    ).json()
    assert plain_exit["status"] == "Success"
    wrong_language = httpx.post(url, json={"code": "int main(){}", "language": "cpp"})
    assert wrong_language.status_code == 422 and "python" in wrong_language.json()["error"]
    files = httpx.post(url, json={"code": "print(1)", "language": "python", "files": {"a.txt": "eA=="}})
    assert files.status_code == 422
    assert (
        json.loads(httpx.post(url, json={"code": "print(1)", "language": "python"}).text)["status"]
        == "Success"
    )
