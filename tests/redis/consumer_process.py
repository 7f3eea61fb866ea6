"""A rollout-worker stand-in run as a real process by test_redis_reclaim_kill.py: it reads a batch of
tasks, finishes two (trajectories written, tasks acknowledged), writes half of the third, prints
"ready" and waits to be SIGKILLed with the rest of the batch unacknowledged.

usage: python consumer_process.py REDIS_URL RUN CONSUMER_NAME BATCH
"""

from __future__ import annotations

import sys
import time

from psgpo.v1.rollout_pb2 import Task, Trajectory
from services.common.streams import add_trajectory, connect, task_consumer


def trajectory_for(task: Task, sample_index: int, worker: str) -> Trajectory:
    return Trajectory(
        trajectory_id=f"{task.task_id}:{sample_index}",
        task_id=task.task_id,
        sample_index=sample_index,
        response=f"sample {sample_index} of {task.prompt}",
        metadata={"worker": worker},
    )


def main() -> None:
    url, run, name, batch = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    r = connect(url)
    tasks = task_consumer(r, run, name)
    deliveries = tasks.read(count=batch, block_ms=2000)
    assert len(deliveries) == batch, f"expected {batch} tasks, got {len(deliveries)}"
    for delivery in deliveries[:2]:
        for i in range(delivery.message.n):
            add_trajectory(r, run, trajectory_for(delivery.message, i, name))
        tasks.ack(delivery)
    add_trajectory(r, run, trajectory_for(deliveries[2].message, 0, name))  # mid-task
    print("ready", flush=True)
    time.sleep(60)  # SIGKILLed long before this ends


if __name__ == "__main__":
    main()
