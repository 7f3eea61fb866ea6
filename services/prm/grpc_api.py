"""gRPC servicer (grpc.aio): thin adapter over PrmCore."""

from __future__ import annotations

import grpc

from psgpo.v1 import prm_pb2, prm_pb2_grpc
from services.common.errors import RequestError
from services.prm.core import PrmCore

AGGREGATE_NAMES = {
    prm_pb2.AGGREGATE_UNSPECIFIED: "min",
    prm_pb2.AGGREGATE_MIN: "min",
    prm_pb2.AGGREGATE_MEAN: "mean",
    prm_pb2.AGGREGATE_LAST: "last",
}


async def _abort(context: grpc.aio.ServicerContext, exc: RequestError) -> None:
    await context.abort(getattr(grpc.StatusCode, exc.grpc_code), exc.message)


class PrmServicer(prm_pb2_grpc.PrmServiceServicer):
    def __init__(self, core: PrmCore) -> None:
        self.core = core

    async def Score(
        self, request: prm_pb2.ScoreRequest, context: grpc.aio.ServicerContext
    ) -> prm_pb2.ScoreResponse:
        how = AGGREGATE_NAMES.get(request.aggregate)
        if how is None:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"unknown aggregate {request.aggregate}")
        try:
            results = await self.core.score([(it.prompt, it.response) for it in request.items], how)
        except RequestError as exc:
            await _abort(context, exc)
        out = prm_pb2.ScoreResponse(model=self.core.model_name)
        for r in results:
            item = out.results.add(num_tokens=r.num_tokens)
            if r.score is not None:
                item.score = r.score
            for x in r.lines:
                line = item.lines.add(line=x.line, start=x.start, end=x.end, token_index=x.token_index)
                if x.score is not None:
                    line.score = x.score
        return out

    async def GetReward(
        self, request: prm_pb2.RewardRequest, context: grpc.aio.ServicerContext
    ) -> prm_pb2.RewardResponse:
        try:
            rewards = await self.core.get_reward(list(request.query), list(request.prompts))
        except RequestError as exc:
            await _abort(context, exc)
        return prm_pb2.RewardResponse(rewards=rewards, scores=rewards)
