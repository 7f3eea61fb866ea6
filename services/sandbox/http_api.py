"""HTTP routes (FastAPI): thin adapters over SandboxCore. Shapes: DESIGN.md "Sandbox HTTP"."""

from __future__ import annotations

from typing import Annotated, Any, Literal

import orjson
from fastapi import APIRouter, FastAPI
from fastapi.responses import JSONResponse
from prometheus_client import CollectorRegistry
from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr

from services.common.http_util import ERROR_RESPONSES, ApiError, install_common, refresh_known_paths
from services.sandbox.core import SandboxCore, SandboxFailure
from services.sandbox.fusion import LANGUAGES, fusion_response
from services.sandbox.model import (
    AssertTests,
    CallCase,
    CallTests,
    HumanEvalTests,
    RunRequest,
    StdioCase,
    StdioTests,
    TestSpec,
)


class JsonResponse(JSONResponse):
    """orjson-rendered JSON (FastAPI deprecates its own JsonResponse). A JSONResponse subclass, so that
    FastAPI documents each route's response_model in the OpenAPI schema (not a string)."""

    media_type = "application/json"

    def render(self, content: Any) -> bytes:
        return orjson.dumps(content)


class AssertIn(BaseModel):
    kind: Literal["assert"]
    code: StrictStr = Field(description="assert statements; each top-level one is a test")


class HumanEvalIn(BaseModel):
    kind: Literal["humaneval"]
    test: StrictStr = Field(description="defines check(candidate)")
    entry_point: StrictStr = Field(description="the function passed to check")


class StdioCaseIn(BaseModel):
    stdin: StrictStr = ""
    stdout: StrictStr = Field(description="expected output, compared token by token")


class StdioIn(BaseModel):
    kind: Literal["stdio"]
    cases: list[StdioCaseIn]


class CallCaseIn(BaseModel):
    args: list[Any] = Field(description="positional arguments")
    expected: Any = Field(description="the return value, compared by exact type and value")


class CallIn(BaseModel):
    kind: Literal["call"]
    fn: StrictStr
    cases: list[CallCaseIn]


TestsIn = Annotated[AssertIn | HumanEvalIn | StdioIn | CallIn, Field(discriminator="kind")]


class RunIn(BaseModel):
    code: StrictStr
    tests: TestsIn
    timeout_s: float | None = Field(None, gt=0, allow_inf_nan=False, description="clamped to the server max")
    memory_mb: StrictInt | None = Field(None, gt=0, description="clamped to the server range")

    def to_request(self) -> RunRequest:
        return RunRequest(self.code, _tests(self.tests), self.timeout_s, self.memory_mb)


class BatchIn(BaseModel):
    requests: list[RunIn]


class RunOut(BaseModel):
    status: Literal["passed", "failed", "error", "timeout", "memory", "output_limit"]
    passed: bool
    tests_passed: int
    tests_total: int
    duration_ms: float
    stdout: str
    stderr: str
    detail: str


class BatchOut(BaseModel):
    results: list[RunOut]


class RunCodeIn(BaseModel):
    """SandboxFusion's RunCodeRequest (Python only; `files`/`fetch_files` must be empty)."""

    model_config = ConfigDict(extra="ignore")
    code: StrictStr
    language: StrictStr = "python"
    compile_timeout: float = 10
    run_timeout: float = Field(10, allow_inf_nan=False)
    memory_limit_MB: int = -1
    stdin: StrictStr | None = None
    files: dict[str, str | None] = Field(default_factory=dict)
    fetch_files: list[str] = Field(default_factory=list)


def _tests(spec: AssertIn | HumanEvalIn | StdioIn | CallIn) -> TestSpec:
    if isinstance(spec, AssertIn):
        return AssertTests(spec.code)
    if isinstance(spec, HumanEvalIn):
        return HumanEvalTests(spec.test, spec.entry_point)
    if isinstance(spec, StdioIn):
        return StdioTests(tuple(StdioCase(c.stdin, c.stdout) for c in spec.cases))
    return CallTests(spec.fn, tuple(CallCase(c.args, c.expected) for c in spec.cases))


def build_router(core: SandboxCore) -> APIRouter:
    router = APIRouter()

    @router.post("/v1/run", response_model=RunOut, tags=["sandbox"], responses=ERROR_RESPONSES)
    async def run(body: RunIn) -> JsonResponse:
        """Run a program against its tests; the verdict comes from the trusted harness."""
        try:
            result = await core.run(body.to_request())
        except SandboxFailure as exc:
            raise ApiError(503, str(exc)) from None
        return JsonResponse(result.to_dict())

    @router.post("/v1/run/batch", response_model=BatchOut, tags=["sandbox"], responses=ERROR_RESPONSES)
    async def run_batch(body: BatchIn) -> JsonResponse:
        """Many runs; results in request order, concurrency bounded by the worker pool."""
        try:
            results = await core.run_batch([r.to_request() for r in body.requests])
        except SandboxFailure as exc:
            raise ApiError(503, str(exc)) from None
        return JsonResponse({"results": [r.to_dict() for r in results]})

    @router.post("/run_code", tags=["sandboxfusion"], responses=ERROR_RESPONSES)
    async def run_code(body: RunCodeIn) -> JsonResponse:
        """SandboxFusion-compatible subset: run Python code as a script (with stdin)."""
        if body.language not in LANGUAGES:
            raise ApiError(422, f"language {body.language!r} is not supported: only python")
        if body.files or body.fetch_files:
            raise ApiError(422, "files and fetch_files are not supported")
        timeout = body.run_timeout if body.run_timeout > 0 else None
        memory = body.memory_limit_MB if body.memory_limit_MB > 0 else None
        try:
            run = await core.run_script(body.code, body.stdin or "", timeout, memory)
        except SandboxFailure as exc:
            return JsonResponse(
                {"status": "SandboxError", "message": str(exc), "compile_result": None, "run_result": None}
            )
        return JsonResponse(fusion_response(run, body.code))

    @router.get("/v1/info", tags=["sandbox"])
    async def info() -> JsonResponse:
        """Isolation layers active on this machine and the limits a client must respect."""
        s = core.settings
        return JsonResponse(
            {
                "workers": s.workers,
                "worker_queue": s.worker_queue,  # jobs in flight at most: workers x worker_queue
                "huge_pages_kib": core.pool.huge_kib(),  # per worker, as started (hugepages.py)
                "runner": core.pool.runners(),  # per worker: "C (...)" or "Python (why)" (native.py)
                "isolation": [
                    {"name": layer.name, "active": layer.active, "detail": layer.detail}
                    for layer in core.pool.layers
                ],
                "limits": {
                    "default_timeout_s": s.default_timeout_s,
                    "max_timeout_s": s.max_timeout_s,
                    "default_memory_mb": s.default_memory_mb,
                    "min_memory_mb": s.min_memory_mb,
                    "max_memory_mb": s.max_memory_mb,
                    "max_code_bytes": s.max_code_bytes,
                    "max_test_bytes": s.max_test_bytes,
                    "max_cases": s.max_cases,
                    "max_batch": s.max_batch,
                    "max_queue": s.max_queue,
                    "output_limit_bytes": s.output_limit_bytes,
                    "max_request_bytes": s.max_request_bytes,
                },
            }
        )

    return router


def create_app(core: SandboxCore, registry: CollectorRegistry, token: str | None) -> FastAPI:
    app = FastAPI(
        title="psgpo sandbox",
        version="1",
        description="Runs untrusted Python against unit tests; the verdict comes from a trusted harness.",
        default_response_class=JsonResponse,
    )
    app.include_router(build_router(core))
    install_common(app, registry, "sandbox", core.settings.max_request_bytes, token, core.serving, core.full)
    refresh_known_paths(app)
    return app
