"""HTTP routes (FastAPI): thin adapters over PrmCore."""

from __future__ import annotations

from typing import Literal

from fastapi import APIRouter, FastAPI, Request
from pydantic import BaseModel, ConfigDict, Field
from pydantic import StrictStr as Str

from services.common.http_util import ERROR_RESPONSES, JSONBytes
from services.prm.core import PrmCore


class ScoreItem(BaseModel):
    prompt: Str = Field(description="the prompt the response answers (may be empty)")
    response: Str = Field(description="the program to score, lines separated by \\n")


class ScoreRequest(BaseModel):
    items: list[ScoreItem]
    aggregate: Literal["min", "mean", "last"] = "min"


class LineOut(BaseModel):
    line: int = Field(description="0-based line number in the response")
    start: int = Field(description="character offset of the line start in the response")
    end: int = Field(description="character offset one past the line end (newline excluded)")
    token_index: int = Field(description="response-token position where the line's reward lands")
    score: float | None = Field(description="null for neutral lines (blank or comment-only)")


class ItemOut(BaseModel):
    score: float | None = Field(description="aggregate over scored lines; null when there are none")
    num_tokens: int
    lines: list[LineOut]


class ScoreResponse(BaseModel):
    model: str
    results: list[ItemOut]


class RewardRequest(BaseModel):
    """OpenRLHF remote reward model request; extra fields (e.g. labels) are accepted and ignored."""

    model_config = ConfigDict(extra="ignore")
    query: list[Str] = Field(description="full sequences: prompt + response")
    prompts: list[Str] = Field(default_factory=list, description="the prompt of each query")


class RewardResponse(BaseModel):
    rewards: list[float]
    scores: list[float]
    extra_logs: dict[str, list[float]]


def build_router(core: PrmCore) -> APIRouter:
    router = APIRouter(strict_content_type=False)

    @router.post("/v1/score", response_model=ScoreResponse, tags=["prm"], responses=ERROR_RESPONSES)
    async def score(req: ScoreRequest) -> JSONBytes:
        """Score every line of each response from one forward pass per response."""
        results = await core.score([(it.prompt, it.response) for it in req.items], req.aggregate)
        body = {
            "model": core.model_name,
            "results": [
                {
                    "score": r.score,
                    "num_tokens": r.num_tokens,
                    "lines": [
                        {
                            "line": x.line,
                            "start": x.start,
                            "end": x.end,
                            "token_index": x.token_index,
                            "score": x.score,
                        }
                        for x in r.lines
                    ],
                }
                for r in results
            ],
        }
        return JSONBytes(body)

    @router.post("/get_reward", response_model=RewardResponse, tags=["openrlhf"], responses=ERROR_RESPONSES)
    async def get_reward(req: RewardRequest) -> JSONBytes:
        """OpenRLHF's remote reward protocol: one scalar per query (the configured line aggregate)."""
        rewards = await core.get_reward(req.query, req.prompts)
        return JSONBytes({"rewards": rewards, "scores": rewards, "extra_logs": {}})

    @router.get("/v1/info", tags=["prm"])
    async def info(_: Request) -> JSONBytes:
        """The loaded model and the limits a client must respect."""
        s = core.settings
        return JSONBytes(
            {
                "model": core.model_name,
                "parameters": core.scorer.parameters,
                "device": core.scorer.device,
                "max_length": core.scorer.max_length,
                "max_items_per_request": s.max_items_per_request,
                "max_batch_tokens": s.max_batch_tokens,
                "reward_aggregate": s.reward_aggregate,
            }
        )

    return router


def create_app(core: PrmCore, registry, token: str | None) -> FastAPI:  # registry: CollectorRegistry
    from services.common.http_util import install_common, refresh_known_paths

    app = FastAPI(
        title="psgpo PRM service",
        version="1",
        description="Process reward model: one score per response line, from one forward pass.",
        default_response_class=JSONBytes,
        strict_content_type=False,
    )
    app.include_router(build_router(core))
    install_common(
        app, registry, "prm", core.settings.max_request_bytes, token, lambda: core.ready, core.batcher.full
    )
    refresh_known_paths(app)
    return app
