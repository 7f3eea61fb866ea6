"""Shared pieces of the trainer-loop tests: a rollout worker on a background thread, trajectories made by
the tiny policy itself (for tests that do not need the services), and readers of the trainer's logs."""

from __future__ import annotations

import asyncio
import json
import math
import random
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import redis

from psgpo.v1 import rollout_pb2, sandbox_pb2
from services.common.runner import Running
from services.common.streams import add_trajectory
from services.rollout.config import RolloutSettings
from services.rollout.server import run_worker


def ppo_args(tiny: Path, redis_url: str, run: str, out: Path, **over: Any):  # -> PPOArgs
    """Small, fast PPO arguments on the tiny models (CPU, a few trajectories per step)."""
    from trainer.ppo import PPOArgs

    base: dict[str, Any] = dict(
        redis_url=redis_url,
        run=run,
        policy=tiny / "policy",
        prm_model=tiny / "prm",
        out_dir=out,
        trajectories_per_step=8,
        samples_per_task=4,
        minibatch_size=4,
        update_epochs=2,
        steps=3,
        lr=3e-4,
        critic_lr=3e-4,
        max_new_tokens=16,
        max_staleness=-1,
        batch_timeout_s=90.0,
        prefetch_steps=0,
        device="cpu",
    )
    base.update(over)
    return PPOArgs(**base)


@contextmanager
def rollout_worker(
    redis_url: str, run: str, policy: Path, prm: Running, sandbox: Running, cache: Path
) -> Iterator[None]:
    """A real rollout worker (hf backend, gRPC to the PRM and the sandbox) on a background thread."""
    from services.common.streams import connect
    from services.rollout.backend_hf import HfBackend

    settings = RolloutSettings(
        redis_url=redis_url,
        run=run,
        prm=f"127.0.0.1:{prm.grpc_port}",
        sandbox=f"127.0.0.1:{sandbox.grpc_port}",
        weights_cache=cache,
        tasks_per_batch=4,
        scoring_retries=1,
        scoring_timeout_s=30,
        consumer=f"worker-{run}",
    )
    backend = HfBackend(policy, max_batch_sequences=16, threads=1)
    loop = asyncio.new_event_loop()
    stop = asyncio.Event()
    errors: list[BaseException] = []

    def target() -> None:
        try:
            loop.run_until_complete(run_worker(settings, backend, connect(redis_url), stop))
        except BaseException as exc:  # re-raised in the test thread
            errors.append(exc)

    thread = threading.Thread(target=target, name="rollout-worker", daemon=True)
    thread.start()
    try:
        yield
    finally:
        loop.call_soon_threadsafe(stop.set)
        thread.join(60)
        backend.close()
        loop.close()
    if errors:
        raise errors[0]


def make_trajectories(policy: Path, count: int, seed: int = 0) -> list[rollout_pb2.Trajectory]:
    """`count` trajectories sampled by the tiny policy (real tokens, real raw logprobs, real line
    placement), with made-up verdicts (alternating pass/fail) and PRM scores in [-1, 1]: for tests of the
    trainer alone. Ids are t{i}:0; `renumber` gives copies other ids."""
    from services.rollout.backend import SamplingConfig
    from services.rollout.backend_hf import HfBackend
    from services.rollout.scoring import line_spans

    backend = HfBackend(policy, max_batch_sequences=32, threads=1)
    try:
        prompts = ["def inc(x):\n    return x + 1\n", "x = "]
        per_prompt = math.ceil(count / len(prompts))
        samples = backend.generate(prompts, per_prompt, SamplingConfig(max_new_tokens=12, seed=seed), None)
    finally:
        backend.close()
    rng = random.Random(seed)
    out = []
    flat = [(prompts[i], s) for i, group in enumerate(samples) for s in group][:count]
    for i, (prompt, sample) in enumerate(flat):
        lines = line_spans(sample.text, sample.token_char_ends)
        passed = i % 2 == 0
        traj = rollout_pb2.Trajectory(
            schema_version=1,
            trajectory_id=f"t{i}:0",
            task_id=f"t{i}",
            sample_index=0,
            policy_version=0,
            prompt=prompt,
            response=sample.text,
            prompt_token_ids=sample.prompt_token_ids,
            response_token_ids=sample.response_token_ids,
            logprobs=sample.logprobs,
            lines=lines,
            verdict=sandbox_pb2.RunResult(
                status=sandbox_pb2.RUN_STATUS_PASSED if passed else sandbox_pb2.RUN_STATUS_FAILED,
                passed=passed,
                tests_passed=1 if passed else 0,
                tests_total=1,
            ),
            prm_scores=[math.nan if ln.neutral else rng.uniform(-1, 1) for ln in lines],
            has_prm_scores=True,
            prm_model="prm",
            finish_reason=sample.finish_reason,
        )
        out.append(traj)
    return out


def renumber(traj: rollout_pb2.Trajectory, task_id: str, **over: Any) -> rollout_pb2.Trajectory:
    copy = rollout_pb2.Trajectory()
    copy.CopyFrom(traj)
    copy.task_id, copy.sample_index, copy.trajectory_id = task_id, 0, f"{task_id}:0"
    for key, value in over.items():
        setattr(copy, key, value)
    return copy


def fill_stream(
    r: redis.Redis, run: str, base: list[rollout_pb2.Trajectory], count: int, prefix: str
) -> list[str]:
    """Add `count` trajectories (copies of `base`, ids {prefix}{i}:0) to the run's stream; returns the ids."""
    ids = []
    for i in range(count):
        traj = renumber(base[i % len(base)], f"{prefix}{i}")
        assert add_trajectory(r, run, traj) is not None
        ids.append(traj.trajectory_id)
    return ids


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def trained_ids(out: Path) -> list[str]:
    return [tid for row in read_jsonl(out / "trained_ids.jsonl") for tid in row["ids"]]
