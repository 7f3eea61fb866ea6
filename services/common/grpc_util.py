"""gRPC (grpc.aio) bootstrap shared by the services: auth interceptor, health, reflection, limits."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from services.common.auth import bearer_ok

OPEN_METHOD_PREFIXES = ("/grpc.health.v1.Health/", "/grpc.reflection.")


class AuthInterceptor(grpc.aio.ServerInterceptor):
    """Rejects calls without `authorization: Bearer <token>` metadata (health and reflection stay open)."""

    def __init__(self, token: str) -> None:
        self._token = token

        async def deny(_request: Any, context: grpc.aio.ServicerContext) -> None:
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or invalid bearer token")

        self._deny_unary = grpc.unary_unary_rpc_method_handler(deny)

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        if details.method.startswith(OPEN_METHOD_PREFIXES):
            return await continuation(details)
        header = dict(details.invocation_metadata or ()).get("authorization")
        if bearer_ok(header if isinstance(header, str) else None, self._token):
            return await continuation(details)
        handler = await continuation(details)
        if handler is not None and handler.response_streaming:

            async def deny_stream(_request: Any, context: grpc.aio.ServicerContext) -> None:
                await context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or invalid bearer token")

            return grpc.unary_stream_rpc_method_handler(deny_stream)
        return self._deny_unary


class _Undecodable:
    def __init__(self, error: Exception) -> None:
        self.error = error


class DecodeGuardInterceptor(grpc.aio.ServerInterceptor):
    """Bytes that do not parse as the request message get INVALID_ARGUMENT (grpc.aio would answer
    UNKNOWN and log a traceback)."""

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        if handler is None or handler.request_streaming or handler.request_deserializer is None:
            return handler
        decode = handler.request_deserializer

        def safe_decode(data: bytes) -> Any:
            try:
                return decode(data)
            except Exception as exc:  # DecodeError and friends
                return _Undecodable(exc)

        def guard(behavior: Callable[..., Any]) -> Callable[..., Any]:
            if handler.response_streaming:

                async def guarded_stream(request: Any, context: grpc.aio.ServicerContext) -> Any:
                    if isinstance(request, _Undecodable):
                        await context.abort(
                            grpc.StatusCode.INVALID_ARGUMENT, f"undecodable request: {request.error}"
                        )
                    async for item in behavior(request, context):
                        yield item

                return guarded_stream

            async def guarded(request: Any, context: grpc.aio.ServicerContext) -> Any:
                if isinstance(request, _Undecodable):
                    await context.abort(
                        grpc.StatusCode.INVALID_ARGUMENT, f"undecodable request: {request.error}"
                    )
                return await behavior(request, context)

            return guarded

        if handler.response_streaming:
            return handler._replace(
                request_deserializer=safe_decode, unary_stream=guard(handler.unary_stream)
            )
        return handler._replace(request_deserializer=safe_decode, unary_unary=guard(handler.unary_unary))


def build_server(
    register: Iterable[Callable[[grpc.aio.Server], None]],
    service_names: Iterable[str],
    host: str,
    port: int,
    token: str | None,
    max_message_bytes: int,
    tls: tuple[Path, Path] | None = None,
) -> tuple[grpc.aio.Server, int, health.aio.HealthServicer]:
    """An aio server with the given servicers, health checking and reflection, bound to host:port
    (over TLS when `tls` = (certificate PEM, key PEM) is given)."""
    interceptors: list[grpc.aio.ServerInterceptor] = [AuthInterceptor(token)] if token else []
    interceptors.append(DecodeGuardInterceptor())
    server = grpc.aio.server(
        interceptors=interceptors,
        options=[
            ("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.max_send_message_length", max(max_message_bytes, 64 * 1024 * 1024)),
            ("grpc.so_reuseport", 0),
        ],
    )
    for add in register:
        add(server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    names = list(service_names)
    reflection.enable_server_reflection([*names, health.SERVICE_NAME, reflection.SERVICE_NAME], server)
    if tls is None:
        bound = server.add_insecure_port(f"{host}:{port}")
    else:
        cert, key = tls
        credentials = grpc.ssl_server_credentials([(key.read_bytes(), cert.read_bytes())])
        bound = server.add_secure_port(f"{host}:{port}", credentials)
    if bound == 0:
        raise OSError(f"cannot bind gRPC to {host}:{port}")
    return server, bound, health_servicer


async def set_serving(health_servicer: health.aio.HealthServicer, names: Iterable[str], ok: bool) -> None:
    status = health_pb2.HealthCheckResponse.SERVING if ok else health_pb2.HealthCheckResponse.NOT_SERVING
    await health_servicer.set("", status)
    for name in names:
        await health_servicer.set(name, status)
