"""The sandbox service factory: one process and event loop serving HTTP and gRPC over one SandboxCore
and its pool of worker processes. `serve` is what `psgpo serve sandbox` calls."""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from fastapi import FastAPI
from grpc_health.v1.health import aio as health_aio
from prometheus_client import CollectorRegistry

from psgpo.v1 import sandbox_pb2, sandbox_pb2_grpc
from services.common.errors import UserError
from services.common.grpc_util import build_server, set_serving
from services.common.logs import setup_logging
from services.common.runner import serve_blocking
from services.sandbox.config import SandboxSettings
from services.sandbox.core import SandboxCore
from services.sandbox.grpc_api import SandboxServicer
from services.sandbox.http_api import create_app

log = logging.getLogger(__name__)
SERVICE_NAME = sandbox_pb2.DESCRIPTOR.services_by_name["SandboxService"].full_name
HEALTH_POLL_S = 0.5  # how often the gRPC health status is matched to the pool (no worker alive: not serving)


@dataclass
class SandboxService:
    core: SandboxCore
    app: FastAPI
    grpc_server: grpc.aio.Server
    grpc_port: int
    health: health_aio.HealthServicer
    tls: tuple[Path, Path] | None = None  # HTTPS + gRPC TLS (certificate, key)
    _health_watch: asyncio.Task[None] | None = field(default=None, repr=False)

    async def start(self) -> None:
        await self.core.start()
        log_isolation(self.core)
        await set_serving(self.health, [SERVICE_NAME], True)
        self._health_watch = asyncio.create_task(self._follow_pool())

    async def stop(self) -> None:
        if self._health_watch is not None:
            self._health_watch.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._health_watch
        await set_serving(self.health, [SERVICE_NAME], False)
        await self.core.stop()

    async def _follow_pool(self) -> None:
        """gRPC health says what HTTP /readyz says (core.serving): not serving while no worker is
        alive, e.g. while every restart is being retried."""
        serving = True
        while True:
            await asyncio.sleep(HEALTH_POLL_S)
            now = self.core.serving()
            if now != serving:
                await set_serving(self.health, [SERVICE_NAME], now)
                serving = now


def log_isolation(core: SandboxCore) -> None:
    layers = core.pool.layers
    for layer in layers:
        if layer.active:
            log.info("isolation on:  %-17s %s", layer.name, layer.detail)
        else:
            log.warning("isolation OFF: %-17s %s", layer.name, layer.detail)
    active = sum(layer.active for layer in layers)
    log.info("sandbox: %d workers, %d/%d isolation layers active", core.settings.workers, active, len(layers))


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_exposure(settings: SandboxSettings) -> None:
    """Running arbitrary code for anyone who can reach the port needs a token, unless asked not to."""
    if is_loopback(settings.host) or settings.token() or settings.allow_insecure_public:
        return
    raise UserError(
        f"refusing to serve the sandbox on {settings.host} without an auth token: set SANDBOX_AUTH_TOKEN "
        "(or SANDBOX_AUTH_TOKEN_FILE), bind to 127.0.0.1, or pass --allow-insecure-public"
    )


def make_factory(settings: SandboxSettings) -> Callable[[], Awaitable[SandboxService]]:
    check_exposure(settings)
    token = settings.token()
    tls = settings.tls()

    async def factory() -> SandboxService:
        registry = CollectorRegistry()
        core = SandboxCore(settings, registry)
        app = create_app(core, registry, token)
        server, port, health = build_server(
            [lambda s: sandbox_pb2_grpc.add_SandboxServiceServicer_to_server(SandboxServicer(core), s)],
            [SERVICE_NAME],
            settings.host,
            settings.grpc_port,
            token,
            settings.max_request_bytes,
            tls,
        )
        return SandboxService(core, app, server, port, health, tls)

    return factory


def serve(settings: SandboxSettings) -> None:
    setup_logging(settings.log_level, "sandbox")
    log.info("auth %s, host %s", "on" if settings.token() else "off", settings.host)
    serve_blocking(make_factory(settings), settings.host, settings.http_port, "sandbox")
