"""Dynamic batching: token budget, oldest-first, overload, results in order."""

from __future__ import annotations

import asyncio
import threading
from dataclasses import dataclass

import pytest

from services.common.errors import Overloaded
from services.prm.batcher import DynamicBatcher


@dataclass
class Item:
    num_tokens: int
    tag: int


class Recorder:
    def __init__(self, delay: float = 0.0) -> None:
        self.batches: list[list[int]] = []
        self.delay = delay
        self.gate = threading.Event()
        self.gate.set()

    def __call__(self, items: list[Item]) -> list[int]:
        self.gate.wait(5)
        self.batches.append([i.tag for i in items])
        if self.delay:
            threading.Event().wait(self.delay)
        return [i.tag * 10 for i in items]


async def test_results_in_order_and_budget_respected():
    rec = Recorder()
    rec.gate.clear()  # hold the first batch so the rest queue up
    b = DynamicBatcher(rec, max_batch_tokens=100)
    b.start()
    first = asyncio.create_task(b.submit([Item(10, 0)]))
    await asyncio.sleep(0.05)
    items = [Item(n, tag) for tag, n in enumerate([30, 30, 30, 30, 90, 5], start=1)]
    rest = asyncio.create_task(b.submit(items))
    await asyncio.sleep(0.05)
    rec.gate.set()
    assert await first == [0]
    assert await rest == [10, 20, 30, 40, 50, 60]
    await b.stop()
    for batch in rec.batches:
        sizes = [([10] + [30, 30, 30, 30, 90, 5])[t] for t in batch]
        assert max(sizes) * len(sizes) <= 100 or len(batch) == 1
    assert sorted(t for batch in rec.batches for t in batch) == list(range(7))
    assert rec.batches[1][0] == 1  # the oldest waiting item seeds the next batch


async def test_item_over_budget_runs_alone():
    rec = Recorder()
    b = DynamicBatcher(rec, max_batch_tokens=8)
    b.start()
    assert await b.submit([Item(50, 1)]) == [10]
    await b.stop()
    assert rec.batches == [[1]]


async def test_overload_is_refused_fast():
    rec = Recorder()
    rec.gate.clear()
    b = DynamicBatcher(rec, max_batch_tokens=1000, max_queue_items=4)
    b.start()
    held = asyncio.create_task(b.submit([Item(1, 0)]))
    await asyncio.sleep(0.05)
    queued = asyncio.create_task(b.submit([Item(1, i) for i in range(1, 5)]))
    await asyncio.sleep(0.01)
    with pytest.raises(Overloaded):
        await b.submit([Item(1, 9)])
    rec.gate.set()
    await held
    assert await queued == [10, 20, 30, 40]
    await b.stop()


async def test_max_wait_fills_batches():
    rec = Recorder()
    b = DynamicBatcher(rec, max_batch_tokens=1000, max_wait_s=0.2)
    b.start()
    tasks = [asyncio.create_task(b.submit([Item(5, i)])) for i in range(3)]
    await asyncio.sleep(0)
    late = asyncio.create_task(b.submit([Item(5, 3)]))
    assert [await t for t in tasks] == [[0], [10], [20]] and await late == [30]
    await b.stop()
    assert rec.batches == [[0, 1, 2, 3]]


async def test_failed_forward_fails_only_its_requests():
    calls = {"n": 0}

    def flaky(items: list[Item]) -> list[int]:
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("boom")
        return [i.tag for i in items]

    b = DynamicBatcher(flaky, max_batch_tokens=100)
    b.start()
    with pytest.raises(RuntimeError):
        await b.submit([Item(1, 1)])
    assert await b.submit([Item(1, 2)]) == [2]
    await b.stop()
