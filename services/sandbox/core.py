"""The operations both transports expose (no grpc/fastapi imports): validate and clamp a request,
admit it (429 when too many runs are waiting), run it on the pool, judge it, count it.

Limits policy (the same for HTTP and gRPC): a timeout or memory limit that is not a positive finite
number is refused (422 / INVALID_ARGUMENT); gRPC's 0 means "server default". Values above the server
maxima are clamped to them, memory below the minimum is raised to it. Oversized code, test payloads,
case lists or batches are refused with 413 (gRPC: INVALID_ARGUMENT), never truncated.
"""

from __future__ import annotations

import asyncio
import json
import logging
import marshal
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from services.common.errors import InvalidInput, Overloaded, TooLarge, Unavailable
from services.sandbox.config import SandboxSettings
from services.sandbox.model import (
    AssertTests,
    CallTests,
    HumanEvalTests,
    RunRequest,
    RunResult,
    Status,
    StdioTests,
)
from services.sandbox.pool import WorkerCrashed, WorkerPool
from services.sandbox.verdict import Run, Tolerance, judge_call, judge_stdio, judge_tests, limit_status

log = logging.getLogger(__name__)


class SandboxFailure(Exception):
    """No verdict could be produced (a worker crashed twice): a server error, never a result."""


@dataclass(frozen=True, slots=True)
class Prepared:
    request: RunRequest
    job: dict[str, Any]
    timeout_s: float


class SandboxMetrics:
    def __init__(self, registry: CollectorRegistry, pool: WorkerPool) -> None:
        self.runs = Counter("sandbox_runs_total", "runs by status", ["status"], registry=registry)
        self.run_seconds = Histogram(
            "sandbox_run_seconds",
            "execution time of a run in its worker",
            registry=registry,
            buckets=(0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
        )
        self.latency = Histogram(
            "sandbox_latency_seconds",
            "accept to verdict, queueing included",
            registry=registry,
            buckets=(0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120),
        )
        self.rejected = Counter("sandbox_rejected_total", "refused requests", ["reason"], registry=registry)
        self.failures = Counter("sandbox_failures_total", "runs left without a verdict", registry=registry)
        busy = Gauge("sandbox_pool_busy", "workers running a job", registry=registry)
        busy.set_function(pool.busy)
        alive = Gauge("sandbox_pool_workers", "live worker processes", registry=registry)
        alive.set_function(lambda: pool.stats.alive)
        waiting = Gauge("sandbox_queue_depth", "runs waiting for a worker", registry=registry)
        waiting.set_function(lambda: pool.stats.waiting)
        restarts = Gauge("sandbox_worker_restarts", "workers restarted after a failure", registry=registry)
        restarts.set_function(lambda: pool.stats.restarts)
        self.layers = Gauge(
            "sandbox_isolation_layer_active", "1 when the layer is active", ["layer"], registry=registry
        )


class SandboxCore:
    def __init__(self, settings: SandboxSettings, registry: CollectorRegistry) -> None:
        self.settings = settings
        self.pool = WorkerPool(settings)
        self.metrics = SandboxMetrics(registry, self.pool)
        self.tolerance = Tolerance(settings.float_rel_tol, settings.float_abs_tol)
        self.ready = False

    async def start(self) -> None:
        await self.pool.start()
        for layer in self.pool.layers:
            self.metrics.layers.labels(layer.name).set(1 if layer.active else 0)
        self.ready = True

    async def stop(self) -> None:
        self.ready = False
        await self.pool.stop()

    # ------------------------------------------------------------------------------------------ limits

    def limits(self, timeout_s: float | None, memory_mb: int | None) -> tuple[float, int]:
        s = self.settings
        if timeout_s is None:
            timeout = s.default_timeout_s
        elif not isinstance(timeout_s, int | float) or not math.isfinite(timeout_s) or timeout_s <= 0:
            raise InvalidInput(f"timeout_s must be a positive number of seconds, got {timeout_s!r}")
        else:
            timeout = min(float(timeout_s), s.max_timeout_s)
        if memory_mb is None:
            memory = s.default_memory_mb
        elif isinstance(memory_mb, bool) or not isinstance(memory_mb, int) or memory_mb <= 0:
            raise InvalidInput(f"memory_mb must be a positive integer, got {memory_mb!r}")
        else:
            memory = max(s.min_memory_mb, min(memory_mb, s.max_memory_mb))
        return timeout, memory

    # ------------------------------------------------------------------------------------------ validate

    def prepare(self, request: RunRequest, where: str = "") -> Prepared:
        s = self.settings
        if _utf8_len(request.code) > s.max_code_bytes:
            raise TooLarge(f"{where}code is over the limit of {s.max_code_bytes} bytes")
        timeout, memory = self.limits(request.timeout_s, request.memory_mb)
        tests = request.tests
        job: dict[str, Any] = {"code": request.code, "timeout_s": timeout, "memory_mb": memory}
        if isinstance(tests, AssertTests):
            job.update(mode="assert", test=tests.code)
            size = _utf8_len(tests.code)
        elif isinstance(tests, HumanEvalTests):
            if not tests.entry_point.isidentifier():
                raise InvalidInput(f"{where}tests.entry_point must be a Python identifier")
            job.update(mode="humaneval", test=tests.test, entry_point=tests.entry_point)
            size = _utf8_len(tests.test)
        elif isinstance(tests, StdioTests):
            self._check_cases(len(tests.cases), where)
            stdins = [case.stdin for case in tests.cases]
            job.update(mode="script", stdins=stdins)
            size = sum(_utf8_len(c.stdin) + _utf8_len(c.stdout) for c in tests.cases)
        elif isinstance(tests, CallTests):
            if not tests.fn.isidentifier():
                raise InvalidInput(f"{where}tests.fn must be a Python identifier")
            self._check_cases(len(tests.cases), where)
            args = [_args_json(case.args, f"{where}tests.cases[{i}]") for i, case in enumerate(tests.cases)]
            job.update(mode="call", fn=tests.fn, args=args)
            size = sum(len(a) for a in args) + sum(len(_json_or_none(c.expected)) for c in tests.cases)
        else:
            raise InvalidInput(f"{where}unknown test kind")
        if size > s.max_test_bytes:
            raise TooLarge(f"{where}tests are over the limit of {s.max_test_bytes} bytes")
        return Prepared(request, job, timeout)

    def _check_cases(self, n: int, where: str) -> None:
        if n == 0:
            raise InvalidInput(f"{where}tests.cases must not be empty")
        if n > self.settings.max_cases:
            raise TooLarge(f"{where}{n} cases are over the limit of {self.settings.max_cases}")

    # ------------------------------------------------------------------------------------------ run

    async def run(self, request: RunRequest) -> RunResult:
        prepared = self.prepare(request)
        self._admit(1)
        return await self._execute(prepared)

    async def run_batch(self, requests: Sequence[RunRequest]) -> list[RunResult]:
        if not requests:
            raise InvalidInput("requests must not be empty")
        if len(requests) > self.settings.max_batch:
            raise TooLarge(f"{len(requests)} requests are over the batch limit of {self.settings.max_batch}")
        prepared = [self.prepare(r, f"requests[{i}].") for i, r in enumerate(requests)]
        self._admit(len(prepared))
        return list(await asyncio.gather(*(self._execute(p) for p in prepared)))

    async def run_script(self, code: str, stdin: str, timeout_s: float | None, memory_mb: int | None) -> Run:
        """One plain run of `code` as a script (the SandboxFusion-compatible endpoint)."""
        if _utf8_len(code) > self.settings.max_code_bytes:
            raise TooLarge(f"code is over the limit of {self.settings.max_code_bytes} bytes")
        if _utf8_len(stdin) > self.settings.max_test_bytes:
            raise TooLarge(f"stdin is over the limit of {self.settings.max_test_bytes} bytes")
        timeout, memory = self.limits(timeout_s, memory_mb)
        self._admit(1)
        job = {"mode": "script", "code": code, "stdins": [stdin], "timeout_s": timeout, "memory_mb": memory}
        reply = await self._submit(job, timeout)
        run = Run.from_wire(reply["runs"][0])
        limited = limit_status(run)
        status = limited[0] if limited else (Status.PASSED if run.exit_code == 0 else Status.FAILED)
        self.metrics.runs.labels(status.value).inc()
        self.metrics.run_seconds.observe(run.duration_ms / 1000.0)
        return run

    def serving(self) -> bool:
        """Readiness: started, not stopping, and at least one worker alive (while every worker is being
        restarted, runs would only wait)."""
        return self.ready and self.pool.stats.alive > 0

    def full(self) -> bool:
        """No run can be admitted now (the HTTP guard sheds before parsing)."""
        return self.pool.stats.waiting >= self.settings.max_queue

    def _admit(self, n: int) -> None:
        if not self.ready:
            self.metrics.rejected.labels("not_ready").inc()
            raise Unavailable("the sandbox is starting or stopping")
        if self.pool.stats.waiting + n > self.settings.max_queue:
            self.metrics.rejected.labels("queue_full").inc()
            raise Overloaded(f"too many runs waiting (limit {self.settings.max_queue}); retry later")

    async def _execute(self, prepared: Prepared) -> RunResult:
        started = time.perf_counter()
        reply = await self._submit(dict(prepared.job), prepared.timeout_s)
        result = self.judge(prepared, reply)
        self.metrics.runs.labels(result.status.value).inc()
        self.metrics.run_seconds.observe(result.duration_ms / 1000.0)
        self.metrics.latency.observe(time.perf_counter() - started)
        return result

    async def _submit(self, job: dict[str, Any], timeout_s: float) -> dict[str, Any]:
        try:
            _check_text(job)
        except UnicodeEncodeError as exc:  # a lone surrogate
            raise InvalidInput(f"request is not encodable: {exc}") from None
        for attempt in (1, 2):
            job["id"] = self.pool.next_id()
            try:
                payload = marshal.dumps(job)
            except ValueError as exc:  # an object marshal cannot write
                raise InvalidInput(f"request is not encodable: {exc}") from None
            try:
                reply = await self.pool.submit(job, payload, timeout_s)
            except WorkerCrashed as exc:
                self.metrics.failures.inc()
                log.error("run attempt %d without a verdict: %s", attempt, exc)
                continue
            if "internal_error" in reply:
                self.metrics.failures.inc()
                raise SandboxFailure(f"sandbox internal error: {reply['internal_error']}")
            return reply
        raise SandboxFailure("the sandbox worker failed twice on this run; no verdict")

    def judge(self, prepared: Prepared, reply: dict[str, Any]) -> RunResult:
        clip_at = self.settings.return_output_bytes
        if "test_error" in reply:
            return RunResult(Status.ERROR, False, 0, 0, 0.0, "", "", str(reply["test_error"]))
        runs = [Run.from_wire(r) for r in reply["runs"]]
        tests = prepared.request.tests
        if isinstance(tests, StdioTests):
            return judge_stdio(runs, tests.cases, clip_at)
        if isinstance(tests, CallTests):
            return judge_call(runs[0], tests.cases, self.tolerance, clip_at)
        return judge_tests(runs[0], int(reply["tests_total"]), clip_at)


def _check_text(value: Any) -> None:
    """Every string in a job is valid UTF-8 text (a lone surrogate is not): the worker decodes and
    compiles it, and the verdict quotes it back."""
    if type(value) is str:
        value.encode("utf-8")
    elif type(value) is dict:
        for item in value.values():
            _check_text(item)
    elif type(value) in (list, tuple):
        for item in value:
            _check_text(item)


def _utf8_len(text: str) -> int:
    return len(text.encode("utf-8", "surrogatepass"))


def _args_json(args: Any, where: str) -> str:
    if not isinstance(args, list):
        raise InvalidInput(f"{where}.args must be a JSON array")
    try:
        return json.dumps(args, allow_nan=True)
    except (TypeError, ValueError, RecursionError) as exc:
        raise InvalidInput(f"{where}.args is not JSON: {exc}") from None


def _json_or_none(value: Any) -> str:
    try:
        return json.dumps(value)
    except (TypeError, ValueError, RecursionError):
        return ""
