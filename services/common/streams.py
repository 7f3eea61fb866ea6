"""Redis streams with consumer groups: the at-least-once queue between the task producer, the rollout
workers and the trainer (protocol: docs/redis.md; names: services.common.keys). Sync redis-py.

- `StreamProducer.add` puts one protobuf message in field `pb`; `add_once` records an idempotency id
  and adds the entry in one Lua step, so a redelivered task cannot add a trajectory twice.
- `StreamConsumer.read` returns decoded deliveries: its own unacknowledged entries first (restart
  under the same name), entries reclaimed from dead consumers (XAUTOCLAIM after `claim_idle_ms`),
  then new ones. The caller calls `ack` only once its work is durable. Poison entries (not protobuf,
  wrong schema_version, delivered more than `max_deliveries` times) go to the dead-letter stream
  with a reason and are acknowledged.
- `backlog` / `wait_for_capacity`: how many entries a group has not acknowledged yet (back-pressure).
"""

from __future__ import annotations

import logging
import os
import random
import socket
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

import redis
from google.protobuf.message import DecodeError, Message
from redis.backoff import ExponentialWithJitterBackoff
from redis.retry import Retry

from psgpo.v1.rollout_pb2 import Task, Trajectory
from services.common import keys

log = logging.getLogger(__name__)

M = TypeVar("M", bound=Message)
T = TypeVar("T")
Entry = tuple[str, dict[bytes, bytes] | None, int]  # (entry id, fields or None when deleted, deliveries)

PB = keys.PAYLOAD_FIELD.encode()
RETRYABLE = (redis.ConnectionError, redis.TimeoutError)  # BusyLoadingError (restart) is a ConnectionError

# SISMEMBER before XADD and SADD after it: if XADD fails (OOM), nothing is recorded.
ADD_ONCE_LUA = """
if redis.call('SISMEMBER', KEYS[2], ARGV[1]) == 1 then return false end
local id
if ARGV[3] == '' then
  id = redis.call('XADD', KEYS[1], '*', 'pb', ARGV[2])
else
  id = redis.call('XADD', KEYS[1], 'MAXLEN', ARGV[4], ARGV[3], '*', 'pb', ARGV[2])
end
redis.call('SADD', KEYS[2], ARGV[1])
return id
"""

# XAUTOCLAIM JUSTID names every claimed id (also entries trimmed away, which 6.2 keeps pending);
# XCLAIM then bumps each delivery count and returns the entry; XPENDING reads the count.
RECLAIM_LUA = """
local claimed = redis.call(
  'XAUTOCLAIM', KEYS[1], ARGV[1], ARGV[2], ARGV[3], ARGV[4], 'COUNT', ARGV[5], 'JUSTID')
local out = {claimed[1]}
for _, id in ipairs(claimed[2]) do
  local entry = redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[2], 0, id)[1]
  local pending = redis.call('XPENDING', KEYS[1], ARGV[1], id, id, 1)[1]
  local fields = false
  if entry then fields = entry[2] end
  table.insert(out, {id, fields, pending and pending[4] or 0})
end
return out
"""

# Entries after `last-delivered-id` (Redis 6.2 has no XINFO `lag`), counted server-side in pages.
COUNT_AFTER_LUA = """
local start = '(' .. ARGV[1]
local cap = tonumber(ARGV[2])
local n = 0
while true do
  local page = redis.call('XRANGE', KEYS[1], start, '+', 'COUNT', 256)
  n = n + #page
  if #page < 256 or (cap > 0 and n >= cap) then return n end
  start = '(' .. page[#page][1]
end
"""


def connect(url: str, *, socket_timeout_s: float = 30.0, retries: int = 3, **options: Any) -> redis.Redis:
    """A binary-safe client for a `redis://` or `rediss://` (TLS) URL; TLS settings go in the URL
    query (`ssl_ca_certs=...`) or `options`. Each command retries connection errors `retries` times
    with jittered exponential backoff; wrap whole steps in `with_backoff` to ride out restarts."""
    if not url.startswith(("redis://", "rediss://", "unix://")):
        raise ValueError(f"expected a redis://, rediss:// or unix:// URL, got {url!r}")
    return redis.Redis.from_url(
        url,
        decode_responses=False,
        socket_timeout=socket_timeout_s,
        socket_connect_timeout=min(socket_timeout_s, 5.0),
        socket_keepalive=True,
        health_check_interval=15,
        retry=Retry(ExponentialWithJitterBackoff(cap=1.0, base=0.05), retries),
        **options,
    )


def with_backoff(
    call: Callable[[], T], *, attempts: int = 8, base_s: float = 0.1, cap_s: float = 5.0, what: str = "redis"
) -> T:
    """`call()`, retried on connection errors and timeouts with full-jitter exponential backoff;
    after `attempts` tries the last error is raised (never swallowed). Only wrap idempotent steps
    (reads, acks, `add_once`): a plain XADD retried after a lost reply may add twice."""
    for attempt in range(1, attempts + 1):
        try:
            return call()
        except RETRYABLE as error:
            if attempt == attempts:
                raise
            delay = random.uniform(0, min(cap_s, base_s * 2 ** (attempt - 1)))
            log.warning("%s failed (%s), retry %d/%d in %.2fs", what, error, attempt, attempts - 1, delay)
            time.sleep(delay)
    raise AssertionError("unreachable")


def default_consumer_name() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


def parse_id(entry_id: str | bytes) -> tuple[int, int]:
    text = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
    ms, _, seq = text.partition("-")
    return int(ms), int(seq or 0)


def _text(value: str | bytes) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _stamp_schema(message: Message) -> None:
    """Sets schema_version to the current one when unset; refuses another version."""
    if "schema_version" not in message.DESCRIPTOR.fields_by_name:
        return
    version = message.schema_version  # type: ignore[attr-defined]
    if version == 0:
        message.schema_version = keys.SCHEMA_VERSION  # type: ignore[attr-defined]
    elif version != keys.SCHEMA_VERSION:
        raise ValueError(f"schema_version {version} is not the supported {keys.SCHEMA_VERSION}")


class StreamProducer:
    """Adds protobuf messages to one stream. `maxlen` trims the oldest entries, delivered or not:
    prefer back-pressure (`wait_for_capacity`) and `trim_acknowledged` for work queues."""

    def __init__(self, r: redis.Redis, stream: str, *, maxlen: int | None = None, approximate: bool = True):
        self._r = r
        self.stream = stream
        self.maxlen = maxlen
        self.approximate = approximate
        self._add_once = r.register_script(ADD_ONCE_LUA)

    def add(self, message: Message) -> str:
        """XADD the message (schema_version stamped when unset); returns the entry id."""
        _stamp_schema(message)
        entry_id = self._r.xadd(
            self.stream, {PB: message.SerializeToString()}, maxlen=self.maxlen, approximate=self.approximate
        )
        return _text(entry_id)

    def add_many(self, messages: Sequence[Message]) -> list[str]:
        """XADD all messages in one transaction (one round trip, all or none); returns the entry ids."""
        pipe = self._r.pipeline(transaction=True)
        for message in messages:
            _stamp_schema(message)
            pipe.xadd(
                self.stream,
                {PB: message.SerializeToString()},
                maxlen=self.maxlen,
                approximate=self.approximate,
            )
        return [_text(entry_id) for entry_id in pipe.execute()]

    def add_once(self, message: Message, dedup_key: str, dedup_id: str) -> str | None:
        """Adds the message unless `dedup_id` is already in the set `dedup_key`; records it in the
        same atomic step. Returns the entry id, or None for a duplicate. Safe to retry."""
        _stamp_schema(message)
        maxlen = "" if self.maxlen is None else str(self.maxlen)
        args = [dedup_id, message.SerializeToString(), maxlen, "~" if self.approximate else "="]
        entry_id = self._add_once(keys=[self.stream, dedup_key], args=args)
        return None if entry_id is None else _text(entry_id)


@dataclass(slots=True)
class Delivery(Generic[M]):
    id: str
    message: M
    deliveries: int  # how many times Redis has delivered this entry (1 on the first read)
    raw: bytes


@dataclass(slots=True)
class ConsumerStats:
    delivered: int = 0
    reclaimed: int = 0
    dead_lettered: int = 0
    duplicates: int = 0
    dead_reasons: list[str] = field(default_factory=list)  # the last few, newest last


class StreamConsumer(Generic[M]):
    """One named consumer of a consumer group, decoding entries as `message_type`.

    With `dedup_key` and `dedup_id`, acknowledged ids are recorded in that set (same MULTI as the
    XACK) and entries whose id was already acknowledged, or repeats within a batch, are acknowledged
    and skipped instead of returned.
    """

    def __init__(
        self,
        r: redis.Redis,
        stream: str,
        group: str,
        consumer: str,
        message_type: type[M],
        *,
        dead_stream: str,
        max_deliveries: int = 5,
        claim_idle_ms: int = 60_000,
        reclaim_every_s: float = 5.0,
        schema_version: int = keys.SCHEMA_VERSION,
        dedup_key: str | None = None,
        dedup_id: Callable[[M], str] | None = None,
        dead_maxlen: int = 10_000,
    ):
        if (dedup_key is None) != (dedup_id is None):
            raise ValueError("dedup_key and dedup_id go together")
        if max_deliveries < 1 or claim_idle_ms < 1:
            raise ValueError("max_deliveries and claim_idle_ms must be positive")
        self._r = r
        self.stream, self.group, self.consumer = stream, group, consumer
        self.message_type = message_type
        self.dead_stream = dead_stream
        self.max_deliveries = max_deliveries
        self.claim_idle_ms = claim_idle_ms
        self.reclaim_every_s = reclaim_every_s
        self.schema_version = schema_version
        self.dedup_key, self.dedup_id = dedup_key, dedup_id
        self.dead_maxlen = dead_maxlen
        self.stats = ConsumerStats()
        self._history_from: str | None = "0"  # own pending entries are read first, then new ones
        self._claim_cursor = "0-0"
        self._next_reclaim = 0.0
        self._reclaim = r.register_script(RECLAIM_LUA)
        self._checks_schema = "schema_version" in message_type.DESCRIPTOR.fields_by_name

    def ensure_group(self) -> None:
        """Creates the group at the stream's start (and the stream) unless it exists."""
        try:
            self._r.xgroup_create(self.stream, self.group, id="0", mkstream=True)
        except redis.ResponseError as error:
            if "BUSYGROUP" not in str(error):
                raise

    def read(self, count: int = 16, block_ms: int = 2000) -> list[Delivery[M]]:
        """Up to `count` deliveries, blocking up to `block_ms` for new entries; [] when none came.
        Poison entries and duplicates are handled here and never returned."""
        timeout = self._r.connection_pool.connection_kwargs.get("socket_timeout")
        if timeout is not None and block_ms / 1000 >= timeout:
            raise ValueError(f"block_ms {block_ms} must be below the socket timeout ({timeout}s)")
        try:
            entries = self._own_pending(count) if self._history_from is not None else []
            if not entries and time.monotonic() >= self._next_reclaim:
                entries = self._reclaim_idle(count)
            if not entries:
                entries = self._new(count, block_ms)
        except redis.ResponseError as error:
            if "NOGROUP" not in str(error):
                raise
            log.warning(
                "group %s on %s is missing (Redis lost its data?); recreating", self.group, self.stream
            )
            self.ensure_group()
            return []
        return self._accept(entries)

    def rewind(self) -> None:
        """Re-deliver this consumer's own unacknowledged entries on the next reads (call it after a
        failure dropped work in flight, e.g. a Redis outage between generating and writing)."""
        self._history_from = "0"

    def ack(self, *deliveries: Delivery[M]) -> int:
        """Acknowledges entries whose work is durable; returns how many were pending."""
        if not deliveries:
            return 0
        ids = [d.id for d in deliveries]
        if self.dedup_key is None or self.dedup_id is None:
            return int(self._r.xack(self.stream, self.group, *ids))
        pipe = self._r.pipeline(transaction=True)
        pipe.xack(self.stream, self.group, *ids)
        pipe.sadd(self.dedup_key, *[self.dedup_id(d.message) for d in deliveries])
        acked, _ = pipe.execute()
        return int(acked)

    def keepalive(self, *deliveries: Delivery[M]) -> None:
        """Resets the idle time of entries still being worked on, so nobody reclaims them."""
        if deliveries:
            ids = [d.id for d in deliveries]
            self._r.xclaim(self.stream, self.group, self.consumer, 0, ids, justid=True)

    def dead_letter(self, entry_id: str, raw: bytes, reason: str, deliveries: int) -> None:
        """Moves one entry to the dead-letter stream with `reason` and acknowledges it (one MULTI)."""
        dead = {
            PB: raw,
            b"reason": reason.encode(),
            b"stream": self.stream.encode(),
            b"id": entry_id.encode(),
            b"group": self.group.encode(),
            b"consumer": self.consumer.encode(),
            b"deliveries": str(deliveries).encode(),
        }
        pipe = self._r.pipeline(transaction=True)
        pipe.xadd(self.dead_stream, dead, maxlen=self.dead_maxlen, approximate=True)
        pipe.xack(self.stream, self.group, entry_id)
        pipe.execute()
        self.stats.dead_lettered += 1
        self.stats.dead_reasons = [*self.stats.dead_reasons[-9:], reason]
        log.warning("dead-lettered %s %s: %s", self.stream, entry_id, reason)

    def _own_pending(self, count: int) -> list[Entry]:
        assert self._history_from is not None
        reply = self._r.xreadgroup(self.group, self.consumer, {self.stream: self._history_from}, count=count)
        rows = reply[0][1] if reply else []
        if not rows:
            self._history_from = None
            return []
        self._history_from = _text(rows[-1][0])
        first, last = _text(rows[0][0]), _text(rows[-1][0])
        pending = self._r.xpending_range(
            self.stream, self.group, first, last, len(rows), consumername=self.consumer
        )
        counts = {_text(p["message_id"]): int(p["times_delivered"]) for p in pending}
        return [(_text(i), fields or None, counts.get(_text(i), 1)) for i, fields in rows]

    def _reclaim_idle(self, count: int) -> list[Entry]:
        args = [self.group, self.consumer, self.claim_idle_ms, self._claim_cursor, count]
        cursor, *claimed = self._reclaim(keys=[self.stream], args=args)
        self._claim_cursor = _text(cursor)
        if self._claim_cursor == "0-0":  # scanned the whole pending list: rest until the next round
            self._next_reclaim = time.monotonic() + self.reclaim_every_s
        entries: list[Entry] = []
        for entry_id, flat, deliveries in claimed:
            fields = dict(zip(flat[::2], flat[1::2], strict=True)) if flat else None
            entries.append((_text(entry_id), fields, int(deliveries)))
        if entries:
            self.stats.reclaimed += len(entries)
            log.info("reclaimed %d idle entries of %s for %s", len(entries), self.stream, self.consumer)
        return entries

    def _new(self, count: int, block_ms: int) -> list[Entry]:
        block = block_ms if block_ms > 0 else None
        reply = self._r.xreadgroup(self.group, self.consumer, {self.stream: ">"}, count=count, block=block)
        rows = reply[0][1] if reply else []
        return [(_text(i), fields or None, 1) for i, fields in rows]

    def _accept(self, entries: Sequence[Entry]) -> list[Delivery[M]]:
        out: list[Delivery[M]] = []
        for entry_id, fields, deliveries in entries:
            raw = (fields or {}).get(PB)
            message, reason = self._decode(raw)
            if message is None or raw is None:
                self.dead_letter(entry_id, raw or b"", reason, deliveries)
            elif deliveries > self.max_deliveries:
                reason = f"delivered {deliveries} times (max_deliveries {self.max_deliveries})"
                self.dead_letter(entry_id, raw, reason, deliveries)
            else:
                out.append(Delivery(entry_id, message, deliveries, raw))
        out = self._drop_duplicates(out)
        self.stats.delivered += len(out)
        return out

    def _decode(self, raw: bytes | None) -> tuple[M | None, str]:
        if raw is None:
            return None, f"no '{keys.PAYLOAD_FIELD}' field (entry trimmed, or not written by psgpo)"
        message = self.message_type()
        try:
            message.ParseFromString(raw)
        except DecodeError as error:
            return None, f"undecodable {message.DESCRIPTOR.full_name}: {error}"
        if self._checks_schema and message.schema_version != self.schema_version:  # type: ignore[attr-defined]
            version = message.schema_version  # type: ignore[attr-defined]
            return None, f"schema_version {version}, expected {self.schema_version}"
        return message, ""

    def _drop_duplicates(self, deliveries: list[Delivery[M]]) -> list[Delivery[M]]:
        if self.dedup_key is None or self.dedup_id is None or not deliveries:
            return deliveries
        ids = [self.dedup_id(d.message) for d in deliveries]
        already = self._r.smismember(self.dedup_key, ids)
        seen: set[str] = set()
        keep: list[Delivery[M]] = []
        duplicates: list[str] = []
        for delivery, dedup_id, acked in zip(deliveries, ids, already, strict=True):
            if acked or dedup_id in seen:
                duplicates.append(delivery.id)
            else:
                seen.add(dedup_id)
                keep.append(delivery)
        if duplicates:
            self._r.xack(self.stream, self.group, *duplicates)
            self.stats.duplicates += len(duplicates)
            log.info("skipped %d duplicate entries of %s", len(duplicates), self.stream)
        return keep


# Back-pressure ---------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Backlog:
    undelivered: int  # entries after the group's last-delivered id (XINFO `lag` on Redis >= 7)
    pending: int  # delivered, not yet acknowledged

    @property
    def unconsumed(self) -> int:
        return self.undelivered + self.pending


def backlog(r: redis.Redis, stream: str, group: str, *, cap: int = 0) -> Backlog:
    """What `group` has not acknowledged on `stream`. Uses XINFO `lag` where Redis reports it (>= 7);
    on 6.2 counts entries after last-delivered-id server-side, O(undelivered), stopping at `cap`
    when it is positive. A missing group means the whole stream is unconsumed."""
    if not r.exists(stream):
        return Backlog(0, 0)
    info = next((g for g in r.xinfo_groups(stream) if _text(g["name"]) == group), None)
    if info is None:
        return Backlog(int(r.xlen(stream)), 0)
    lag = info.get("lag")
    if lag is None:
        last = _text(info["last-delivered-id"])
        lag = r.eval(COUNT_AFTER_LUA, 1, stream, last, cap) if last != "0-0" else r.xlen(stream)
    return Backlog(int(lag), int(info["pending"]))


def wait_for_capacity(
    r: redis.Redis, stream: str, group: str, limit: int, *, timeout_s: float = 60.0, poll_s: float = 0.2
) -> bool:
    """Waits until fewer than `limit` entries are unconsumed by `group`: True, or False after
    `timeout_s` (the caller decides: check for shutdown and wait again)."""
    deadline = time.monotonic() + timeout_s
    while True:
        if backlog(r, stream, group, cap=limit).unconsumed < limit:
            return True
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return False
        time.sleep(min(poll_s, remaining))


def trim_acknowledged(r: redis.Redis, stream: str) -> int:
    """Deletes entries every group has delivered and acknowledged (XTRIM MINID); returns how many.
    Keeps everything when the stream has no group yet."""
    if not r.exists(stream):
        return 0
    groups = r.xinfo_groups(stream)
    if not groups:
        return 0
    floors = []
    for info in groups:
        floor = parse_id(info["last-delivered-id"])
        if int(info["pending"]):
            summary = r.xpending(stream, info["name"])
            floor = min(floor, parse_id(summary["min"]))
        floors.append(floor)
    ms, seq = min(floors)
    return int(r.xtrim(stream, minid=f"{ms}-{seq}", approximate=False))


# The two psgpo streams ------------------------------------------------------------------------------


def task_consumer(r: redis.Redis, run: str, consumer: str, **options: Any) -> StreamConsumer[Task]:
    """A consumer of `psgpo:{run}:tasks` in group `rollout` (group created if missing)."""
    k = keys.run_keys(run)
    tasks = StreamConsumer(r, k.tasks, keys.TASKS_GROUP, consumer, Task, dead_stream=k.dead, **options)
    tasks.ensure_group()
    return tasks


def trajectory_consumer(
    r: redis.Redis, run: str, consumer: str, **options: Any
) -> StreamConsumer[Trajectory]:
    """A consumer of `psgpo:{run}:trajectories` in group `trainer` that skips trajectory ids the
    group already acknowledged."""
    k = keys.run_keys(run)
    trajectories = StreamConsumer(
        r,
        k.trajectories,
        keys.TRAJECTORIES_GROUP,
        consumer,
        Trajectory,
        dead_stream=k.dead,
        dedup_key=k.trajectories_acked,
        dedup_id=lambda t: t.trajectory_id,
        **options,
    )
    trajectories.ensure_group()
    return trajectories


def enqueue_task(r: redis.Redis, run: str, task: Task) -> str:
    """Adds a task to `psgpo:{run}:tasks`; returns the entry id."""
    if not task.task_id:
        raise ValueError("a task needs a task_id")
    return StreamProducer(r, keys.run_keys(run).tasks).add(task)


def enqueue_tasks(r: redis.Redis, run: str, tasks: Sequence[Task]) -> list[str]:
    """Adds many tasks to `psgpo:{run}:tasks` in one transaction; returns the entry ids."""
    for task in tasks:
        if not task.task_id:
            raise ValueError("a task needs a task_id")
    return StreamProducer(r, keys.run_keys(run).tasks).add_many(tasks)


def add_trajectory(
    r: redis.Redis, run: str, trajectory: Trajectory, *, maxlen: int | None = None
) -> str | None:
    """Adds a trajectory unless its trajectory_id was added before (None then). Safe to retry."""
    expected = f"{trajectory.task_id}:{trajectory.sample_index}"
    if trajectory.trajectory_id != expected:
        raise ValueError(f"trajectory_id {trajectory.trajectory_id!r} should be {expected!r}")
    k = keys.run_keys(run)
    producer = StreamProducer(r, k.trajectories, maxlen=maxlen)
    return producer.add_once(trajectory, k.trajectories_written, trajectory.trajectory_id)
