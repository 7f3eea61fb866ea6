"""Samples → scored trajectories (no transport: the sandbox and the PRM come in as ports).

A failed sandbox or PRM call is retried a bounded number of times, then recorded in
`Trajectory.failures` (component, reason, attempts): the trajectory carries no verdict or no PRM
scores, never a made-up reward.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Protocol, TypeVar

from psgpo.v1 import rollout_pb2, sandbox_pb2
from services.common.keys import SCHEMA_VERSION
from services.common.lines import split_lines, token_index_for_lines
from services.prm.client import ItemScore
from services.rollout.backend import Sample

T = TypeVar("T")


class SandboxPort(Protocol):
    async def run_many(self, requests: Sequence[sandbox_pb2.RunRequest]) -> list[sandbox_pb2.RunResult]: ...


class PrmPort(Protocol):
    async def score(self, items: Sequence[tuple[str, str]], aggregate: str = "min") -> list[ItemScore]: ...


def program_for(task: rollout_pb2.Task, response: str) -> str:
    """What the sandbox runs: prompt + response (completion style, e.g. HumanEval), or the response
    alone when the task's metadata says `program: response` (chat style)."""
    if task.metadata.get("program") == "response":
        return response
    return task.prompt + response


def task_problem(task: rollout_pb2.Task) -> str | None:
    """Why a task cannot be rolled out, or None."""
    if not task.task_id:
        return "task has no task_id"
    if not task.prompt.strip():
        return "task has an empty prompt"
    if task.tests.WhichOneof("kind") is None:
        return "task has no tests"
    if task.n < 1 or task.n > 1024:
        return f"task asks for n={task.n} samples (1..1024)"
    return None


def failure_trajectory(task: rollout_pb2.Task, reason: str) -> rollout_pb2.Trajectory:
    """The record a task that cannot be rolled out leaves in the trajectories stream (sample 0)."""
    return rollout_pb2.Trajectory(
        schema_version=SCHEMA_VERSION,
        trajectory_id=f"{task.task_id}:0",
        task_id=task.task_id,
        sample_index=0,
        prompt=task.prompt,
        failures=[rollout_pb2.ScoringFailure(component="task", reason=reason, attempts=1)],
        metadata=dict(task.metadata),
    )


async def with_retries(
    call: Callable[[], Awaitable[T]], retries: int, timeout_s: float
) -> tuple[T | None, str, int]:
    """(result, "", attempts) or (None, last error, attempts) after `retries` + 1 attempts."""
    error = ""
    for attempt in range(1, retries + 2):
        try:
            return await asyncio.wait_for(call(), timeout_s), "", attempt
        except Exception as exc:  # recorded below, never turned into a default reward
            error = f"{type(exc).__name__}: {exc}"[:500]
            if attempt <= retries:
                await asyncio.sleep(min(2.0, 0.1 * 2 ** (attempt - 1)))
    return None, error, retries + 1


def line_spans(response: str, token_char_ends: Sequence[int]) -> list[rollout_pb2.LineSpan]:
    """Lines of the response placed on the policy's own sampled tokens."""
    lines = split_lines(response)
    indices = token_index_for_lines(lines, token_char_ends)
    return [
        rollout_pb2.LineSpan(line=ln.index, start=ln.start, end=ln.end, token_index=i, neutral=ln.neutral)
        for ln, i in zip(lines, indices, strict=True)
    ]


def build_trajectory(
    task: rollout_pb2.Task,
    index: int,
    sample: Sample,
    policy_version: int,
    verdict: sandbox_pb2.RunResult | None,
    prm_item: ItemScore | None,
    prm_model: str,
    failures: list[rollout_pb2.ScoringFailure],
    timings: rollout_pb2.Timings,
) -> rollout_pb2.Trajectory:
    traj = rollout_pb2.Trajectory(
        schema_version=SCHEMA_VERSION,
        trajectory_id=f"{task.task_id}:{index}",
        task_id=task.task_id,
        sample_index=index,
        policy_version=policy_version,
        prompt=task.prompt,
        response=sample.text,
        prompt_token_ids=sample.prompt_token_ids,
        response_token_ids=sample.response_token_ids,
        logprobs=sample.logprobs,
        lines=line_spans(sample.text, sample.token_char_ends),
        finish_reason=sample.finish_reason,
        failures=failures,
        timings=timings,
        metadata=dict(task.metadata),
    )
    if verdict is not None:
        traj.verdict.CopyFrom(verdict)
    if prm_item is not None:
        traj.prm_scores.extend(math.nan if ln.score is None else ln.score for ln in prm_item.lines)
        traj.has_prm_scores = True
        traj.prm_model = prm_model
    return traj


async def score_task(
    task: rollout_pb2.Task,
    samples: Sequence[Sample],
    policy_version: int,
    sandbox: SandboxPort,
    prm: PrmPort | None,
    retries: int,
    timeout_s: float,
    run_timeout_s: float,
    generate_ms: float,
) -> list[rollout_pb2.Trajectory]:
    """Sandbox verdicts and PRM line scores for every sample of one task, concurrently."""
    requests = [
        sandbox_pb2.RunRequest(code=program_for(task, s.text), tests=task.tests, timeout_s=run_timeout_s)
        for s in samples
    ]

    async def timed(call: Callable[[], Awaitable[T]]) -> tuple[tuple[T | None, str, int], float]:
        t0 = time.perf_counter()
        out = await with_retries(call, retries, timeout_s)
        return out, 1000 * (time.perf_counter() - t0)

    jobs = [timed(lambda: sandbox.run_many(requests))]
    want_prm = task.score_with_prm
    if want_prm and prm is not None:
        jobs.append(timed(lambda: prm.score([(task.prompt, s.text) for s in samples])))
    results = await asyncio.gather(*jobs)
    (verdicts, sandbox_error, sandbox_attempts), sandbox_ms = results[0]
    prm_items, prm_error, prm_attempts, prm_ms = None, "", 0, 0.0
    if len(results) > 1:
        (prm_items, prm_error, prm_attempts), prm_ms = results[1]
    failures: list[rollout_pb2.ScoringFailure] = []
    if verdicts is None:
        failures.append(
            rollout_pb2.ScoringFailure(component="sandbox", reason=sandbox_error, attempts=sandbox_attempts)
        )
    if want_prm and prm is None:
        failures.append(rollout_pb2.ScoringFailure(component="prm", reason="no PRM configured", attempts=0))
    elif want_prm and prm_items is None:
        failures.append(rollout_pb2.ScoringFailure(component="prm", reason=prm_error, attempts=prm_attempts))
    timings = rollout_pb2.Timings(generate_ms=generate_ms, sandbox_ms=sandbox_ms, prm_ms=prm_ms)
    prm_model = getattr(prm, "model", "") or ""  # the PRM clients record the served model's name
    return [
        build_trajectory(
            task,
            i,
            sample,
            policy_version,
            verdicts[i] if verdicts is not None else None,
            prm_items[i] if prm_items is not None else None,
            prm_model,
            failures,
            timings,
        )
        for i, sample in enumerate(samples)
    ]
