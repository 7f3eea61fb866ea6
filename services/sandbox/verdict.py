"""From what a worker observed to a verdict (pure functions; no processes, no transport).

For `call` and `stdio` tests the comparison happens here, in the service: the expected values never
enter the run, so no program can learn or forge them. For `assert` and `humaneval` the harness
reports each test over the nonce-checked channel; here a test counts as passed only when its report
arrived, and the run passes only when every test passed and the harness reached its end.
"""

from __future__ import annotations

import json
import math
import signal
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from services.sandbox.frames import (
    CASE,
    COMPILE_ERROR,
    DONE,
    EXIT,
    EXIT_END,
    MEMORY,
    MODULE_ERROR,
    SETUP_ERROR,
    TEST,
)
from services.sandbox.model import CallCase, RunResult, Status, StdioCase

MAX_DETAIL = 2000


@dataclass(slots=True)
class Run:
    """One process as the worker saw it (executor.RawRun on the wire)."""

    exit_code: int | None
    signal: int | None
    timed_out: bool
    output_limit: str
    stdout: str
    stderr: str
    frames: list[tuple[int, int, bool, str]]
    tampered: str
    duration_ms: float
    setup_error: str
    memory: bool = field(init=False)

    def __post_init__(self) -> None:
        self.frames = [(int(k), int(i), bool(ok), str(t)) for k, i, ok, t in self.frames]
        self.memory = any(kind == MEMORY for kind, *_ in self.frames)

    @classmethod
    def from_wire(cls, body: dict[str, Any]) -> Run:
        return cls(**body)

    def first(self, kind: int) -> str | None:
        return next((text for k, _, _, text in self.frames if k == kind), None)

    def ended(self) -> str:
        if self.signal is not None:
            return f"killed by {_signal_name(self.signal)}"
        return f"exit code {self.exit_code}"


@dataclass(frozen=True, slots=True)
class Tolerance:
    rel: float = 1e-6
    abs: float = 1e-9


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


def short(text: str, limit: int = MAX_DETAIL) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def clip(text: str, limit: int) -> str:
    if len(text) <= limit:
        return text
    return text[:limit] + f"\n...[{len(text) - limit} more characters]"


def limit_status(run: Run) -> tuple[Status, str] | None:
    """Limits decide before tests: output cap, then time (wall or CPU), then memory."""
    if run.output_limit:
        return Status.OUTPUT_LIMIT, f"{run.output_limit} exceeded the output limit"
    if run.timed_out:
        return Status.TIMEOUT, "wall-clock limit reached; the run was killed"
    if run.signal == signal.SIGXCPU:
        return Status.TIMEOUT, "CPU time limit reached"
    if run.memory:
        return Status.MEMORY, "memory limit reached (MemoryError)"
    if run.setup_error:
        return Status.ERROR, short(run.setup_error)
    return None


def load_errors(run: Run) -> tuple[Status, str] | None:
    compile_error = run.first(COMPILE_ERROR)
    if compile_error is not None:
        return Status.ERROR, short(compile_error)
    module_error = run.first(MODULE_ERROR)
    if module_error is not None:
        return Status.ERROR, short(module_error)
    return None


def _result(
    status: Status, passed: int, total: int, runs: Sequence[Run], detail: str, out: Run | None, clip_at: int
) -> RunResult:
    shown = out if out is not None else (runs[-1] if runs else None)
    return RunResult(
        status=status,
        passed=status is Status.PASSED,
        tests_passed=passed,
        tests_total=total,
        duration_ms=round(sum(r.duration_ms for r in runs), 3),
        stdout=clip(shown.stdout, clip_at) if shown else "",
        stderr=clip(shown.stderr, clip_at) if shown else "",
        detail=short(detail),
    )


def judge_tests(run: Run, total: int, clip_at: int) -> RunResult:
    """assert / humaneval: per-test reports from the harness."""
    results: dict[int, tuple[bool, str]] = {}
    tampered = run.tampered
    done = False
    setup_errors = []
    for kind, index, ok, text in run.frames:
        if kind == TEST:
            if index in results or not 0 <= index < total:
                tampered = tampered or f"test {index} reported twice or out of range"
            results[index] = (ok, text)
        elif kind == DONE:
            done = True
        elif kind == SETUP_ERROR:
            setup_errors.append(text)
        elif kind not in (COMPILE_ERROR, MODULE_ERROR, MEMORY):
            tampered = tampered or "an unexpected frame on the result channel"
    passed = 0 if tampered else sum(1 for i, (ok, _) in results.items() if ok and 0 <= i < total)
    verdict = limit_status(run) or load_errors(run)
    if verdict is None and tampered:
        verdict = (Status.FAILED, f"result channel tampering detected: {tampered}")
    if verdict is None and passed == total and done:
        verdict = (Status.PASSED, f"{passed}/{total} tests passed")
    if verdict is None:
        verdict = (Status.FAILED, _first_failure(results, total, done, setup_errors, run))
    return _result(verdict[0], passed, total, [run], verdict[1], run, clip_at)


def _first_failure(
    results: dict[int, tuple[bool, str]], total: int, done: bool, setup_errors: list[str], run: Run
) -> str:
    for index in range(total):
        if index not in results:
            if setup_errors:
                return f"test {index} did not run: test code raised {setup_errors[0]}"
            how = "the harness finished without it" if done else f"the run ended first ({run.ended()})"
            return f"test {index} did not report: {how}"
        ok, text = results[index]
        if not ok:
            return f"test {index} failed: {text}"
    return "failed"


def judge_call(run: Run, cases: Sequence[CallCase], tolerance: Tolerance, clip_at: int) -> RunResult:
    """call: the run returned tagged values; they are compared here with the expected ones."""
    total = len(cases)
    got: dict[int, tuple[bool, str]] = {}
    tampered = run.tampered
    done = False
    for kind, index, ok, text in run.frames:
        if kind == CASE:
            if index in got or not 0 <= index < total:
                tampered = tampered or f"case {index} reported twice or out of range"
            got[index] = (ok, text)
        elif kind == DONE:
            done = True
        elif kind not in (COMPILE_ERROR, MODULE_ERROR, MEMORY):
            tampered = tampered or "an unexpected frame on the result channel"
    passed = 0
    failure = ""
    for index, case in enumerate(cases):
        ok, text = got.get(index, (False, ""))
        if index not in got:
            failure = failure or f"case {index} did not run: the run ended first ({run.ended()})"
            continue
        if not ok:
            failure = failure or f"case {index}: {text}"
            continue
        try:
            value = decode(text)
        except ValueError as exc:
            tampered = tampered or f"undecodable value for case {index}: {exc}"
            continue
        if same(value, case.expected, tolerance):
            passed += 1
        else:
            failure = failure or f"case {index}: expected {_show(case.expected)}, got {_show(value)}"
    if tampered:
        passed = 0
    verdict = limit_status(run) or load_errors(run)
    if verdict is None and tampered:
        verdict = (Status.FAILED, f"result channel tampering detected: {tampered}")
    if verdict is None and passed == total and done:
        verdict = (Status.PASSED, f"{passed}/{total} cases passed")
    if verdict is None:
        verdict = (Status.FAILED, failure or "the harness did not finish")
    return _result(verdict[0], passed, total, [run], verdict[1], run, clip_at)


def judge_stdio(runs: Sequence[Run], cases: Sequence[StdioCase], clip_at: int) -> RunResult:
    """stdio: one process per case; exit code 0 and the same tokens as the expected stdout."""
    total = len(cases)
    passed = 0
    failure = ""
    shown: Run | None = None
    for index, case in enumerate(cases):
        if index >= len(runs):
            failure = failure or f"case {index} did not run"
            continue
        run = runs[index]
        if run.tampered:
            failure = failure or f"case {index}: result channel tampering detected: {run.tampered}"
        elif limit_status(run) is not None or load_errors(run) is not None:
            failure = failure or f"case {index}: {(limit_status(run) or load_errors(run) or ('', ''))[1]}"
        elif run.exit_code != 0:
            failure = failure or f"case {index}: runtime error ({run.ended()}): {_last_line(run.stderr)}"
        elif run.stdout.split() != case.stdout.split():
            failure = (
                failure
                or f"case {index}: wrong answer: expected {_show(case.stdout)}, got {_show(run.stdout)}"
            )
        else:
            passed += 1
            continue
        shown = shown or run
    for run in runs:
        verdict = limit_status(run) or load_errors(run)
        if verdict is not None:
            return _result(verdict[0], passed, total, runs, verdict[1], run, clip_at)
    if passed == total:
        return _result(Status.PASSED, passed, total, runs, f"{passed}/{total} cases passed", None, clip_at)
    return _result(Status.FAILED, passed, total, runs, failure, shown, clip_at)


def _last_line(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[-1] if lines else "no error output"


def _show(value: Any, limit: int = 200) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def script_completed(run: Run) -> bool:
    """True when the harness saw the program run to its last statement (not sys.exit / os._exit)."""
    return any(kind == EXIT and index == EXIT_END for kind, index, _, _ in run.frames)


# ---------------------------------------------------------------------------------------------- values


def decode(text: str) -> Any:
    """Inverse of harness.encode: tagged JSON to Python values (tuples, sets, bytes ... restored)."""
    try:
        raw = json.loads(text)
    except (ValueError, RecursionError) as exc:
        raise ValueError(f"bad JSON: {exc}") from None
    return _untag(raw, 0)


def _untag(raw: Any, depth: int) -> Any:
    if depth > 200:
        raise ValueError("nested too deeply")
    if not isinstance(raw, list):
        if isinstance(raw, dict):
            raise ValueError("untagged object")
        return raw
    if not raw or not isinstance(raw[0], str):
        raise ValueError("untagged array")
    tag, items = raw[0], raw[1:]
    if tag in ("L", "T", "S", "F"):
        values = [_untag(x, depth + 1) for x in items]
        return {"L": list, "T": tuple, "S": set, "F": frozenset}[tag](values)
    if tag == "D":
        pairs = [_untag_pair(x, depth + 1) for x in items]
        return dict(pairs)
    if tag in ("B", "A") and len(items) == 1 and isinstance(items[0], str):
        data = bytes.fromhex(items[0])
        return data if tag == "B" else bytearray(data)
    if tag == "C" and len(items) == 2:
        return complex(float(items[0]), float(items[1]))
    if tag == "R" and len(items) == 3 and all(type(x) is int for x in items):
        return range(*items)
    if tag == "I" and len(items) == 1 and isinstance(items[0], str):
        return int(items[0], 16)
    raise ValueError(f"unknown tag {tag!r}")


def _untag_pair(raw: Any, depth: int) -> tuple[Any, Any]:
    if not isinstance(raw, list) or len(raw) != 2:
        raise ValueError("bad dict item")
    key = _untag(raw[0], depth)
    try:
        hash(key)
    except TypeError:
        raise ValueError("unhashable dict key") from None
    return key, _untag(raw[1], depth)


def same(actual: Any, expected: Any, tolerance: Tolerance) -> bool:
    """Exact type and value: bool is not int, int is not float, floats within tolerance; a JSON array
    matches a list or a tuple (JSON cannot tell them apart); dict keys must match exactly."""
    te = type(expected)
    ta = type(actual)
    if expected is None:
        return actual is None
    if te is bool or te is int or te is str:
        return ta is te and actual == expected
    if te is float:
        if ta is not float:
            return False
        if math.isnan(expected):
            return math.isnan(actual)
        return math.isclose(actual, expected, rel_tol=tolerance.rel, abs_tol=tolerance.abs)
    if te is list:
        if ta is not list and ta is not tuple:
            return False
        if len(actual) != len(expected):
            return False
        return all(same(a, e, tolerance) for a, e in zip(actual, expected, strict=True))
    if te is dict:
        if ta is not dict or actual.keys() != expected.keys():
            return False
        return all(same(actual[k], v, tolerance) for k, v in expected.items())
    return ta is te and actual == expected
