"""Stream helpers against a real redis-server 6.2: delivery, ack-after-durable, poison entries,
idempotent trajectories, back-pressure numbers, trimming."""

from __future__ import annotations

import threading
import time

import pytest
import redis

from psgpo.v1.rollout_pb2 import Task, Trajectory
from services.common import keys
from services.common.redis_local import free_port
from services.common.streams import (
    StreamConsumer,
    StreamProducer,
    add_trajectory,
    backlog,
    connect,
    enqueue_task,
    task_consumer,
    trajectory_consumer,
    trim_acknowledged,
    wait_for_capacity,
    with_backoff,
)


def make_task(i: int, n: int = 2) -> Task:
    return Task(task_id=f"task-{i}", prompt=f"def f{i}():", n=n)


def make_trajectory(task_id: str, sample_index: int, response: str = "pass") -> Trajectory:
    return Trajectory(
        trajectory_id=f"{task_id}:{sample_index}",
        task_id=task_id,
        sample_index=sample_index,
        response=response,
    )


def dead_entries(r: redis.Redis, run: str) -> list[dict[bytes, bytes]]:
    return [fields for _, fields in r.xrange(keys.run_keys(run).dead)]


def pending_count(r: redis.Redis, stream: str, group: str) -> int:
    return int(r.xpending(stream, group)["pending"])


def test_tasks_are_delivered_once_across_consumers_of_the_group(r: redis.Redis, run: str) -> None:
    ids = [enqueue_task(r, run, make_task(i)) for i in range(6)]
    a, b = task_consumer(r, run, "a"), task_consumer(r, run, "b")
    got = a.read(count=4, block_ms=100) + b.read(count=4, block_ms=100)
    assert [d.id for d in got] == ids
    assert [d.message.task_id for d in got] == [f"task-{i}" for i in range(6)]
    assert all(d.deliveries == 1 and d.message.schema_version == keys.SCHEMA_VERSION for d in got)
    assert a.read(count=4, block_ms=50) == [] and b.read(count=4, block_ms=50) == []


def test_an_entry_stays_pending_until_acked_and_comes_back_to_a_restarted_consumer(
    r: redis.Redis, run: str
) -> None:
    k = keys.run_keys(run)
    enqueue_task(r, run, make_task(0))
    enqueue_task(r, run, make_task(1))
    first = task_consumer(r, run, "worker-1")
    done, crashed = first.read(count=2, block_ms=100)
    first.ack(done)  # its work is durable; `crashed` never gets there
    assert pending_count(r, k.tasks, keys.TASKS_GROUP) == 1

    restarted = task_consumer(r, run, "worker-1")  # same name after a restart: own pending entries first
    again = restarted.read(count=10, block_ms=50)
    assert [(d.id, d.deliveries) for d in again] == [(crashed.id, 2)]
    assert restarted.ack(*again) == 1
    assert restarted.read(count=10, block_ms=50) == []
    assert pending_count(r, k.tasks, keys.TASKS_GROUP) == 0


def test_another_consumer_reclaims_idle_entries_but_not_kept_alive_ones(r: redis.Redis, run: str) -> None:
    for i in range(3):
        enqueue_task(r, run, make_task(i))
    slow = task_consumer(r, run, "slow", claim_idle_ms=500)
    working = slow.read(count=3, block_ms=100)
    time.sleep(0.55)
    slow.keepalive(working[0])  # still being worked on
    helper = task_consumer(r, run, "helper", claim_idle_ms=500)
    reclaimed = helper.read(count=10, block_ms=50)
    assert sorted(d.message.task_id for d in reclaimed) == ["task-1", "task-2"]
    assert all(d.deliveries == 2 for d in reclaimed)
    assert helper.stats.reclaimed == 2
    helper.ack(*reclaimed)
    slow.ack(working[0])
    assert pending_count(r, keys.run_keys(run).tasks, keys.TASKS_GROUP) == 0


def test_undecodable_and_payloadless_entries_are_dead_lettered_with_reason(r: redis.Redis, run: str) -> None:
    k = keys.run_keys(run)
    bad_id = r.xadd(k.tasks, {"pb": b"not a protobuf"}).decode()
    empty_id = r.xadd(k.tasks, {"other": b"x"}).decode()
    good_id = enqueue_task(r, run, make_task(0))
    consumer = task_consumer(r, run, "w")
    got = consumer.read(count=10, block_ms=100)
    assert [d.id for d in got] == [good_id]
    dead = dead_entries(r, run)
    assert [d[b"id"].decode() for d in dead] == [bad_id, empty_id]
    assert b"undecodable psgpo.v1.Task" in dead[0][b"reason"] and dead[0][b"pb"] == b"not a protobuf"
    assert b"no 'pb' field" in dead[1][b"reason"]
    assert dead[0][b"stream"] == k.tasks.encode() and dead[0][b"group"] == b"rollout"
    assert pending_count(r, k.tasks, keys.TASKS_GROUP) == 1  # only the good one; poison is acked
    assert consumer.stats.dead_lettered == 2


def test_wrong_schema_version_is_dead_lettered_and_refused_at_the_producer(r: redis.Redis, run: str) -> None:
    k = keys.run_keys(run)
    future = Task(schema_version=2, task_id="t-future", prompt="x", n=1)
    r.xadd(k.tasks, {"pb": future.SerializeToString()})  # a newer producer, bypassing our helper
    consumer = task_consumer(r, run, "w")
    assert consumer.read(count=10, block_ms=100) == []
    (dead,) = dead_entries(r, run)
    assert dead[b"reason"] == b"schema_version 2, expected 1"
    assert Task.FromString(dead[b"pb"]).task_id == "t-future"
    with pytest.raises(ValueError, match="schema_version 2"):
        enqueue_task(r, run, future)


def test_entries_delivered_too_often_are_dead_lettered(r: redis.Redis, run: str) -> None:
    k = keys.run_keys(run)
    enqueue_task(r, run, make_task(0))
    options = {"max_deliveries": 2, "claim_idle_ms": 50, "reclaim_every_s": 0.0}
    consumers = [task_consumer(r, run, name, **options) for name in ("a", "b", "c")]
    assert consumers[0].read(count=1, block_ms=50)[0].deliveries == 1  # crashes each time
    time.sleep(0.1)
    assert consumers[1].read(count=1, block_ms=50)[0].deliveries == 2
    time.sleep(0.1)
    assert consumers[2].read(count=1, block_ms=50) == []
    (dead,) = dead_entries(r, run)
    assert dead[b"reason"] == b"delivered 3 times (max_deliveries 2)"
    assert dead[b"deliveries"] == b"3" and dead[b"consumer"] == b"c"
    assert pending_count(r, k.tasks, keys.TASKS_GROUP) == 0


def test_an_entry_trimmed_while_pending_is_dead_lettered_on_reclaim(r: redis.Redis, run: str) -> None:
    k = keys.run_keys(run)
    entry_id = enqueue_task(r, run, make_task(0))
    task_consumer(r, run, "a").read(count=1, block_ms=50)
    r.xdel(k.tasks, entry_id)  # Redis 6.2 keeps it in the pending list
    time.sleep(0.1)
    assert task_consumer(r, run, "b", claim_idle_ms=50).read(count=5, block_ms=50) == []
    (dead,) = dead_entries(r, run)
    assert dead[b"id"].decode() == entry_id and b"trimmed" in dead[b"reason"]
    assert pending_count(r, k.tasks, keys.TASKS_GROUP) == 0


def test_a_trajectory_is_added_once_however_often_its_task_is_redone(r: redis.Redis, run: str) -> None:
    k = keys.run_keys(run)
    first = add_trajectory(r, run, make_trajectory("t1", 0, "first try"))
    assert first is not None
    assert add_trajectory(r, run, make_trajectory("t1", 0, "redelivered task")) is None
    assert add_trajectory(r, run, make_trajectory("t1", 1)) is not None
    entries = r.xrange(k.trajectories)
    assert len(entries) == 2
    assert Trajectory.FromString(entries[0][1][b"pb"]).response == "first try"
    assert r.smembers(k.trajectories_written) == {b"t1:0", b"t1:1"}
    with pytest.raises(ValueError, match="should be 't1:3'"):
        add_trajectory(r, run, Trajectory(trajectory_id="t1-3", task_id="t1", sample_index=3))


def test_the_trainer_skips_trajectory_ids_it_already_acknowledged(r: redis.Redis, run: str) -> None:
    k = keys.run_keys(run)
    producer = StreamProducer(r, k.trajectories)  # plain XADD: an external producer without dedup
    for response in ("a", "b"):
        producer.add(make_trajectory("t1", 0, response))
    producer.add(make_trajectory("t1", 1))
    trainer = trajectory_consumer(r, run, "trainer-0")
    batch = trainer.read(count=10, block_ms=100)
    assert [(d.message.trajectory_id, d.message.response) for d in batch] == [("t1:0", "a"), ("t1:1", "pass")]
    trainer.ack(*batch)
    producer.add(make_trajectory("t1", 0, "late duplicate"))
    assert trainer.read(count=10, block_ms=50) == []
    assert trainer.stats.duplicates == 2
    assert pending_count(r, k.trajectories, keys.TRAJECTORIES_GROUP) == 0
    assert r.smembers(k.trajectories_acked) == {b"t1:0", b"t1:1"}


def test_backlog_counts_undelivered_and_pending_on_redis_6_2(r: redis.Redis, run: str) -> None:
    k = keys.run_keys(run)
    group = keys.TRAJECTORIES_GROUP
    assert backlog(r, k.trajectories, group).unconsumed == 0
    for i in range(600):  # more than one 256-entry page of the server-side count
        add_trajectory(r, run, make_trajectory(f"t{i}", 0))
    assert backlog(r, k.trajectories, group).unconsumed == 600  # no trainer group yet: all of it
    trainer = trajectory_consumer(r, run, "trainer-0")
    assert "lag" not in r.xinfo_groups(k.trajectories)[0]  # 6.2: computed, not reported
    batch = trainer.read(count=10, block_ms=100)
    trainer.ack(*batch[:7])
    state = backlog(r, k.trajectories, group)
    assert (state.undelivered, state.pending, state.unconsumed) == (590, 3, 593)
    assert backlog(r, k.trajectories, group, cap=300).undelivered >= 300
    r.xdel(k.trajectories, r.xrange(k.trajectories, count=20)[-1][0])  # an undelivered one deleted
    assert backlog(r, k.trajectories, group).undelivered == 589


def test_wait_for_capacity_blocks_until_the_trainer_catches_up(r: redis.Redis, run: str) -> None:
    k = keys.run_keys(run)
    for i in range(5):
        add_trajectory(r, run, make_trajectory(f"t{i}", 0))
    trainer = trajectory_consumer(r, run, "trainer-0")
    assert wait_for_capacity(r, k.trajectories, keys.TRAJECTORIES_GROUP, limit=6, timeout_s=0)
    started = time.monotonic()
    assert not wait_for_capacity(r, k.trajectories, keys.TRAJECTORIES_GROUP, limit=5, timeout_s=0.3)
    assert 0.3 <= time.monotonic() - started < 2

    def consume_two() -> None:
        time.sleep(0.2)
        trainer.ack(*trainer.read(count=2, block_ms=100))

    thread = threading.Thread(target=consume_two)
    thread.start()
    started = time.monotonic()
    assert wait_for_capacity(r, k.trajectories, keys.TRAJECTORIES_GROUP, limit=4, timeout_s=10, poll_s=0.05)
    assert time.monotonic() - started < 5
    thread.join()
    assert backlog(r, k.trajectories, keys.TRAJECTORIES_GROUP).unconsumed == 3


def test_trim_acknowledged_keeps_pending_and_undelivered_entries(r: redis.Redis, run: str) -> None:
    k = keys.run_keys(run)
    ids = [enqueue_task(r, run, make_task(i)) for i in range(6)]
    assert trim_acknowledged(r, k.tasks) == 0  # no group: nothing is known to be consumed
    consumer = task_consumer(r, run, "w")
    first = consumer.read(count=4, block_ms=100)
    consumer.ack(first[0], first[1], first[3])  # first[2] still pending
    assert trim_acknowledged(r, k.tasks) == 2
    assert [i.decode() for i, _ in r.xrange(k.tasks)] == ids[2:]
    consumer.ack(first[2])
    assert trim_acknowledged(r, k.tasks) == 1  # the last delivered entry stays as the floor
    assert [i.decode() for i, _ in r.xrange(k.tasks)] == ids[3:]
    assert len(consumer.read(count=10, block_ms=50)) == 2


def test_a_lost_group_is_recreated_and_reading_goes_on(r: redis.Redis, run: str) -> None:
    k = keys.run_keys(run)
    consumer = task_consumer(r, run, "w")
    r.delete(k.tasks)  # e.g. Redis restarted without persistence
    assert consumer.read(count=1, block_ms=50) == []
    enqueue_task(r, run, make_task(0))
    assert [d.message.task_id for d in consumer.read(count=1, block_ms=100)] == ["task-0"]


def test_read_refuses_a_block_longer_than_the_socket_timeout(r: redis.Redis, run: str) -> None:
    consumer = StreamConsumer(r, "psgpo:x:tasks", "rollout", "w", Task, dead_stream="psgpo:x:dead")
    with pytest.raises(ValueError, match="socket timeout"):
        consumer.read(block_ms=60_000)


def test_connect_accepts_redis_and_rediss_urls_only() -> None:
    tls = connect("rediss://127.0.0.1:6390/0?ssl_cert_reqs=none")
    assert tls.connection_pool.connection_class is redis.SSLConnection
    plain = connect("redis://127.0.0.1:6390/1")
    assert plain.connection_pool.connection_class is redis.Connection
    with pytest.raises(ValueError, match="redis://"):
        connect("http://127.0.0.1:6379")


def test_with_backoff_retries_a_bounded_number_of_times_then_raises() -> None:
    dead = connect(f"redis://127.0.0.1:{free_port()}/0", retries=0)
    calls = 0

    def ping() -> bool:
        nonlocal calls
        calls += 1
        return bool(dead.ping())

    started = time.monotonic()
    with pytest.raises(redis.ConnectionError):
        with_backoff(ping, attempts=4, base_s=0.01, cap_s=0.05)
    assert calls == 4
    assert time.monotonic() - started < 5
