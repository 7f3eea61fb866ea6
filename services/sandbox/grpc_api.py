"""gRPC servicer (grpc.aio): thin adapter over SandboxCore."""

from __future__ import annotations

import grpc

from psgpo.v1 import sandbox_pb2 as pb
from psgpo.v1 import sandbox_pb2_grpc
from services.common.errors import RequestError
from services.sandbox.convert import request_from_pb, result_to_pb
from services.sandbox.core import SandboxCore, SandboxFailure


class SandboxServicer(sandbox_pb2_grpc.SandboxServiceServicer):
    def __init__(self, core: SandboxCore) -> None:
        self.core = core

    async def Run(self, request: pb.RunRequest, context: grpc.aio.ServicerContext) -> pb.RunResult:
        try:
            result = await self.core.run(request_from_pb(request))
        except RequestError as exc:
            await context.abort(getattr(grpc.StatusCode, exc.grpc_code), exc.message)
        except SandboxFailure as exc:
            await context.abort(grpc.StatusCode.UNAVAILABLE, str(exc))
        return result_to_pb(result)

    async def RunBatch(
        self, request: pb.RunBatchRequest, context: grpc.aio.ServicerContext
    ) -> pb.RunBatchResponse:
        try:
            requests = [request_from_pb(r, f"requests[{i}].") for i, r in enumerate(request.requests)]
            results = await self.core.run_batch(requests)
        except RequestError as exc:
            await context.abort(getattr(grpc.StatusCode, exc.grpc_code), exc.message)
        except SandboxFailure as exc:
            await context.abort(grpc.StatusCode.UNAVAILABLE, str(exc))
        return pb.RunBatchResponse(results=[result_to_pb(r) for r in results])
