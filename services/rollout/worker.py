"""The rollout worker loop: tasks in, scored trajectories out (arq-sized).

Each turn: hot-swap the policy if a newer version was published; wait while the trainer has too
many trajectories unconsumed (back-pressure); read a few tasks (its own unacknowledged ones first,
then ones reclaimed from dead workers, then new ones); generate `n` samples per task; score them in
the sandbox and the PRM concurrently; write the trajectories (idempotent per trajectory id); and
only then acknowledge the tasks. A worker killed at any point loses nothing: its tasks are
redelivered and any trajectory it already wrote is not written twice.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import defaultdict
from dataclasses import dataclass, replace

import redis
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from psgpo.v1 import rollout_pb2
from services.common import keys
from services.common.streams import Delivery, add_trajectory, backlog, default_consumer_name, task_consumer
from services.common.weights import PolicyFollower, WeightsError
from services.rollout.backend import SamplingConfig
from services.rollout.config import RolloutSettings
from services.rollout.scoring import PrmPort, SandboxPort, failure_trajectory, score_task, task_problem

log = logging.getLogger(__name__)
DEFAULT_MAX_NEW_TOKENS = 256


class RolloutMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.tasks = Counter("rollout_tasks_total", "tasks handled", ["outcome"], registry=registry)
        self.trajectories = Counter("rollout_trajectories_total", "trajectories written", registry=registry)
        self.duplicates = Counter(
            "rollout_duplicate_trajectories_total", "already written", registry=registry
        )
        self.failures = Counter(
            "rollout_scoring_failures_total", "recorded failures", ["component"], registry=registry
        )
        self.generate_seconds = Histogram(
            "rollout_generate_seconds", "generation time per batch", registry=registry
        )
        self.tokens = Counter(
            "rollout_generated_tokens_total", "response tokens generated", registry=registry
        )
        self.policy_version = Gauge("rollout_policy_version", "policy version in use", registry=registry)
        self.backlog = Gauge("rollout_trajectory_backlog", "trajectories not yet consumed", registry=registry)
        self.redis_errors = Counter("rollout_redis_errors_total", "Redis outages seen", registry=registry)
        self.swap_errors = Counter(
            "rollout_weight_swap_errors_total", "refused weight updates", registry=registry
        )


def sampling_for(task: rollout_pb2.Task) -> SamplingConfig:
    """The task's sampling params; a task without them samples at temperature 1 (ValueError if bad)."""
    if not task.HasField("sampling"):
        return SamplingConfig(temperature=1.0, max_new_tokens=DEFAULT_MAX_NEW_TOKENS)
    return SamplingConfig.from_proto(task.sampling)


@dataclass
class _Job:
    delivery: Delivery[rollout_pb2.Task]
    params: SamplingConfig


class RolloutWorker:
    def __init__(
        self,
        settings: RolloutSettings,
        backend,  # services.rollout.backend.GenerationBackend
        sandbox: SandboxPort,
        prm: PrmPort | None,
        r: redis.Redis,
        registry: CollectorRegistry | None = None,
    ) -> None:
        self.settings = settings
        self.backend = backend
        self.sandbox = sandbox
        self.prm = prm
        self.r = r
        self.run_name = keys.validate_run(settings.run)
        self.consumer = settings.consumer or f"rollout-{default_consumer_name()}"
        self.tasks = task_consumer(
            r,
            self.run_name,
            self.consumer,
            claim_idle_ms=settings.claim_idle_ms,
            max_deliveries=settings.max_deliveries,
        )
        self.follower = PolicyFollower(r, self.run_name, settings.weights_cache, version=backend.version)
        self.metrics = RolloutMetrics(registry or CollectorRegistry())
        self.metrics.policy_version.set(backend.version)
        self.tasks_done = 0
        self._inflight: asyncio.Task[None] | None = None
        on_gpu = str(getattr(backend, "device", "cpu")).startswith("cuda")
        self.pipelined = settings.pipeline == "on" or (settings.pipeline == "auto" and on_gpu)

    # -- the loop ------------------------------------------------------------------------------------

    async def run(self, stop: asyncio.Event, max_tasks: int | None = None) -> int:
        """Serve until `stop` is set (or `max_tasks` tasks are done); returns tasks done.

        Pipelined: while batch k is scored by the sandbox and the PRM (other processes), batch k+1
        is generated; at most one batch is being scored at a time."""
        outage = 0
        while not stop.is_set() and (max_tasks is None or self.tasks_done < max_tasks):
            try:
                await self.turn()
                outage = 0
            except (redis.ConnectionError, redis.TimeoutError) as exc:
                # Redis down or restarting: unacknowledged tasks stay pending and come back to us.
                outage += 1
                self.metrics.redis_errors.inc()
                self._inflight = None  # its tasks were not acknowledged: they come back via rewind
                self.tasks.rewind()
                delay = min(5.0, 0.2 * 2**outage)
                log.warning("Redis unavailable (%s); retrying in %.1fs", exc, delay)
                await asyncio.sleep(delay)
        await self._settle()
        return self.tasks_done

    async def _settle(self) -> None:
        """Wait for the batch being scored (its errors surface here)."""
        inflight, self._inflight = self._inflight, None
        if inflight is not None:
            await inflight

    async def turn(self) -> None:
        await self.maybe_swap_weights()
        if not await self.has_capacity():
            await self._settle()
            await asyncio.sleep(0.5)
            return
        if not self.pipelined:
            deliveries = await asyncio.to_thread(self.tasks.read, self.settings.tasks_per_batch, 1000)
            if deliveries:
                await self.process(deliveries)
            return
        busy = self._inflight is not None and not self._inflight.done()
        deliveries = await asyncio.to_thread(
            self.tasks.read, self.settings.tasks_per_batch, 20 if busy else 1000
        )
        if not deliveries:
            if self._inflight is not None and self._inflight.done():
                await self._settle()
            return
        ready, scoring = await self.generate(deliveries)
        await self._settle()
        self._inflight = asyncio.create_task(self.finish(ready, scoring))

    async def process(self, deliveries: list[Delivery[rollout_pb2.Task]]) -> None:
        """Generate, score, write, then acknowledge one batch of tasks (not pipelined)."""
        ready, scoring = await self.generate(deliveries)
        await self.finish(ready, scoring)

    async def maybe_swap_weights(self) -> None:
        """Hot-swap between generation batches; a bad blob is refused and the old weights stay."""
        try:
            update = await asyncio.to_thread(self.follower.update, 0.0)
        except WeightsError as exc:
            self.metrics.swap_errors.inc()
            log.error("weight update refused, keeping version %d: %s", self.backend.version, exc)
            return
        if update is None:
            return
        try:
            await asyncio.to_thread(self.backend.load_weights, update.path, update.policy.version)
        except (ValueError, OSError) as exc:  # IncompatibleWeights is a ValueError
            self.metrics.swap_errors.inc()
            log.error(
                "cannot load policy v%d, keeping v%d: %s", update.policy.version, self.backend.version, exc
            )
            return
        self.metrics.policy_version.set(self.backend.version)
        log.info("policy hot-swapped to version %d", self.backend.version)

    async def has_capacity(self) -> bool:
        k = keys.run_keys(self.run_name)
        pending = await asyncio.to_thread(
            backlog, self.r, k.trajectories, keys.TRAJECTORIES_GROUP, cap=self.settings.max_backlog
        )
        self.metrics.backlog.set(pending.unconsumed)
        return pending.unconsumed < self.settings.max_backlog

    async def generate(self, deliveries: list[Delivery[rollout_pb2.Task]]) -> tuple[list, list]:
        """Samples for every valid task: (tasks already settled with a failure record, scoring jobs)."""
        out: list[tuple[Delivery[rollout_pb2.Task], list[rollout_pb2.Trajectory]]] = []
        groups: dict[tuple, list[_Job]] = defaultdict(list)
        for d in deliveries:
            problem = task_problem(d.message)
            params = None
            if problem is None:
                try:
                    params = sampling_for(d.message)
                except ValueError as exc:
                    problem = f"bad sampling params: {exc}"
            if problem is not None:
                log.warning("task %s refused: %s", d.message.task_id, problem)
                self.metrics.tasks.labels("refused").inc()
                out.append((d, [failure_trajectory(d.message, problem)]))
                continue
            # tasks that differ only in their seed batch together (the backend seeds per prompt)
            groups[(repr(replace(params, seed=None)), d.message.n)].append(_Job(d, params))
        scoring = []
        for (_, n), group in groups.items():
            problems = self.backend.prompt_problems(
                [job.delivery.message.prompt for job in group], group[0].params.max_new_tokens
            )
            jobs = []
            for job, problem in zip(group, problems, strict=True):
                if problem is None:
                    jobs.append(job)
                else:
                    out.append((job.delivery, [failure_trajectory(job.delivery.message, problem)]))
                    self.metrics.tasks.labels("refused").inc()
            if not jobs:
                continue
            prompts = [job.delivery.message.prompt for job in jobs]
            t0 = time.perf_counter()
            try:
                seeds = [job.params.seed for job in jobs]
                samples = await asyncio.to_thread(self.backend.generate, prompts, n, jobs[0].params, seeds)
            except ValueError as exc:  # e.g. a prompt over the model's limit: a task problem, not a crash
                for job in jobs:
                    out.append(
                        (job.delivery, [failure_trajectory(job.delivery.message, f"generation: {exc}")])
                    )
                    self.metrics.tasks.labels("refused").inc()
                continue
            seconds = time.perf_counter() - t0
            self.metrics.generate_seconds.observe(seconds)
            version = self.backend.version
            for job, task_samples in zip(jobs, samples, strict=True):
                self.metrics.tokens.inc(sum(len(s.response_token_ids) for s in task_samples))
                scoring.append(
                    (
                        job.delivery,
                        score_task(
                            job.delivery.message,
                            task_samples,
                            version,
                            self.sandbox,
                            self.prm,
                            self.settings.scoring_retries,
                            self.settings.scoring_timeout_s,
                            self.settings.sandbox_timeout_s,
                            1000 * seconds / len(jobs),
                        ),
                    )
                )
        return out, scoring

    async def finish(self, out: list, scoring: list) -> None:
        """Score concurrently, write every trajectory, then acknowledge the tasks."""
        scored = await asyncio.gather(*(coro for _, coro in scoring))
        out.extend((d, trajs) for (d, _), trajs in zip(scoring, scored, strict=True))
        await asyncio.to_thread(self._write_and_ack, out)

    def _write_and_ack(
        self, out: list[tuple[Delivery[rollout_pb2.Task], list[rollout_pb2.Trajectory]]]
    ) -> None:
        for delivery, trajectories in out:
            for traj in trajectories:
                for failure in traj.failures:
                    self.metrics.failures.labels(failure.component).inc()
                if add_trajectory(self.r, self.run_name, traj) is None:
                    self.metrics.duplicates.inc()
                else:
                    self.metrics.trajectories.inc()
            self.tasks.ack(delivery)  # only after every trajectory of the task is in Redis
            self.tasks_done += 1
            if not (
                trajectories and trajectories[0].failures and trajectories[0].failures[0].component == "task"
            ):
                self.metrics.tasks.labels("done").inc()
