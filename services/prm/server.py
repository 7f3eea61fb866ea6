"""The PRM service factory: one process, one event loop, HTTP and gRPC sharing one PrmCore."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import grpc
from fastapi import FastAPI
from prometheus_client import CollectorRegistry

from psgpo.v1 import prm_pb2, prm_pb2_grpc
from services.common.grpc_util import build_server, set_serving
from services.common.logs import setup_logging
from services.common.runner import serve_blocking
from services.prm.config import PrmSettings
from services.prm.core import PrmCore
from services.prm.grpc_api import PrmServicer
from services.prm.http_api import create_app
from services.prm.scorer import PrmScorer

log = logging.getLogger(__name__)
SERVICE_NAME = prm_pb2.DESCRIPTOR.services_by_name["PrmService"].full_name


@dataclass
class PrmService:
    core: PrmCore
    app: FastAPI
    grpc_server: grpc.aio.Server
    grpc_port: int
    health: object
    tls: tuple[Path, Path] | None = None  # HTTPS + gRPC TLS (certificate, key)

    async def start(self) -> None:
        await self.core.start()
        await set_serving(self.health, [SERVICE_NAME], True)

    async def stop(self) -> None:
        await set_serving(self.health, [SERVICE_NAME], False)
        await self.core.stop()


def load_scorer(settings: PrmSettings) -> PrmScorer:
    from services.common.errors import UserError

    if settings.model is None:
        raise UserError("no PRM given: pass --model DIR or set PRM_MODEL")
    if settings.backend == "vllm":
        from services.prm.scorer_vllm import VllmPrmScorer

        return VllmPrmScorer(
            settings.model,
            dtype=settings.dtype,
            max_length=settings.max_length,
            gpu_memory_utilization=settings.gpu_memory_utilization,
            tensor_parallel_size=settings.tensor_parallel_size,
        )
    return PrmScorer(settings.model, settings.device, settings.dtype, settings.threads, settings.max_length)


def make_factory(settings: PrmSettings, scorer: PrmScorer | None = None):
    """Returns an async factory building the service; the model is loaded once, before serving."""
    token = settings.token()
    tls = settings.tls()
    loaded = scorer or load_scorer(settings)

    async def factory() -> PrmService:
        registry = CollectorRegistry()
        core = PrmCore(loaded, settings, registry)
        app = create_app(core, registry, token)
        server, port, health = build_server(
            [lambda s: prm_pb2_grpc.add_PrmServiceServicer_to_server(PrmServicer(core), s)],
            [SERVICE_NAME],
            settings.host,
            settings.grpc_port,
            token,
            settings.max_request_bytes,
            tls,
        )
        return PrmService(core, app, server, port, health, tls)

    return factory


def serve(settings: PrmSettings) -> None:
    setup_logging(settings.log_level, "prm")
    scorer = load_scorer(settings)
    log.info(
        "loaded PRM %s (%s parameters) on %s, max length %d, auth %s",
        scorer.name,
        f"{scorer.parameters:,}",
        scorer.device,
        scorer.max_length,
        "on" if settings.token() else "off",
    )
    serve_blocking(make_factory(settings, scorer), settings.host, settings.http_port, "prm")
