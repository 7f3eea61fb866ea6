"""A real worker process is SIGKILLed mid-batch; another consumer reclaims its tasks with XAUTOCLAIM
and the trainer consumes every trajectory exactly once."""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import redis

from psgpo.v1.rollout_pb2 import Task, Trajectory
from services.common import keys
from services.common.redis_local import LocalRedis
from services.common.streams import add_trajectory, backlog, enqueue_task, task_consumer, trajectory_consumer

WORKER = Path(__file__).with_name("consumer_process.py")
REPO = Path(__file__).resolve().parents[2]


def start_doomed_worker(url: str, run: str, batch: int) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    worker = subprocess.Popen(
        [sys.executable, str(WORKER), url, run, "doomed", str(batch)],
        stdout=subprocess.PIPE,
        text=True,
        cwd=REPO,
        env=env,
    )
    assert worker.stdout is not None
    ready, _, _ = select.select([worker.stdout], [], [], 30)
    line = worker.stdout.readline().strip() if ready else ""
    if line != "ready":
        worker.kill()
        raise AssertionError(f"worker did not get ready (said {line!r}, exit code {worker.poll()})")
    return worker


def test_sigkilled_worker_tasks_are_reclaimed_and_trajectories_arrive_exactly_once(
    redis_server: LocalRedis, r: redis.Redis, run: str
) -> None:
    k = keys.run_keys(run)
    tasks = [Task(task_id=f"task-{i}", prompt=f"p{i}", n=3) for i in range(6)]
    for task in tasks:
        enqueue_task(r, run, task)

    worker = start_doomed_worker(redis_server.url, run, batch=4)
    worker.send_signal(signal.SIGKILL)
    assert worker.wait(10) == -signal.SIGKILL
    owned = r.xpending_range(k.tasks, keys.TASKS_GROUP, "-", "+", 10)
    assert [(p["consumer"], p["times_delivered"]) for p in owned] == [(b"doomed", 1), (b"doomed", 1)]

    survivor = task_consumer(r, run, "survivor", claim_idle_ms=300, reclaim_every_s=0.05)
    done: list[str] = []
    deadline = time.monotonic() + 20
    while len(done) < 4 and time.monotonic() < deadline:
        for delivery in survivor.read(count=2, block_ms=100):
            for i in range(delivery.message.n):
                add_trajectory(r, run, consumer_trajectory(delivery.message, i))
            survivor.ack(delivery)  # after its trajectories are in Redis
            done.append(delivery.message.task_id)
    assert sorted(done) == ["task-2", "task-3", "task-4", "task-5"]
    assert survivor.stats.reclaimed == 2
    assert backlog(r, k.tasks, keys.TASKS_GROUP).unconsumed == 0

    trainer = trajectory_consumer(r, run, "trainer-0")
    seen: Counter[str] = Counter()
    writers: dict[str, str] = {}
    for _ in range(50):
        batch = trainer.read(count=8, block_ms=100)
        if not batch:
            break
        for delivery in batch:
            seen[delivery.message.trajectory_id] += 1
            writers[delivery.message.trajectory_id] = delivery.message.metadata["worker"]
        trainer.ack(*batch)
    expected = {f"task-{i}:{s}" for i in range(6) for s in range(3)}
    assert set(seen) == expected and set(seen.values()) == {1}
    assert writers["task-2:0"] == "doomed" and writers["task-2:1"] == "survivor"
    assert r.xlen(k.trajectories) == 18
    assert backlog(r, k.trajectories, keys.TRAJECTORIES_GROUP).unconsumed == 0


def consumer_trajectory(task: Task, sample_index: int) -> Trajectory:
    return Trajectory(
        trajectory_id=f"{task.task_id}:{sample_index}",
        task_id=task.task_id,
        sample_index=sample_index,
        response=f"sample {sample_index} of {task.prompt}",
        metadata={"worker": "survivor"},
    )
