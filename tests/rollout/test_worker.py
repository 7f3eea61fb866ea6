"""The rollout worker end to end: real Redis, real PRM and sandbox servers, the tiny policy."""

from __future__ import annotations

import asyncio
import math
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from psgpo.v1 import rollout_pb2, sandbox_pb2
from services.common import keys
from services.common.runner import Running, start_in_thread
from services.common.streams import enqueue_task, trajectory_consumer
from services.common.weights import WeightPublisher
from services.prm.config import PrmSettings
from services.prm.server import make_factory as prm_factory
from services.rollout.config import RolloutSettings
from services.rollout.server import run_worker
from services.sandbox.config import SandboxSettings
from services.sandbox.server import make_factory as sandbox_factory

RUN = "wtest"
# The response is one comment line (stop at "\n"), so the program is valid whatever the tiny
# untrained policy samples, and the tests really pass: a real "passed" verdict.
PROMPT = "def one():\n    return 1\n# "
TESTS = sandbox_pb2.TestSpec(
    assert_tests=sandbox_pb2.AssertTests(code="assert one() == 1\nassert one() + 1 == 2\n")
)


def task(task_id: str, n: int = 2, **over) -> rollout_pb2.Task:
    t = rollout_pb2.Task(
        task_id=task_id,
        prompt=PROMPT,
        tests=TESTS,
        n=n,
        sampling=rollout_pb2.SamplingParams(temperature=1.0, max_new_tokens=12, seed=7, stop=["\n"]),
        score_with_prm=True,
    )
    for k, v in over.items():
        setattr(t, k, v) if not isinstance(v, rollout_pb2.SamplingParams) else t.sampling.CopyFrom(v)
    return t


@pytest.fixture(scope="module")
def services(tiny_models: Path) -> Iterator[tuple[Running, Running]]:
    prm = start_in_thread(prm_factory(PrmSettings(model=tiny_models / "prm", http_port=0, grpc_port=0)))
    sandbox = start_in_thread(sandbox_factory(SandboxSettings(http_port=0, grpc_port=0, workers=2)))
    yield prm, sandbox
    prm.stop()
    sandbox.stop()


@pytest.fixture(scope="module")
def backend(tiny_models: Path):
    from services.rollout.backend_hf import HfBackend

    b = HfBackend(tiny_models / "policy", max_batch_sequences=16)
    yield b
    b.close()


def settings(redis_url: str, services: tuple[Running, Running], tmp: Path, **over) -> RolloutSettings:
    prm, sandbox = services
    base = dict(
        redis_url=redis_url,
        run=RUN,
        prm=f"127.0.0.1:{prm.grpc_port}",
        sandbox=f"127.0.0.1:{sandbox.grpc_port}",
        weights_cache=tmp / "cache",
        scoring_retries=1,
        scoring_timeout_s=30,
    )
    return RolloutSettings(**{**base, **over})


def run_tasks(cfg: RolloutSettings, backend, r: redis.Redis, n_tasks: int, timeout: float = 90) -> int:
    async def go() -> int:
        stop = asyncio.Event()
        return await asyncio.wait_for(run_worker(cfg, backend, r, stop, max_tasks=n_tasks), timeout)

    return asyncio.run(go())


def drain(r: redis.Redis, expected: int, timeout: float = 30) -> list[rollout_pb2.Trajectory]:
    consumer = trajectory_consumer(r, RUN, "test-trainer")
    out: list[rollout_pb2.Trajectory] = []
    deadline = time.monotonic() + timeout
    while len(out) < expected and time.monotonic() < deadline:
        batch = consumer.read(count=64, block_ms=200)
        out += [d.message for d in batch]
        consumer.ack(*batch)
    return out


def test_tasks_become_scored_trajectories(r, redis_server, services, backend, tmp_path):
    for i in range(3):
        enqueue_task(r, RUN, task(f"t{i}"))
    assert run_tasks(settings(redis_server.url, services, tmp_path), backend, r, 3) == 3
    trajs = drain(r, 6)
    assert sorted(t.trajectory_id for t in trajs) == sorted(f"t{i}:{j}" for i in range(3) for j in range(2))
    for t in trajs:
        assert not t.failures, t.failures
        assert t.verdict.status == sandbox_pb2.RUN_STATUS_PASSED and t.verdict.tests_total == 2
        assert len(t.logprobs) == len(t.response_token_ids) > 0
        assert all(math.isfinite(x) and x <= 0 for x in t.logprobs)
        assert t.prompt_token_ids and t.policy_version == 0
        assert "\n" not in t.response and len(t.lines) == 1
        assert t.has_prm_scores and len(t.prm_scores) == len(t.lines) and t.prm_model == "prm"
        line = t.lines[0]
        assert line.neutral == (not t.response.strip() or t.response.strip().startswith("#"))
        assert -1 <= line.token_index < len(t.response_token_ids)
        assert t.timings.sandbox_ms > 0 and t.timings.generate_ms > 0
    assert (
        r.xlen(keys.run_keys(RUN).tasks) == 3
        and not r.xpending(keys.run_keys(RUN).tasks, "rollout")["pending"]
    )


def test_bad_tasks_get_failure_records(r, redis_server, services, backend, tmp_path):
    enqueue_task(r, RUN, task("empty", prompt="   "))
    no_tests = task("notests")
    no_tests.ClearField("tests")
    enqueue_task(r, RUN, no_tests)
    enqueue_task(
        r, RUN, task("badparams", sampling=rollout_pb2.SamplingParams(temperature=-1, max_new_tokens=5))
    )
    enqueue_task(r, RUN, task("toolong", prompt="x = 1\n" * 3000))
    enqueue_task(r, RUN, task("good", n=1))
    assert run_tasks(settings(redis_server.url, services, tmp_path), backend, r, 5) == 5
    by_id = {t.task_id: t for t in drain(r, 5)}
    assert set(by_id) == {"empty", "notests", "badparams", "toolong", "good"}
    for name, needle in [("empty", "empty prompt"), ("notests", "no tests"), ("badparams", "temperature"),
                         ("toolong", "")]:  # fmt: skip
        (failure,) = by_id[name].failures
        assert failure.component == "task" and needle in failure.reason
        assert not by_id[name].HasField("verdict")
    assert not by_id["good"].failures


def test_sandbox_outage_is_recorded_not_rewarded(r, redis_server, services, backend, tmp_path):
    enqueue_task(r, RUN, task("down", n=2))
    cfg = settings(redis_server.url, services, tmp_path, sandbox="127.0.0.1:9", scoring_timeout_s=5)
    assert run_tasks(cfg, backend, r, 1) == 1
    trajs = drain(r, 2)
    assert len(trajs) == 2
    for t in trajs:
        assert [f.component for f in t.failures] == ["sandbox"] and t.failures[0].attempts == 2
        assert not t.HasField("verdict")  # no made-up verdict
        assert t.has_prm_scores  # the PRM part still worked


def test_weight_hot_swap_and_bad_checksum(r, redis_server, services, tiny_models, tmp_path):
    import torch

    from services.rollout.backend_hf import HfBackend

    backend = HfBackend(tiny_models / "policy", max_batch_sequences=8)
    try:
        state = backend.run_on_model_thread(
            lambda: {k: v.clone() for k, v in backend.model.state_dict().items()}
        )
        publisher = WeightPublisher(r, RUN, tmp_path / "store")
        gen = torch.Generator().manual_seed(0)
        perturbed = {k: v + 0.05 * torch.randn(v.shape, generator=gen) for k, v in state.items()}
        perturbed["lm_head.weight"] = perturbed["model.embed_tokens.weight"]  # tied in Qwen2
        publisher.publish(1, perturbed)
        enqueue_task(r, RUN, task("after-v1", n=1))
        cfg = settings(redis_server.url, services, tmp_path)
        assert run_tasks(cfg, backend, r, 1) == 1
        (t,) = drain(r, 1)
        assert t.policy_version == 1 and backend.version == 1
        # version 2 announced with a blob whose bytes do not match its checksum: refused, v1 stays
        pv = publisher.publish(2, state)
        Path(pv.uri.removeprefix("file://")).write_bytes(b"corrupted")
        enqueue_task(r, RUN, task("after-bad-v2", n=1))
        assert run_tasks(cfg, backend, r, 1) == 1
        (t,) = drain(r, 1)
        assert t.policy_version == 1 and backend.version == 1
    finally:
        backend.close()


def test_killed_worker_loses_nothing_and_duplicates_nothing(r, redis_server, services, tiny_models, tmp_path):
    prm, sandbox = services
    n_tasks = 6
    for i in range(n_tasks):
        enqueue_task(r, RUN, task(f"k{i}", n=2))
    env = {
        **os.environ,
        "ROLLOUT_REDIS_URL": redis_server.url,
        "ROLLOUT_RUN": RUN,
        "ROLLOUT_PRM": f"127.0.0.1:{prm.grpc_port}",
        "ROLLOUT_SANDBOX": f"127.0.0.1:{sandbox.grpc_port}",
        "ROLLOUT_POLICY": str(tiny_models / "policy"),
        "ROLLOUT_TASKS_PER_BATCH": "2",
        "ROLLOUT_WEIGHTS_CACHE": str(tmp_path / "c1"),
        "ROLLOUT_CONSUMER": "victim",
    }
    victim = subprocess.Popen([sys.executable, "-m", "services.cli", "serve", "rollout"], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    deadline = time.monotonic() + 60
    k = keys.run_keys(RUN)
    while time.monotonic() < deadline and r.xlen(k.trajectories) < 2:  # mid-run: some written, some not
        time.sleep(0.05)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    written_before = r.xlen(k.trajectories)
    assert 0 < written_before < 2 * n_tasks
    # a second worker reclaims the victim's pending tasks once they are idle past claim_idle_ms
    cfg = settings(redis_server.url, services, tmp_path, consumer="rescuer", claim_idle_ms=500)
    from services.rollout.backend_hf import HfBackend

    backend = HfBackend(tiny_models / "policy", max_batch_sequences=8)
    try:

        async def go() -> None:
            stop = asyncio.Event()
            worker_task = asyncio.create_task(run_worker(cfg, backend, r, stop))
            end = time.monotonic() + 90
            while time.monotonic() < end and not _all_done(r, 2 * n_tasks):
                await asyncio.sleep(0.2)
            stop.set()
            await worker_task

        asyncio.run(go())
    finally:
        backend.close()
    trajs = drain(r, 2 * n_tasks)
    counts = Counter(t.trajectory_id for t in trajs)
    assert set(counts) == {f"k{i}:{j}" for i in range(n_tasks) for j in range(2)}
    assert max(counts.values()) == 1  # exactly once in what the trainer consumes


def _all_done(r: redis.Redis, expected: int) -> bool:
    """Every trajectory written and no task left pending in group `rollout`."""
    k = keys.run_keys(RUN)
    return r.scard(k.trajectories_written) >= expected and r.xpending(k.tasks, "rollout")["pending"] == 0


def test_redis_restart_mid_run_loses_nothing(services, backend, tmp_path):
    """Redis stopped and restarted (AOF on, same port) while a worker runs: the worker backs off,
    resumes, and every task yields its trajectories exactly once."""
    from services.common.redis_local import start_redis
    from services.common.streams import connect

    data = tmp_path / "redis-data"
    server = start_redis(data_dir=data, appendonly=True, appendfsync="always")
    port = server.port
    r = connect(server.url)
    n_tasks = 6
    for i in range(n_tasks):
        enqueue_task(r, RUN, task(f"rr{i}", n=2))
    cfg = settings(server.url, services, tmp_path, tasks_per_batch=1)
    k = keys.run_keys(RUN)

    async def go() -> int:
        nonlocal server
        stop = asyncio.Event()
        worker = asyncio.create_task(run_worker(cfg, backend, connect(server.url), stop))
        end = time.monotonic() + 60
        while time.monotonic() < end and r.xlen(k.trajectories) < 2:
            await asyncio.sleep(0.02)
        await asyncio.to_thread(server.stop)  # Redis goes away mid-run ...
        await asyncio.sleep(1.0)
        server = await asyncio.to_thread(
            start_redis, port=port, data_dir=data, appendonly=True
        )  # ... comes back
        end = time.monotonic() + 90
        while time.monotonic() < end and not _all_done(r, 2 * n_tasks):
            await asyncio.sleep(0.2)
        stop.set()
        return await worker

    try:
        asyncio.run(go())
        trajs = drain(r, 2 * n_tasks)
    finally:
        server.stop()
    counts = Counter(t.trajectory_id for t in trajs)
    assert set(counts) == {f"rr{i}:{j}" for i in range(n_tasks) for j in range(2)}
    assert max(counts.values()) == 1


def test_back_pressure_pauses_until_the_trainer_consumes(r, redis_server, services, backend, tmp_path):
    """With max_backlog=2 the worker writes one task's 2 trajectories, then waits; consuming them
    lets it go on."""
    for i in range(3):
        enqueue_task(r, RUN, task(f"bp{i}", n=2))
    consumer = trajectory_consumer(r, RUN, "bp-trainer")  # the trainer group exists from the start
    cfg = settings(redis_server.url, services, tmp_path, max_backlog=2, tasks_per_batch=1)
    k = keys.run_keys(RUN)

    async def go() -> None:
        stop = asyncio.Event()
        worker = asyncio.create_task(run_worker(cfg, backend, r, stop))
        end = time.monotonic() + 60
        while time.monotonic() < end and r.xlen(k.trajectories) < 2:
            await asyncio.sleep(0.05)
        await asyncio.sleep(2.0)  # time enough for more work, were it not paused
        assert r.xlen(k.trajectories) == 2
        consumed = 0
        end = time.monotonic() + 90
        while time.monotonic() < end and consumed < 6:
            batch = await asyncio.to_thread(consumer.read, 16, 200)
            consumer.ack(*batch)
            consumed += len(batch)
        stop.set()
        await worker
        assert consumed == 6

    asyncio.run(go())
