"""The scoring operations both transports expose (no grpc/fastapi imports).

`PrmCore.score` validates a request, tokenizes it off the event loop, queues its items on the
dynamic batcher and assembles per-line results. Errors are `services.common.errors` types that the
HTTP and gRPC layers map to 4xx / status codes.
"""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from services.common.errors import InvalidInput, TooLarge
from services.prm.batcher import BatchStats, DynamicBatcher
from services.prm.config import PrmSettings
from services.prm.scorer import Prepared, PrmScorer, Scored, aggregate

AGGREGATES = ("min", "mean", "last")
INLINE_PREPARE_CHARS = 16_384  # tokenize on the event loop below this (~0.5 ms), on a thread above


@dataclass(slots=True)
class LineResult:
    line: int
    start: int
    end: int
    token_index: int
    score: float | None


@dataclass(slots=True)
class ItemResult:
    score: float | None
    num_tokens: int
    lines: list[LineResult]
    last_token_score: float


class PrmMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.items = Counter("prm_items_total", "items scored", registry=registry)
        self.tokens = Counter("prm_tokens_total", "tokens through the model", registry=registry)
        self.rejected = Counter("prm_rejected_total", "refused requests", ["reason"], registry=registry)
        self.queue_depth = Gauge("prm_queue_depth", "items waiting for a batch", registry=registry)
        self.batch_items = Histogram(
            "prm_batch_items",
            "items per forward batch",
            registry=registry,
            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512),
        )
        self.batch_fill = Histogram(
            "prm_batch_fill_ratio",
            "real tokens / padded tokens per batch",
            registry=registry,
            buckets=(0.1, 0.25, 0.5, 0.75, 0.9, 1.0),
        )
        self.forward_seconds = Histogram(
            "prm_forward_seconds",
            "model time per batch",
            registry=registry,
            buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
        )
        self.tokens_per_second = Gauge(
            "prm_tokens_per_second", "tokens/s of the last batch", registry=registry
        )

    def batch(self, n: int, tokens: int, padded: float, seconds: float) -> None:
        self.items.inc(n)
        self.tokens.inc(tokens)
        self.batch_items.observe(n)
        self.batch_fill.observe(tokens / padded if padded else 1.0)
        self.forward_seconds.observe(seconds)
        self.tokens_per_second.set(tokens / seconds if seconds > 0 else 0.0)


class PrmCore:
    def __init__(self, scorer: PrmScorer, settings: PrmSettings, registry: CollectorRegistry) -> None:
        self.scorer = scorer
        self.settings = settings
        self.metrics = PrmMetrics(registry)
        self.batcher: DynamicBatcher[Prepared, Scored] = DynamicBatcher(
            scorer.forward,
            max_batch_tokens=settings.max_batch_tokens,
            max_wait_s=settings.max_wait_ms / 1000.0,
            max_queue_items=settings.max_queue_items,
            stats=BatchStats(on_batch=self.metrics.batch, on_depth=self.metrics.queue_depth.set),
            executor=scorer.thread,
        )
        self._prep = ThreadPoolExecutor(max_workers=1, thread_name_prefix="prm-tokenize")
        self.ready = False

    @property
    def model_name(self) -> str:
        return self.scorer.name

    async def start(self) -> None:
        self.batcher.start()
        self.ready = True

    async def stop(self) -> None:
        self.ready = False
        await self.batcher.stop()
        self._prep.shutdown(wait=True)

    def _check_count(self, n: int) -> None:
        if n == 0:
            self.metrics.rejected.labels("empty").inc()
            raise InvalidInput("items must not be empty")
        if n > self.settings.max_items_per_request:
            self.metrics.rejected.labels("too_many_items").inc()
            raise TooLarge(f"{n} items exceed the limit of {self.settings.max_items_per_request} per request")

    async def _run(self, items: list[tuple[str, str]]) -> tuple[list[Prepared], list[Scored]]:
        loop = asyncio.get_running_loop()
        try:
            if sum(len(p) + len(r) for p, r in items) <= INLINE_PREPARE_CHARS:
                prepared = self.scorer.prepare(items)  # small: a thread hop would cost more than it saves
            else:
                prepared = await loop.run_in_executor(self._prep, self.scorer.prepare, items)
        except TooLarge:
            self.metrics.rejected.labels("too_long").inc()
            raise
        except InvalidInput:
            self.metrics.rejected.labels("invalid").inc()
            raise
        try:
            scored = await self.batcher.submit(prepared)
        except Exception:
            self.metrics.rejected.labels("overloaded_or_unavailable").inc()
            raise
        return prepared, scored

    async def score(self, items: list[tuple[str, str]], how: str = "min") -> list[ItemResult]:
        if how not in AGGREGATES:
            raise InvalidInput(f"aggregate must be one of {', '.join(AGGREGATES)}")
        self._check_count(len(items))
        prepared, scored = await self._run(items)
        results = []
        for prep, out in zip(prepared, scored, strict=True):
            lines = [
                LineResult(line.index, line.start, line.end, tok, s)
                for line, tok, s in zip(prep.lines, prep.token_index, out.line_scores, strict=True)
            ]
            results.append(
                ItemResult(aggregate(out.line_scores, how), prep.num_tokens, lines, out.last_token_score)
            )
        return results

    async def get_reward(self, queries: list[str], prompts: list[str]) -> list[float]:
        """OpenRLHF remote RM: query = prompt + response. One float per query.

        The reward is the configured aggregate of the line scores; a response with no scored line
        (empty or all comments) gets the model's output at its final token, which is what a
        sequence-level reward model returns.
        """
        if prompts and len(prompts) != len(queries):
            raise InvalidInput(f"prompts has {len(prompts)} entries, query has {len(queries)}")
        items = []
        for i, query in enumerate(queries):
            prompt = prompts[i] if prompts else ""
            if not isinstance(query, str) or not isinstance(prompt, str):
                raise InvalidInput(f"query[{i}] and prompts[{i}] must be strings")
            if not query.startswith(prompt):
                raise InvalidInput(f"query[{i}] does not start with prompts[{i}]")
            items.append((prompt, query[len(prompt) :]))
        results = await self.score(items, self.settings.reward_aggregate)
        return [r.score if r.score is not None else r.last_token_score for r in results]
