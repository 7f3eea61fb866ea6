"""Sandbox service settings (env prefix SANDBOX_). Limits in requests are clamped to the maxima here."""

from __future__ import annotations

import os
from pathlib import Path

from pydantic import Field, model_validator
from pydantic_settings import SettingsConfigDict

from services.common.settings import ServiceSettings
from services.sandbox.testruntime import NOT_SHADOWED

# Imported once by every worker, so a run costs a fork and not these imports: what model-written
# solutions commonly import (and what the worker imports anyway: json, dataclasses, array ...). Every
# preloaded module also makes every run's fork and exit dearer (its memory and mappings), so the rarely
# used ones (decimal, fractions, statistics, datetime, calendar, cmath, hashlib, unicodedata, zlib,
# base64, queue ...) are not preloaded: a run that imports one pays 0.6-4.6 ms once, every other run
# saves ~3% of its CPU (docs/sandbox.md, Performance). Test code gets private copies of these when it
# imports them, preloaded or not (testruntime.LAZY_SHADOWS).
PRELOAD = [
    "abc", "array", "bisect", "collections", "collections.abc", "contextlib", "copy", "dataclasses",
    "enum", "functools", "heapq", "io", "itertools", "json", "math", "operator", "random", "re",
    "string", "struct", "textwrap", "time", "types", "typing", "weakref",
]  # fmt: skip


def _cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


class SandboxSettings(ServiceSettings):
    model_config = SettingsConfigDict(env_prefix="SANDBOX_", extra="ignore", validate_default=True)

    http_port: int = Field(8002, ge=0, le=65535)
    grpc_port: int = Field(50052, ge=0, le=65535)
    max_request_bytes: int = Field(64 * 1024 * 1024, gt=0, description="largest request body (413 above)")
    workers: int = Field(default_factory=_cores, ge=1, le=512, description="concurrent runs (processes)")
    worker_queue: int = Field(
        2, ge=1, le=8, description="jobs sent ahead to each worker, which starts the next at once (1: none)"
    )
    allow_insecure_public: bool = Field(False, description="allow a non-loopback bind without an auth token")

    # limits a request may ask for (clamped to these) and their defaults
    default_timeout_s: float = Field(10.0, gt=0, le=3600)
    max_timeout_s: float = Field(60.0, gt=0, le=3600)
    default_memory_mb: int = Field(512, gt=0)
    min_memory_mb: int = Field(64, gt=0, description="smaller requests are raised to this")
    max_memory_mb: int = Field(4096, gt=0)
    max_code_bytes: int = Field(512 * 1024, gt=0, description="program size (413 above)")
    max_test_bytes: int = Field(16 * 1024 * 1024, gt=0, description="test code or cases size (413 above)")
    max_cases: int = Field(1000, gt=0, description="stdio / call cases per request (413 above)")
    max_batch: int = Field(1024, gt=0, description="requests per batch (413 above)")
    max_queue: int = Field(4096, gt=0, description="runs waiting for a worker before 429")

    # per run, fixed by the server
    output_limit_bytes: int = Field(1024 * 1024, gt=0, description="stdout / stderr cap per run")
    return_output_bytes: int = Field(16 * 1024, ge=0, description="stdout / stderr returned per response")
    file_size_mb: int = Field(16, gt=0, description="largest file a run may write")
    open_files: int = Field(256, ge=16)
    processes: int = Field(64, ge=1, description="processes and threads per run (separate uid only)")
    disk_mb: int = Field(256, gt=0, description="tmpfs per worker holding its run dirs")
    max_inodes: int = Field(16384, gt=0)
    float_rel_tol: float = Field(1e-6, ge=0)
    float_abs_tol: float = Field(1e-9, ge=0)

    # isolation switches (all on by default; off only to diagnose a kernel that refuses one)
    separate_uid: bool = Field(True, description="run each slot as its own unprivileged uid (root only)")
    run_uid_base: int | None = Field(
        None,
        ge=1,
        le=2**31 - 4096,
        description="slot i runs as uid/gid base+i (default: a free random block)",
    )
    namespaces: bool = True
    landlock: bool = True
    seccomp: bool = True
    work_dir: Path | None = Field(None, description="run dirs root (default: a fresh dir under /tmp)")
    preload: list[str] = Field(default_factory=lambda: list(PRELOAD))
    worker_start_timeout_s: float = Field(60.0, gt=0)

    # speed (docs/sandbox.md, "Where the time goes")
    warm_up: bool = Field(True, description="workers run canned jobs before serving: runs start specialised")
    pin_cpus: bool = Field(True, description="with workers == CPUs, worker i and its runs use CPU i only")
    precompile: bool = Field(True, description="the worker compiles a program (<= 64 KB) before the fork")
    native_runner: bool = Field(
        True, description="workers fork, isolate and watch runs in C when csrc/runner.c is built (native.py)"
    )
    huge_pages: bool = Field(True, description="the worker collapses its heap into 2 MB pages (hugepages.py)")

    @model_validator(mode="after")
    def _consistent(self) -> SandboxSettings:
        if self.default_timeout_s > self.max_timeout_s:
            raise ValueError("default_timeout_s exceeds max_timeout_s")
        if not self.min_memory_mb <= self.default_memory_mb <= self.max_memory_mb:
            raise ValueError("need min_memory_mb <= default_memory_mb <= max_memory_mb")
        return self

    def shadowed(self) -> list[str]:
        return [name for name in self.preload if name not in NOT_SHADOWED]
