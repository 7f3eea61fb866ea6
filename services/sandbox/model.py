"""Requests and results of the sandbox, as plain dataclasses shared by the core, both transports and
the client (which imports nothing else from the service). JSON shapes follow DESIGN.md."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any


class Status(StrEnum):
    PASSED = "passed"
    FAILED = "failed"  # a test failed, or the program ended before its tests completed
    ERROR = "error"  # the program (or the test code) does not compile, or raised while loading
    TIMEOUT = "timeout"  # wall-clock or CPU limit
    MEMORY = "memory"  # address-space limit
    OUTPUT_LIMIT = "output_limit"  # stdout, stderr or results over the cap


@dataclass(frozen=True, slots=True)
class AssertTests:
    """MBPP style: top-level asserts, each counted and run separately."""

    code: str
    kind: str = field(default="assert", init=False)


@dataclass(frozen=True, slots=True)
class HumanEvalTests:
    """`test` defines check(candidate); one test: check(entry_point) must return normally."""

    test: str
    entry_point: str
    kind: str = field(default="humaneval", init=False)


@dataclass(frozen=True, slots=True)
class StdioCase:
    stdin: str
    stdout: str


@dataclass(frozen=True, slots=True)
class StdioTests:
    """Run the program per case; stdout compared token by token (whitespace-tolerant)."""

    cases: tuple[StdioCase, ...]
    kind: str = field(default="stdio", init=False)


@dataclass(frozen=True, slots=True)
class CallCase:
    args: list[Any]
    expected: Any


@dataclass(frozen=True, slots=True)
class CallTests:
    """fn(*args) per case, compared with `expected` by exact type and value (floats with tolerance)."""

    fn: str
    cases: tuple[CallCase, ...]
    kind: str = field(default="call", init=False)


TestSpec = AssertTests | HumanEvalTests | StdioTests | CallTests


@dataclass(frozen=True, slots=True)
class RunRequest:
    code: str
    tests: TestSpec
    timeout_s: float | None = None  # None: the server default; above the server maximum: clamped
    memory_mb: int | None = None

    def to_dict(self) -> dict[str, Any]:
        body: dict[str, Any] = {"code": self.code, "tests": tests_to_dict(self.tests)}
        if self.timeout_s is not None:
            body["timeout_s"] = self.timeout_s
        if self.memory_mb is not None:
            body["memory_mb"] = self.memory_mb
        return body


@dataclass(frozen=True, slots=True)
class RunResult:
    status: Status
    passed: bool
    tests_passed: int
    tests_total: int
    duration_ms: float
    stdout: str
    stderr: str
    detail: str

    def to_dict(self) -> dict[str, Any]:
        return {
            "status": self.status.value,
            "passed": self.passed,
            "tests_passed": self.tests_passed,
            "tests_total": self.tests_total,
            "duration_ms": self.duration_ms,
            "stdout": self.stdout,
            "stderr": self.stderr,
            "detail": self.detail,
        }

    @classmethod
    def from_dict(cls, body: dict[str, Any]) -> RunResult:
        return cls(
            status=Status(body["status"]),
            passed=bool(body["passed"]),
            tests_passed=int(body["tests_passed"]),
            tests_total=int(body["tests_total"]),
            duration_ms=float(body["duration_ms"]),
            stdout=str(body["stdout"]),
            stderr=str(body["stderr"]),
            detail=str(body["detail"]),
        )


def tests_to_dict(tests: TestSpec) -> dict[str, Any]:
    if isinstance(tests, AssertTests):
        return {"kind": "assert", "code": tests.code}
    if isinstance(tests, HumanEvalTests):
        return {"kind": "humaneval", "test": tests.test, "entry_point": tests.entry_point}
    if isinstance(tests, StdioTests):
        return {"kind": "stdio", "cases": [{"stdin": c.stdin, "stdout": c.stdout} for c in tests.cases]}
    return {
        "kind": "call",
        "fn": tests.fn,
        "cases": [{"args": list(c.args), "expected": c.expected} for c in tests.cases],
    }
