"""Where the PPO trainer's trajectories come from: the Redis stream (rank 0), filtered for staleness and
for trajectories whose reward cannot be computed, acknowledged only once their update is committed."""

from __future__ import annotations

import logging
import math
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from psgpo.v1.rollout_pb2 import Trajectory
from trainer.rewards import (
    RewardConfig,
    RewardError,
    trajectory_token_rewards,
)

if TYPE_CHECKING:
    from trainer.ppo import PPOArgs

log = logging.getLogger(__name__)
REDIS_ATTEMPTS = 10  # jittered backoff up to 5 s a try: rides out a Redis restart of several seconds


# =====================================================================================================
# Which trajectories can be trained on
# =====================================================================================================


def skip_reason(traj: Trajectory, cfg: RewardConfig, vocab_size: int, max_positions: int) -> str | None:
    """Why a scored trajectory cannot be trained on (a metric label), or None. Never a made-up reward."""
    components = {f.component for f in traj.failures}
    if "task" in components:
        return "task_failure"  # the worker could not roll the task out at all
    if "sandbox" in components and cfg.use_unit_test_reward:
        return "sandbox_failure"
    if "prm" in components and cfg.use_prm_dense:
        return "prm_failure"
    if not traj.prompt_token_ids:
        return "no_prompt_tokens"
    ids = list(traj.prompt_token_ids) + list(traj.response_token_ids)
    if min(ids) < 0 or max(ids) >= vocab_size:
        return "token_out_of_vocab"
    if len(ids) > max_positions:
        return "too_long"
    try:
        trajectory_token_rewards(traj, cfg)  # NaN logprobs, missing verdict or PRM scores, NaN scores
    except RewardError as exc:
        return exc.reason
    return None


def staleness(traj: Trajectory, version: int) -> int:
    return version - int(traj.policy_version)


# =====================================================================================================
# Rank 0: the trajectory stream, task top-up, acknowledgements
# =====================================================================================================


class StopRequested(Exception):
    """`stop()` turned true while waiting for trajectories: leave without training on a partial batch."""


@dataclass
class Collected:
    trajectories: list[Trajectory]  # exactly trajectories_per_step usable ones
    dropped_stale: int = 0
    skipped: Counter[str] = field(default_factory=Counter)
    wait_s: float = 0.0
    tasks_enqueued: int = 0


def ack_deliveries(consumer: Any, deliveries: Sequence[Any]) -> None:
    """XACK + record the trajectory ids as consumed (one MULTI, `StreamConsumer.ack`); idempotent, so it
    is retried through a Redis restart (`REDIS_ATTEMPTS`)."""
    from services.common.streams import with_backoff

    if deliveries:
        with_backoff(lambda: consumer.ack(*deliveries), attempts=REDIS_ATTEMPTS, what="acknowledging")


class TrajectorySource:
    """Rank 0's side of Redis: reads the `trainer` group, keeps the tasks stream topped up, and holds
    every delivery (used, stale or skipped) until the step that read it is committed."""

    def __init__(self, r: Any, args: PPOArgs, feeder: Any) -> None:
        from services.common import keys
        from services.common.streams import trajectory_consumer

        self.r = r
        self.args = args
        self.keys = keys.run_keys(args.run)
        self.consumer = trajectory_consumer(
            r, args.run, args.consumer_name(), claim_idle_ms=args.claim_idle_ms, max_deliveries=5
        )
        self.feeder = feeder
        self.held: list[Any] = []  # deliveries read but not acknowledged yet (committed at a checkpoint)
        self._held_ids: set[str] = set()

    def acknowledge_committed(self, committed: Sequence[Sequence[str]]) -> int:
        """Acknowledge what a checkpoint already contains (a crash between commit and ack)."""
        from services.common.streams import Delivery

        deliveries = [Delivery(eid, Trajectory(trajectory_id=tid), 0, b"") for eid, tid in committed]
        ack_deliveries(self.consumer, deliveries)
        return len(deliveries)

    def top_up(self, still_needed: int) -> int:
        """Enqueue tasks until the samples in flight (tasks not yet rolled out × n + trajectories not yet
        read) cover this step's remainder and `prefetch_steps` more steps. Returns tasks enqueued."""
        if self.feeder is None:
            return 0
        from services.common import keys
        from services.common.streams import backlog, enqueue_tasks

        n = self.args.samples_per_task
        tasks_waiting = backlog(self.r, self.keys.tasks, keys.TASKS_GROUP).unconsumed
        unread = backlog(self.r, self.keys.trajectories, keys.TRAJECTORIES_GROUP).unconsumed - len(self.held)
        in_flight = tasks_waiting * n + max(0, unread)
        target = still_needed + self.args.prefetch_steps * self.args.trajectories_per_step
        if in_flight >= target:
            return 0
        count = math.ceil((target - in_flight) / n)
        enqueue_tasks(self.r, self.args.run, self.feeder.next_tasks(count))
        return count

    def collect(
        self,
        n: int,
        version: int,
        cfg: RewardConfig,
        vocab_size: int,
        max_positions: int,
        stop: Callable[[], bool] | None = None,
    ) -> Collected:
        """Exactly `n` usable trajectories; stale and unusable ones are counted (and held for the ack)."""
        from services.common.streams import RETRYABLE

        out = Collected([])
        t0 = time.perf_counter()
        deadline = time.monotonic() + self.args.batch_timeout_s
        while len(out.trajectories) < n:
            if stop is not None and stop():
                raise StopRequested
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"only {len(out.trajectories)} of {n} usable trajectories after "
                    f"{self.args.batch_timeout_s}s "
                    f"(run {self.args.run!r}; are rollout workers running? skipped: {dict(out.skipped)}, "
                    f"stale: {out.dropped_stale})"
                )
            try:
                out.tasks_enqueued += self.top_up(n - len(out.trajectories))
                deliveries = self.consumer.read(count=min(64, n - len(out.trajectories)), block_ms=1000)
            except RETRYABLE as exc:  # Redis restarting: wait (bounded by the deadline above), read again
                log.warning("Redis unavailable while collecting (%s); retrying", exc)
                self.consumer.rewind()  # entries delivered in a lost reply are ours: read them again
                time.sleep(1.0)
                continue
            for delivery in deliveries:
                if delivery.id in self._held_ids:  # held already: reclaimed after claim_idle_ms, or re-read
                    continue
                self.held.append(delivery)
                self._held_ids.add(delivery.id)
                traj = delivery.message
                if self.args.max_staleness >= 0 and staleness(traj, version) > self.args.max_staleness:
                    out.dropped_stale += 1
                    continue
                reason = skip_reason(traj, cfg, vocab_size, max_positions)
                if reason is not None:
                    out.skipped[reason] += 1
                    log.warning("skipping trajectory %s: %s", traj.trajectory_id, reason)
                    continue
                out.trajectories.append(traj)
        out.wait_s = time.perf_counter() - t0
        return out

    def commit(self) -> list[tuple[str, str]]:
        """The held deliveries as (entry id, trajectory id): what the next checkpoint covers."""
        return [(d.id, d.message.trajectory_id) for d in self.held]

    def acknowledge_held(self) -> None:
        ack_deliveries(self.consumer, self.held)
        self.held, self._held_ids = [], set()

    def keepalive(self) -> None:
        """Held entries stay ours (reset their idle time, so nobody reclaims them before the commit)."""
        from services.common.streams import with_backoff

        with_backoff(lambda: self.consumer.keepalive(*self.held), attempts=REDIS_ATTEMPTS, what="keepalive")

    def publish(self, publisher: Any, version: int, weights: Any) -> None:
        """`publisher.publish(version, weights)` through a Redis restart. The publish refuses a version
        that is not newer, so a retry after an attempt whose reply was lost finds its version already
        announced: that attempt landed (this trainer is the run's only publisher)."""
        from services.common.streams import with_backoff
        from services.common.weights import read_policy

        tried = False

        def once() -> None:
            nonlocal tried
            if tried:
                current = read_policy(self.r, self.args.run)
                if current is not None and current.version == version:
                    return
            tried = True
            publisher.publish(version, weights)

        with_backoff(once, attempts=REDIS_ATTEMPTS, what=f"publishing policy v{version}")
