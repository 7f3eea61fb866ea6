"""The pool sends jobs ahead to its workers (`worker_queue`), least loaded first, and loses nothing when
a worker holding several jobs dies or stops answering."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import httpx

from services.common.runner import Running
from services.sandbox import pool
from services.sandbox.client import AssertTests, RunResult, SandboxClient
from tests.sandbox.conftest import start_sandbox

SLOW = "import time\ntime.sleep(1.0)\ndef f():\n    return 1\n"
QUICK = "def f():\n    return 2\n"
SLOW_THEN_QUICK = [(SLOW, "assert f() == 1\n"), (QUICK, "assert f() == 2\n")]


def _core(running: Running):
    return running.service.core  # type: ignore[union-attr]


def _grpc_health(port: int) -> str:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        reply = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
    return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)


def _wait_for(condition: Callable[[], bool], seconds: float = 5.0) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.005)
    return False


def _run_concurrently(running: Running, jobs: list[tuple[str, str]], timeout_s: float = 5.0, staged=None):
    """Each job from its own thread and client; with `staged`, the next job is sent only once
    `staged()` holds (for example: once the first job is running in the worker)."""
    url = f"http://127.0.0.1:{running.http_port}"

    def one(job: tuple[str, str]) -> RunResult:
        with SandboxClient(url, timeout_s=60.0) as client:
            return client.run(job[0], AssertTests(job[1]), timeout_s)

    executor = ThreadPoolExecutor(len(jobs))
    futures = []
    for job in jobs:
        futures.append(executor.submit(one, job))
        if staged is not None:
            assert _wait_for(staged), "the job did not reach the worker"
    return executor, futures


def test_a_second_job_waits_in_the_worker_not_in_the_service():
    running = start_sandbox(workers=1, worker_queue=2)
    try:
        handle = _core(running).pool.handles[0]
        executor, futures = _run_concurrently(running, SLOW_THEN_QUICK, staged=lambda: handle.load > 0)
        assert _wait_for(lambda: len(handle.pending) == 2), "the second job was not sent ahead"
        slow, quick = (f.result(30) for f in futures)
        executor.shutdown()
        assert slow.passed and quick.passed
        assert len(handle.pending) == 0 and _core(running).pool.free_slots() == 2
    finally:
        running.stop()


def test_one_job_at_a_time_with_worker_queue_1():
    running = start_sandbox(workers=1, worker_queue=1)
    try:
        pool_ = _core(running).pool
        handle = pool_.handles[0]
        executor, futures = _run_concurrently(running, SLOW_THEN_QUICK, staged=lambda: handle.load > 0)
        assert _wait_for(lambda: pool_.stats.waiting == 1), "the second job did not wait in the service"
        most = 0
        while not all(f.done() for f in futures):
            most = max(most, len(handle.pending))
            time.sleep(0.005)
        executor.shutdown()
        assert most == 1 and all(f.result().passed for f in futures)
    finally:
        running.stop()


def test_an_idle_worker_gets_the_job_before_a_busy_one():
    running = start_sandbox(workers=2, worker_queue=2)
    try:
        handles = list(_core(running).pool.handles.values())
        executor, futures = _run_concurrently(running, [(SLOW, "assert f() == 1\n")] * 2)
        assert _wait_for(lambda: [len(h.pending) for h in handles] == [1, 1])
        assert all(f.result(30).passed for f in futures)
        executor.shutdown()
    finally:
        running.stop()


def test_a_worker_dying_with_two_jobs_loses_neither():
    """Both jobs it held (the running one and the one waiting in it) fail their first attempt and get a
    verdict on the replacement; no verdict comes from the dead worker."""
    running = start_sandbox(workers=1, worker_queue=2)
    try:
        core = _core(running)
        handle = core.pool.handles[0]
        executor, futures = _run_concurrently(running, SLOW_THEN_QUICK, staged=lambda: handle.load > 0)
        assert _wait_for(lambda: len(handle.pending) == 2)
        os.kill(handle.pid, signal.SIGKILL)
        results = [f.result(60) for f in futures]
        executor.shutdown()
        assert all(r.passed for r in results), results
        assert core.pool.stats.restarts == 1 and core.pool.handles[0].pid != handle.pid
        metrics = httpx.get(f"http://127.0.0.1:{running.http_port}/metrics").text
        assert "sandbox_failures_total 2.0" in metrics
    finally:
        running.stop()


def test_a_worker_that_stops_answering_is_replaced_by_the_backstop(monkeypatch):
    monkeypatch.setattr(pool, "BACKSTOP_GRACE_S", 0.5)
    running = start_sandbox(workers=1)
    try:
        core = _core(running)
        handle = core.pool.handles[0]
        os.kill(handle.pid, signal.SIGSTOP)  # the worker hangs: the job sent to it gets no answer
        started = time.monotonic()
        executor, futures = _run_concurrently(running, [(QUICK, "assert f() == 2\n")], timeout_s=1.0)
        result = futures[0].result(60)
        executor.shutdown()
        assert result.passed, result  # retried on the replacement
        assert core.pool.stats.restarts == 1 and core.pool.handles[0].pid != handle.pid
        assert time.monotonic() - started < 1.0 + 0.5 + 30  # deadline + grace + a worker start
    finally:
        with_pid = handle.pid
        try:
            os.kill(with_pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        running.stop()


def test_a_job_sent_ahead_gets_its_whole_timeout():
    """Its deadline starts when the worker starts it, not when it was sent: a job queued behind one
    that runs into its timeout still has all of its own."""
    running = start_sandbox(workers=1, worker_queue=2)
    try:
        handle = _core(running).pool.handles[0]
        jobs = [
            ("while True:\n    pass\n", "assert True\n"),
            ("import time\ntime.sleep(0.7)\ndef f():\n    return 2\n", "assert f() == 2\n"),
        ]
        started = time.monotonic()
        executor, futures = _run_concurrently(running, jobs, timeout_s=1.0, staged=lambda: handle.load > 0)
        spinner, sleeper = (f.result(30) for f in futures)
        executor.shutdown()
        assert spinner.status.value == "timeout" and sleeper.passed, (spinner, sleeper)
        assert time.monotonic() - started < 1.0 + 0.7 + 1.5  # one after the other, each in its own time
    finally:
        running.stop()


async def test_callers_that_stop_waiting_for_a_slot_strand_nobody():
    """Callers cancelled while they wait for a slot (their client went away) leave the queue; the next
    caller still gets the worker, at once when nothing else is running."""
    from prometheus_client import CollectorRegistry

    from services.sandbox.client import RunRequest
    from services.sandbox.config import SandboxSettings
    from services.sandbox.core import SandboxCore

    core = SandboxCore(SandboxSettings(workers=1, worker_queue=1, pin_cpus=False), CollectorRegistry())
    await core.start()
    try:
        slow = asyncio.ensure_future(core.run(RunRequest(SLOW, AssertTests("assert f() == 1\n"), 5.0)))
        await asyncio.sleep(0.2)
        waiting = [
            asyncio.ensure_future(core.run(RunRequest(QUICK, AssertTests("assert f() == 2\n"), 5.0)))
            for _ in range(3)
        ]
        await asyncio.sleep(0.1)
        assert core.pool.stats.waiting == 3
        for task in waiting:
            task.cancel()
        await asyncio.gather(*waiting, return_exceptions=True)
        assert core.pool.stats.waiting == 0
        assert (await slow).passed
        quick = await asyncio.wait_for(core.run(RunRequest(QUICK, AssertTests("assert f() == 2\n"), 5.0)), 10)
        assert quick.passed and core.pool.free_slots() == 1
    finally:
        await core.stop()


def test_a_worker_that_cannot_be_restarted_is_tried_again(monkeypatch):
    """A restart that fails (no memory, no processes left) is retried, backing off, until it works:
    the slot is not lost for good, and the run that was waiting for it gets its verdict. Meanwhile,
    with no worker alive, the service says it is not ready."""
    monkeypatch.setattr(pool, "RESPAWN_FIRST_DELAY_S", 0.05)
    failures = {"left": 0}
    spawn = pool.WorkerPool._spawn

    async def flaky_spawn(self, slot: int):
        if failures["left"] > 0:
            failures["left"] -= 1
            raise OSError(11, "Resource temporarily unavailable (injected)")
        return await spawn(self, slot)

    monkeypatch.setattr(pool.WorkerPool, "_spawn", flaky_spawn)
    running = start_sandbox(workers=1)
    try:
        core = _core(running)
        victim = core.pool.handles[0].pid
        url = f"http://127.0.0.1:{running.http_port}"
        assert httpx.get(f"{url}/readyz").status_code == 200
        failures["left"] = 6  # retried after 0.05, 0.1, 0.2, 0.4, 0.8, 1.6 s
        os.kill(victim, signal.SIGKILL)
        assert _wait_for(lambda: httpx.get(f"{url}/readyz").status_code == 503), "ready with no worker"
        assert _wait_for(lambda: _grpc_health(running.grpc_port) == "NOT_SERVING"), "gRPC health says serving"
        assert _wait_for(lambda: failures["left"] == 0, 20), "the restart was not retried"
        assert _wait_for(lambda: httpx.get(f"{url}/readyz").status_code == 200, 30), "not ready again"
        assert _wait_for(lambda: _grpc_health(running.grpc_port) == "SERVING"), "gRPC health not back"
        with SandboxClient(f"http://127.0.0.1:{running.http_port}", timeout_s=60.0) as client:
            assert client.run(QUICK, AssertTests("assert f() == 2\n"), 5.0).passed
        assert core.pool.stats.alive == 1 and core.pool.stats.restarts == 1
        assert core.pool.handles[0].pid != victim
    finally:
        running.stop()
