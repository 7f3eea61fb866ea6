"""Dynamic batching across concurrent requests (no transport, no torch).

Items from all requests wait in one pool. When the model thread is free, a batch is formed: the
oldest item first (so nothing starves), then the waiting items closest to it in length, while the
padded size (longest item x count) stays within the token budget. With `max_wait_s` > 0 the batcher
waits up to that long for more items before running a batch that is not full; with 0 it runs at
once, and batches grow naturally while the previous forward is running.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Generic, Protocol, TypeVar

from services.common.errors import Overloaded, TooLarge, Unavailable


class Sized(Protocol):
    @property
    def num_tokens(self) -> int: ...


In = TypeVar("In", bound=Sized)
Out = TypeVar("Out")


@dataclass(slots=True)
class _Job(Generic[In, Out]):
    item: In
    future: asyncio.Future[Out]
    enqueued: float = field(default_factory=time.perf_counter)


@dataclass
class BatchStats:
    """Observed by the service's metrics (set as callbacks)."""

    on_batch: Callable[[int, int, float, float], None] = lambda n, tokens, padded, seconds: None
    on_depth: Callable[[int], None] = lambda depth: None


class DynamicBatcher(Generic[In, Out]):
    def __init__(
        self,
        run_batch: Callable[[list[In]], Sequence[Out]],
        max_batch_tokens: int,
        max_wait_s: float = 0.0,
        max_queue_items: int = 4096,
        stats: BatchStats | None = None,
        executor: ThreadPoolExecutor | None = None,
    ) -> None:
        self._run_batch = run_batch
        self.max_batch_tokens = max_batch_tokens
        self.max_wait_s = max_wait_s
        self.max_queue_items = max_queue_items
        self.stats = stats or BatchStats()
        self._pool: list[_Job[In, Out]] = []
        self._wakeup = asyncio.Event()
        self._own_executor = executor is None
        self._executor = executor or ThreadPoolExecutor(max_workers=1, thread_name_prefix="batch-runner")
        self._task: asyncio.Task[None] | None = None
        self._closing = False

    @property
    def depth(self) -> int:
        return len(self._pool)

    def start(self) -> None:
        self._task = asyncio.create_task(self._loop(), name="prm-batcher")

    async def stop(self) -> None:
        self._closing = True
        self._wakeup.set()
        if self._task is not None:
            await self._task
        for job in self._pool:
            if not job.future.done():
                job.future.set_exception(Unavailable("server is shutting down"))
        self._pool.clear()
        if self._own_executor:
            self._executor.shutdown(wait=True)

    def full(self) -> bool:
        """No item fits in the queue now."""
        return len(self._pool) >= self.max_queue_items

    async def submit(self, items: Sequence[In]) -> list[Out]:
        """Queue all items of one request; results come back in order. Raises Overloaded when full."""
        if self._closing or self._task is None:
            raise Unavailable("server is not accepting requests")
        if len(items) > self.max_queue_items:
            raise TooLarge(f"{len(items)} items exceed the queue capacity of {self.max_queue_items}")
        if len(self._pool) + len(items) > self.max_queue_items:
            raise Overloaded(f"queue full ({len(self._pool)} items waiting); retry later")
        loop = asyncio.get_running_loop()
        jobs = [_Job[In, Out](item, loop.create_future()) for item in items]
        self._pool.extend(jobs)
        self.stats.on_depth(len(self._pool))
        self._wakeup.set()
        try:
            return list(await asyncio.gather(*(job.future for job in jobs)))
        except asyncio.CancelledError:  # client went away: drop its queued items
            for job in jobs:
                job.future.cancel()
            raise

    def _take_batch(self) -> list[_Job[In, Out]]:
        self._pool = [job for job in self._pool if not job.future.done()]
        if not self._pool:
            return []
        seed = self._pool[0]
        rest = sorted(self._pool[1:], key=lambda j: abs(j.item.num_tokens - seed.item.num_tokens))
        batch, width = [seed], seed.item.num_tokens
        for job in rest:
            new_width = max(width, job.item.num_tokens)
            if new_width * (len(batch) + 1) > self.max_batch_tokens:
                continue
            batch.append(job)
            width = new_width
        chosen = {id(job) for job in batch}
        self._pool = [job for job in self._pool if id(job) not in chosen]
        return batch

    def _pending_tokens(self) -> int:
        return max((j.item.num_tokens for j in self._pool), default=0) * len(self._pool)

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while not self._closing:
            if not self._pool:
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            if self.max_wait_s > 0:
                deadline = self._pool[0].enqueued + self.max_wait_s
                while self._pending_tokens() < self.max_batch_tokens and not self._closing:
                    remaining = deadline - time.perf_counter()
                    if remaining <= 0:
                        break
                    self._wakeup.clear()
                    try:
                        await asyncio.wait_for(self._wakeup.wait(), remaining)
                    except TimeoutError:
                        break
            batch = self._take_batch()
            self.stats.on_depth(len(self._pool))
            if not batch:
                continue
            items = [job.item for job in batch]
            t0 = time.perf_counter()
            try:
                outputs = await loop.run_in_executor(self._executor, self._run_batch, items)
            except Exception as exc:  # a failed forward fails its requests, not the server
                for job in batch:
                    if not job.future.done():
                        job.future.set_exception(exc)
                continue
            seconds = time.perf_counter() - t0
            width = max(item.num_tokens for item in items)
            self.stats.on_batch(len(items), sum(i.num_tokens for i in items), width * len(items), seconds)
            for job, out in zip(batch, outputs, strict=True):
                if not job.future.done():
                    job.future.set_result(out)
