"""Real services for the client tests: the PRM (tiny model) and the sandbox on free ports, the tiny
policy for an in-process rollout worker. Package-scoped: started once for tests/client."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from services.common.runner import Running, start_in_thread
from services.common.streams import connect
from services.prm.config import PrmSettings
from services.prm.server import make_factory as prm_factory
from services.rollout.config import RolloutSettings
from services.rollout.server import run_worker
from services.sandbox.config import SandboxSettings
from services.sandbox.server import make_factory as sandbox_factory

# The response is one comment line (stop at "\n"), so the program is valid whatever the tiny
# untrained policy samples and its tests really pass (tests/rollout/test_worker.py does the same).
PROMPT = "def one():\n    return 1\n# "
ASSERTS = "assert one() == 1\nassert one() + 1 == 2\n"
SAMPLING = {"temperature": 1.0, "max_new_tokens": 12, "seed": 7, "stop": ["\n"]}


@dataclass(frozen=True)
class Services:
    prm: Running
    sandbox: Running

    @property
    def prm_url(self) -> str:
        return f"http://127.0.0.1:{self.prm.http_port}"

    @property
    def sandbox_url(self) -> str:
        return f"http://127.0.0.1:{self.sandbox.http_port}"


@pytest.fixture(scope="package")
def services(tiny_models: Path) -> Iterator[Services]:
    prm = start_in_thread(prm_factory(PrmSettings(model=tiny_models / "prm", http_port=0, grpc_port=0)))
    sandbox = start_in_thread(sandbox_factory(SandboxSettings(http_port=0, grpc_port=0, workers=2)))
    yield Services(prm, sandbox)
    prm.stop()
    sandbox.stop()


@pytest.fixture(scope="package")
def backend(tiny_models: Path):
    from services.rollout.backend_hf import HfBackend

    b = HfBackend(tiny_models / "policy", max_batch_sequences=16)
    yield b
    b.close()


def run_rollout(
    redis_url: str,
    run: str,
    services: Services,
    backend,
    tmp: Path,
    n_tasks: int,
    timeout_s: float = 60,
    alive: Callable[[], bool] | None = None,
) -> int:
    """A real rollout worker, in-process, until it has done `n_tasks` tasks of `run`, `timeout_s`
    passed, or `alive()` (the producer, e.g. an example's process) turns false. Returns tasks done."""
    settings = RolloutSettings(
        redis_url=redis_url,
        run=run,
        prm=f"127.0.0.1:{services.prm.grpc_port}",
        sandbox=f"127.0.0.1:{services.sandbox.grpc_port}",
        weights_cache=tmp / "rollout-cache",
        scoring_retries=1,
        scoring_timeout_s=30,
        consumer="test-worker",
    )

    async def go() -> int:
        r = connect(redis_url)
        stop = asyncio.Event()
        worker = asyncio.create_task(run_worker(settings, backend, r, stop, n_tasks))
        deadline = time.monotonic() + timeout_s
        try:
            while not worker.done() and time.monotonic() < deadline and (alive is None or alive()):
                await asyncio.sleep(0.05)
            stop.set()  # the worker ends after its current turn
            return await asyncio.wait_for(worker, 30)
        finally:
            r.close()

    return asyncio.run(go())
