"""Protobuf <-> model conversions, shared by the gRPC servicer and the gRPC client.

Call cases travel as JSON text (`args_json`, `expected_json`) so that int and float survive; gRPC's
zero values mean "server default" for timeout_s and memory_mb.
"""

from __future__ import annotations

import json
from typing import Any

from psgpo.v1 import sandbox_pb2 as pb
from services.common.errors import InvalidInput
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

STATUS_TO_PB = {
    Status.PASSED: pb.RUN_STATUS_PASSED,
    Status.FAILED: pb.RUN_STATUS_FAILED,
    Status.ERROR: pb.RUN_STATUS_ERROR,
    Status.TIMEOUT: pb.RUN_STATUS_TIMEOUT,
    Status.MEMORY: pb.RUN_STATUS_MEMORY,
    Status.OUTPUT_LIMIT: pb.RUN_STATUS_OUTPUT_LIMIT,
}
PB_TO_STATUS = {v: k for k, v in STATUS_TO_PB.items()}


def _json(text: str, where: str) -> Any:
    if not text:
        raise InvalidInput(f"{where} is empty (JSON text expected)")
    try:
        return json.loads(text)
    except (ValueError, RecursionError) as exc:
        raise InvalidInput(f"{where} is not valid JSON: {exc}") from None


def tests_from_pb(spec: pb.TestSpec, where: str = "") -> TestSpec:
    kind = spec.WhichOneof("kind")
    if kind == "assert_tests":
        return AssertTests(spec.assert_tests.code)
    if kind == "humaneval":
        return HumanEvalTests(spec.humaneval.test, spec.humaneval.entry_point)
    if kind == "stdio":
        return StdioTests(tuple(StdioCase(c.stdin, c.stdout) for c in spec.stdio.cases))
    if kind == "call":
        cases = []
        for i, case in enumerate(spec.call.cases):
            args = _json(case.args_json, f"{where}tests.call.cases[{i}].args_json")
            if not isinstance(args, list):
                raise InvalidInput(f"{where}tests.call.cases[{i}].args_json must be a JSON array")
            cases.append(
                CallCase(args, _json(case.expected_json, f"{where}tests.call.cases[{i}].expected_json"))
            )
        return CallTests(spec.call.fn, tuple(cases))
    raise InvalidInput(f"{where}tests: no test kind set (assert_tests, humaneval, stdio or call)")


def request_from_pb(message: pb.RunRequest, where: str = "") -> RunRequest:
    if not message.HasField("tests"):
        raise InvalidInput(f"{where}tests is required")
    return RunRequest(
        code=message.code,
        tests=tests_from_pb(message.tests, where),
        timeout_s=message.timeout_s if message.timeout_s != 0 else None,
        memory_mb=message.memory_mb if message.memory_mb != 0 else None,
    )


def request_to_pb(request: RunRequest) -> pb.RunRequest:
    message = pb.RunRequest(
        code=request.code, timeout_s=request.timeout_s or 0, memory_mb=request.memory_mb or 0
    )
    tests = request.tests
    if isinstance(tests, AssertTests):
        message.tests.assert_tests.code = tests.code
    elif isinstance(tests, HumanEvalTests):
        message.tests.humaneval.test = tests.test
        message.tests.humaneval.entry_point = tests.entry_point
    elif isinstance(tests, StdioTests):
        message.tests.stdio.cases.extend(pb.StdioCase(stdin=c.stdin, stdout=c.stdout) for c in tests.cases)
    else:
        message.tests.call.fn = tests.fn
        message.tests.call.cases.extend(
            pb.CallCase(args_json=json.dumps(list(c.args)), expected_json=json.dumps(c.expected))
            for c in tests.cases
        )
    return message


def result_to_pb(result: RunResult) -> pb.RunResult:
    return pb.RunResult(
        status=STATUS_TO_PB[result.status],
        passed=result.passed,
        tests_passed=result.tests_passed,
        tests_total=result.tests_total,
        duration_ms=result.duration_ms,
        stdout=result.stdout,
        stderr=result.stderr,
        detail=result.detail,
    )


def result_from_pb(message: pb.RunResult) -> RunResult:
    return RunResult(
        status=PB_TO_STATUS[message.status],
        passed=message.passed,
        tests_passed=message.tests_passed,
        tests_total=message.tests_total,
        duration_ms=message.duration_ms,
        stdout=message.stdout,
        stderr=message.stderr,
        detail=message.detail,
    )
