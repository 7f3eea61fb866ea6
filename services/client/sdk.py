"""A small SDK for a trainer outside this code base: a thin layer over the Redis protocol
(docs/redis.md; helpers in services.common.streams and services.common.weights). Imports no torch.

    from services.client.sdk import PsgpoRun
    from services.sandbox.model import AssertTests

    with PsgpoRun("redis://127.0.0.1:6379/0", "demo") as run:
        run.enqueue("def add(a, b):\\n", AssertTests("assert add(1, 2) == 3\\n"), n=4,
                    sampling={"temperature": 1.0, "max_new_tokens": 128})
        for batch in run.trajectories(consumer="trainer-0", batch=32, max_items=4):
            train_on(batch.trajectories)      # your update
            save_checkpoint()                 # durable first ...
            batch.ack()                       # ... then acknowledge
        run.publish_weights(1, model.state_dict(), store_dir="/shared/weights")

Delivery is at-least-once:

- A batch stays pending in group `trainer` until you call `batch.ack()` (or leave a `with batch:`
  block without an exception). Ack only once the update that used it is durable (a checkpoint, or
  whatever you restart from): a trainer that dies before that gets the same trajectories back.
- Unacknowledged trajectories come back to the same consumer name first thing when it iterates
  again (a restart, or a new `trajectories()` call), and to any consumer of the group once they have
  been idle `claim_idle_ms` (XAUTOCLAIM), so pick one stable name per trainer process.
- Duplicates are already removed: an acked trajectory id is recorded with the XACK in one MULTI and
  a redelivered copy of it is acknowledged and skipped, so `trajectories()` never yields an id the
  group acknowledged before. Entries that are not a valid Trajectory, or were delivered more than
  `max_deliveries` times, go to the dead-letter stream `psgpo:{run}:dead` with the reason.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from types import TracebackType
from typing import Any, overload

from psgpo.v1.rollout_pb2 import SamplingParams, Task, Trajectory
from psgpo.v1.weights_pb2 import PolicyVersion
from services.client.testspec import TestsLike, to_proto
from services.common import keys
from services.common.streams import (
    Backlog,
    Delivery,
    StreamConsumer,
    backlog,
    connect,
    enqueue_task,
    trajectory_consumer,
    trim_acknowledged,
    with_backoff,
)
from services.common.weights import WeightPublisher, WeightsError, read_policy

__all__ = ["Backlog", "PsgpoRun", "RunStats", "TrajectoryBatch", "WeightsError"]

MAX_SAMPLES = 1024  # the rollout workers refuse tasks with n outside 1..1024


@dataclass(slots=True)
class RunStats:
    """Counts of this PsgpoRun object (not of the run)."""

    enqueued: int = 0
    yielded: int = 0  # trajectories handed to the caller
    acked: int = 0
    stale_dropped: int = 0  # older than max_staleness: acknowledged without being yielded


class TrajectoryBatch(Sequence[Trajectory]):
    """Trajectories read together, acknowledged together. A sequence of `Trajectory` protos.

    `ack()` acknowledges them (XACK + recording their ids, one MULTI); a second call does nothing.
    As a context manager the batch is acknowledged when the block ends without an exception and
    left pending (redelivered later) when it raises.
    """

    def __init__(
        self, consumer: StreamConsumer[Trajectory], deliveries: list[Delivery[Trajectory]], run: PsgpoRun
    ):
        self._consumer = consumer
        self._deliveries = deliveries
        self._run = run
        self.acked = False

    @property
    def trajectories(self) -> list[Trajectory]:
        return [d.message for d in self._deliveries]

    @property
    def entry_ids(self) -> list[str]:
        """Stream entry ids, in the order of `trajectories`."""
        return [d.id for d in self._deliveries]

    @property
    def redelivered(self) -> int:
        """How many of these Redis delivered before (not acknowledged then)."""
        return sum(d.deliveries > 1 for d in self._deliveries)

    def ack(self) -> int:
        """Acknowledges the batch; returns how many entries were still pending (0 on a second call)."""
        if self.acked:
            return 0
        done = with_backoff(lambda: self._consumer.ack(*self._deliveries), what="ack trajectories")
        self.acked = True
        self._run.stats.acked += len(self._deliveries)
        return done

    def __len__(self) -> int:
        return len(self._deliveries)

    @overload
    def __getitem__(self, index: int) -> Trajectory: ...

    @overload
    def __getitem__(self, index: slice) -> list[Trajectory]: ...

    def __getitem__(self, index: int | slice) -> Trajectory | list[Trajectory]:
        if isinstance(index, slice):
            return [d.message for d in self._deliveries[index]]
        return self._deliveries[index].message

    def __iter__(self) -> Iterator[Trajectory]:
        return (d.message for d in self._deliveries)

    def __enter__(self) -> TrajectoryBatch:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if exc_type is None:
            self.ack()

    def __repr__(self) -> str:
        return f"TrajectoryBatch({len(self)} trajectories, acked={self.acked})"


def _sampling(sampling: SamplingParams | Mapping[str, Any] | None) -> SamplingParams | None:
    if sampling is None or isinstance(sampling, SamplingParams):
        return sampling
    if not isinstance(sampling, Mapping):
        raise TypeError(
            f"sampling must be a psgpo.v1.SamplingParams or a mapping, got {type(sampling).__name__}"
        )
    fields = dict(sampling)
    if isinstance(fields.get("stop"), str):
        fields["stop"] = [fields["stop"]]
    return SamplingParams(**fields)  # ValueError names an unknown field


class PsgpoRun:
    """One run's queues and policy in Redis (`psgpo:{run}:*`).

    redis_url: `redis://`, `rediss://` (TLS) or `unix://`; run: 1-64 characters of [A-Za-z0-9_.-].
    claim_idle_ms: trajectories another consumer left unacknowledged this long are reclaimed;
    max_deliveries: an entry delivered more often goes to the dead-letter stream.
    """

    def __init__(
        self,
        redis_url: str,
        run: str,
        *,
        claim_idle_ms: int = 60_000,
        max_deliveries: int = 5,
        socket_timeout_s: float = 30.0,
    ):
        self.run = keys.validate_run(run)
        self.keys = keys.run_keys(run)
        self.claim_idle_ms = claim_idle_ms
        self.max_deliveries = max_deliveries
        self.redis = connect(redis_url, socket_timeout_s=socket_timeout_s)
        self.stats = RunStats()

    # -- tasks --------------------------------------------------------------------------------------

    def enqueue(
        self,
        prompt: str,
        tests: TestsLike,
        n: int,
        sampling: SamplingParams | Mapping[str, Any] | None = None,
        task_id: str | None = None,
        score_with_prm: bool = True,
        metadata: Mapping[str, str] | None = None,
    ) -> str:
        """Adds a task (generate `n` samples of `prompt`, run them against `tests`) to
        `psgpo:{run}:tasks`; returns its task_id (a fresh uuid4 hex unless given).

        tests: anything `services.client.testspec.parse_tests` accepts (sandbox dataclasses, a
        TestSpec proto, MBPP asserts, HumanEval / stdio / call mappings). sampling: a SamplingParams
        proto or a mapping of its fields (temperature, top_p, top_k, max_new_tokens, seed, stop);
        None leaves the worker's default (temperature 1, 256 new tokens). metadata: strings copied
        to every trajectory; `{"program": "response"}` runs the response alone instead of
        prompt + response (chat-style prompts).

        Task ids must be unique within a run: the trajectories of a repeated id are dropped as
        duplicates, which also makes retrying a failed enqueue safe.
        """
        if not isinstance(prompt, str) or not prompt.strip():
            raise ValueError("prompt must be a non-empty string")
        if not 1 <= n <= MAX_SAMPLES:
            raise ValueError(f"n must be in 1..{MAX_SAMPLES}, got {n}")
        task = Task(
            schema_version=keys.SCHEMA_VERSION,
            task_id=task_id or uuid.uuid4().hex,
            prompt=prompt,
            tests=to_proto(tests),
            n=n,
            score_with_prm=score_with_prm,
        )
        params = _sampling(sampling)
        if params is not None:
            task.sampling.CopyFrom(params)
        for key, value in (metadata or {}).items():
            task.metadata[key] = value  # TypeError for a non-string
        with_backoff(lambda: enqueue_task(self.redis, self.run, task), what="enqueue task")
        self.stats.enqueued += 1
        return task.task_id

    def tasks_backlog(self) -> Backlog:
        """Tasks the rollout workers (group `rollout`) have not acknowledged yet."""
        return backlog(self.redis, self.keys.tasks, keys.TASKS_GROUP)

    # -- trajectories -------------------------------------------------------------------------------

    def trajectories(
        self,
        consumer: str = "trainer-0",
        batch: int = 32,
        block_ms: int = 2000,
        max_items: int | None = None,
        idle_timeout_s: float | None = None,
        max_staleness: int | None = None,
    ) -> Iterator[TrajectoryBatch]:
        """Batches of up to `batch` scored trajectories for `consumer` in group `trainer`, its own
        unacknowledged ones first. Each read waits up to `block_ms` for new entries.

        Ends after `max_items` trajectories, or once nothing arrived for `idle_timeout_s`; with both
        None it runs until you stop iterating. `max_staleness`: trajectories whose policy_version is
        more than this many versions behind the published one are acknowledged and dropped (counted
        in `stats.stale_dropped`). Acknowledge every batch you use: see the module docstring.
        """
        if batch < 1:
            raise ValueError("batch must be positive")
        if max_items is not None and max_items < 1:
            raise ValueError("max_items must be positive")
        stream = trajectory_consumer(
            self.redis,
            self.run,
            consumer,
            claim_idle_ms=self.claim_idle_ms,
            max_deliveries=self.max_deliveries,
        )
        return self._batches(stream, batch, block_ms, max_items, idle_timeout_s, max_staleness)

    def _batches(
        self,
        stream: StreamConsumer[Trajectory],
        batch: int,
        block_ms: int,
        max_items: int | None,
        idle_timeout_s: float | None,
        max_staleness: int | None,
    ) -> Iterator[TrajectoryBatch]:
        yielded = 0
        last_arrival = time.monotonic()
        while max_items is None or yielded < max_items:
            count = batch if max_items is None else min(batch, max_items - yielded)
            read = partial(stream.read, count=count, block_ms=block_ms)
            deliveries = with_backoff(read, what="read trajectories")
            if deliveries:
                last_arrival = time.monotonic()
                deliveries = self._drop_stale(stream, deliveries, max_staleness)
            if not deliveries:
                if idle_timeout_s is not None and time.monotonic() - last_arrival >= idle_timeout_s:
                    return
                continue
            yielded += len(deliveries)
            self.stats.yielded += len(deliveries)
            yield TrajectoryBatch(stream, deliveries, self)

    def _drop_stale(
        self,
        stream: StreamConsumer[Trajectory],
        deliveries: list[Delivery[Trajectory]],
        max_staleness: int | None,
    ) -> list[Delivery[Trajectory]]:
        if max_staleness is None:
            return deliveries
        oldest = self.policy_version() - max_staleness
        stale = [d for d in deliveries if d.message.policy_version < oldest]
        if stale:
            with_backoff(lambda: stream.ack(*stale), what="ack stale trajectories")
            self.stats.stale_dropped += len(stale)
        return [d for d in deliveries if d.message.policy_version >= oldest]

    def backlog(self) -> Backlog:
        """Trajectories group `trainer` has not acknowledged: `.undelivered`, `.pending`, `.unconsumed`.
        Rollout workers pause while `.unconsumed` is at their `max_backlog`."""
        return backlog(self.redis, self.keys.trajectories, keys.TRAJECTORIES_GROUP)

    def trim(self) -> int:
        """Deletes task and trajectory entries every group has acknowledged; returns how many."""
        return trim_acknowledged(self.redis, self.keys.tasks) + trim_acknowledged(
            self.redis, self.keys.trajectories
        )

    # -- policy weights -----------------------------------------------------------------------------

    def publish_weights(
        self,
        version: int,
        path_or_state_dict: Path | str | Mapping[str, Any],
        store_dir: Path | str,
        serve_uri: str | None = None,
        keep: int | None = None,
    ) -> PolicyVersion:
        """Publishes policy `version` (> the current one; versions start at 1): writes the weights
        (a .safetensors file, or a dict of tensors: the full state dict) to
        `store_dir/policy-v{version:012d}.safetensors` with its sha256, sets `psgpo:{run}:policy`
        and announces it on `psgpo:{run}:policy:events`. Workers read `store_dir` at the same path
        (`file://` URI) unless `serve_uri` names a `grpc://host:port` WeightsServer over `store_dir`.
        `keep`: delete all but the newest `keep` blobs afterwards. WeightsError for a stale version.
        """
        publisher = WeightPublisher(self.redis, self.run, store_dir, serve_uri=serve_uri, keep=keep)
        return publisher.publish(version, path_or_state_dict)

    def policy(self) -> PolicyVersion | None:
        """The published policy (version, uri, sha256, size, format), or None before the first."""
        return read_policy(self.redis, self.run)

    def policy_version(self) -> int:
        """The published policy version; 0 before the first publish."""
        policy = self.policy()
        return 0 if policy is None else int(policy.version)

    # -- lifetime -----------------------------------------------------------------------------------

    def close(self) -> None:
        self.redis.close()

    def __enter__(self) -> PsgpoRun:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"PsgpoRun(run={self.run!r})"
