"""`psgpo serve rollout`: one worker process (generation backend + Redis + sandbox/PRM clients)."""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Sequence

import redis
from prometheus_client import CollectorRegistry, start_http_server

from psgpo.v1 import sandbox_pb2
from services.common.errors import UserError
from services.common.logs import setup_logging
from services.common.streams import connect
from services.rollout.config import RolloutSettings
from services.rollout.worker import RolloutWorker

log = logging.getLogger(__name__)


class SandboxGrpcPort:
    """The worker's sandbox port over the sandbox service's async gRPC client."""

    def __init__(self, target: str, token: str | None, timeout_s: float) -> None:
        from services.sandbox.client import AsyncSandboxGrpcClient

        self.client = AsyncSandboxGrpcClient(target, token=token, timeout_s=timeout_s)

    async def run_many(self, requests: Sequence[sandbox_pb2.RunRequest]) -> list[sandbox_pb2.RunResult]:
        from services.sandbox.convert import request_from_pb, result_to_pb

        results = await self.client.run_batch([request_from_pb(r) for r in requests])
        return [result_to_pb(r) for r in results]


def check_settings(settings: RolloutSettings) -> None:
    try:
        settings.tokens()
    except (OSError, ValueError) as exc:
        raise UserError(f"cannot read a token: {exc}") from None
    if settings.policy is None:
        raise UserError("no policy given: pass --policy DIR or set ROLLOUT_POLICY")
    if not (settings.policy / "config.json").is_file():
        raise UserError(f"{settings.policy} is not a Hugging Face model dir (no config.json)")
    if settings.backend == "vllm":
        from services.rollout.backend_vllm import require_vllm

        require_vllm()  # one line before Redis is contacted or a model loaded


def build_backend(settings: RolloutSettings):  # -> GenerationBackend
    check_settings(settings)
    try:
        if settings.backend == "vllm":
            from services.rollout.backend_vllm import VllmBackend

            return VllmBackend(
                settings.policy,
                gpu_memory_utilization=settings.gpu_memory_utilization,
                tensor_parallel_size=settings.tensor_parallel_size,
            )
        from services.rollout.backend_hf import HfBackend

        return HfBackend(settings.policy, max_batch_sequences=settings.max_batch_sequences)
    except (OSError, ValueError) as exc:
        raise UserError(f"cannot load policy from {settings.policy}: {str(exc).splitlines()[0]}") from None


def connect_redis(url: str) -> redis.Redis:
    try:
        r = connect(url)
        r.ping()
    except (redis.RedisError, ValueError) as exc:
        raise UserError(f"cannot reach Redis at {url}: {exc}") from None
    return r


async def run_worker(
    settings: RolloutSettings,
    backend,  # GenerationBackend
    r: redis.Redis,
    stop: asyncio.Event,
    max_tasks: int | None = None,
    registry: CollectorRegistry | None = None,
) -> int:
    """Run one worker until `stop` (or `max_tasks`); clients live in this event loop."""
    from services.prm.client import AsyncPrmGrpcClient

    token, sandbox_token = settings.tokens()
    prm = AsyncPrmGrpcClient(settings.prm, token=token, retries=1) if settings.prm else None
    sandbox = SandboxGrpcPort(settings.sandbox, sandbox_token, settings.scoring_timeout_s)
    worker = RolloutWorker(settings, backend, sandbox, prm, r, registry)
    try:
        return await worker.run(stop, max_tasks)
    finally:
        if prm is not None:
            await prm.close()
        await sandbox.client.close()


def serve(settings: RolloutSettings) -> None:
    setup_logging(settings.log_level, "rollout")
    check_settings(settings)
    r = connect_redis(settings.redis_url)
    backend = build_backend(settings)
    registry = CollectorRegistry()
    if settings.metrics_port:
        start_http_server(settings.metrics_port, registry=registry)
    log.info(
        "rollout worker: policy %s, run %s, prm %s, sandbox %s",
        settings.policy, settings.run, settings.prm or "off", settings.sandbox,
    )  # fmt: skip

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        print(f"rollout worker ready run={settings.run}", flush=True)
        done = await run_worker(settings, backend, r, stop, registry=registry)
        log.info("rollout worker stopped after %d tasks", done)

    try:
        asyncio.run(main())
    finally:
        backend.close()
