"""Run one service: FastAPI on uvicorn and grpc.aio in ONE process and ONE event loop.

`serve_blocking` is what `psgpo serve ...` calls (SIGINT/SIGTERM stop it cleanly);
`start_in_thread` runs the same thing on a background thread for tests and benchmarks (port 0).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import socket
import threading
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from typing import Protocol

import grpc
import uvicorn
from fastapi import FastAPI

log = logging.getLogger(__name__)


class Service(Protocol):
    """What a service factory returns: an HTTP app, a gRPC server, and lifecycle hooks."""

    app: FastAPI
    grpc_server: grpc.aio.Server
    grpc_port: int

    async def start(self) -> None: ...

    async def stop(self) -> None: ...


class _QuietServer(uvicorn.Server):
    """uvicorn without its own signal handlers: the runner owns shutdown."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


def bind_tcp(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise OSError(f"cannot bind HTTP to {host}:{port}: {exc.strerror}") from None
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


@dataclass
class Running:
    http_port: int
    grpc_port: int
    stop_event: asyncio.Event
    loop: asyncio.AbstractEventLoop
    thread: threading.Thread | None = None
    service: Service | None = None
    errors: list[BaseException] = field(default_factory=list)

    def stop(self, timeout: float = 30.0) -> None:
        if self.loop.is_closed():
            return
        self.loop.call_soon_threadsafe(self.stop_event.set)
        if self.thread is not None:
            self.thread.join(timeout)


async def run_service(
    make_service: Callable[[], Awaitable[Service]],
    host: str,
    http_port: int,
    on_ready: Callable[[Running], None],
    stop_event: asyncio.Event,
) -> None:
    sock = bind_tcp(host, http_port)
    service = await make_service()
    tls = getattr(service, "tls", None)  # (certificate, key): HTTPS, as the factory's gRPC port
    ssl = {"ssl_certfile": str(tls[0]), "ssl_keyfile": str(tls[1])} if tls else {}
    config = uvicorn.Config(service.app, log_level="warning", lifespan="off", access_log=False, **ssl)
    http = _QuietServer(config)
    await service.start()
    await service.grpc_server.start()
    http_task = asyncio.create_task(http.serve(sockets=[sock]))
    while not http.started and not http_task.done():
        await asyncio.sleep(0.005)
    if http_task.done():
        await service.grpc_server.stop(None)
        await service.stop()
        http_task.result()
        raise RuntimeError("HTTP server exited during start-up")
    running = Running(sock.getsockname()[1], service.grpc_port, stop_event, asyncio.get_running_loop())
    running.service = service
    on_ready(running)
    try:
        await stop_event.wait()
    finally:
        http.should_exit = True
        await service.grpc_server.stop(grace=2.0)
        await http_task
        await service.stop()
        sock.close()


def serve_blocking(
    make_service: Callable[[], Awaitable[Service]],
    host: str,
    http_port: int,
    name: str,
    use_uvloop: bool = True,
) -> None:
    """Serve until SIGINT/SIGTERM; log one line with the bound ports when ready."""

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)

        def ready(r: Running) -> None:
            log.info("%s ready: http=%s:%d grpc=%s:%d", name, host, r.http_port, host, r.grpc_port)
            print(f"{name} listening http={host}:{r.http_port} grpc={host}:{r.grpc_port}", flush=True)

        await run_service(make_service, host, http_port, ready, stop)
        log.info("%s stopped", name)

    if use_uvloop:
        try:
            import uvloop

            uvloop.run(main())
            return
        except ImportError:
            pass
    asyncio.run(main())


def start_in_thread(
    make_service: Callable[[], Awaitable[Service]], host: str = "127.0.0.1", timeout: float = 120.0
) -> Running:
    """Start a service on a background thread (port 0 for HTTP; the factory picks gRPC's)."""
    box: dict[str, Running] = {}
    started = threading.Event()
    errors: list[BaseException] = []

    def target() -> None:
        async def main() -> None:
            stop = asyncio.Event()

            def ready(r: Running) -> None:
                box["r"] = r
                started.set()

            await run_service(make_service, host, 0, ready, stop)

        try:
            asyncio.run(main())
        except BaseException as exc:  # surfaced to the caller below
            errors.append(exc)
            started.set()

    thread = threading.Thread(target=target, name="psgpo-service", daemon=True)
    thread.start()
    if not started.wait(timeout):
        raise TimeoutError("service did not start in time")
    if errors:
        raise errors[0]
    running = box["r"]
    running.thread = thread
    running.errors = errors
    return running
