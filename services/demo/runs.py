"""PPO runs of the demo as users run them: `psgpo serve rollout` + `psgpo train ppo` child processes
on the stack of `psgpo up`, a few runs at once, each on its own Redis run name."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from services.common.procs import parent_env
from services.demo.config import VARIANTS, DemoConfig


@dataclass(frozen=True)
class Endpoints:
    """Where the stack's services listen."""

    redis_url: str
    sandbox_grpc: str
    sandbox_http: str
    prm_grpc: str | None = None


def child_env(**extra: str) -> dict[str, str]:
    """One torch thread per child: the demo runs several model processes on a few cores."""
    return {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "PYTHONUNBUFFERED": "1",
        **parent_env(),  # a killed demo leaves no trainer or worker behind
        **extra,
    }


def start_worker(
    policy: Path, run: str, ends: Endpoints, log_path: Path, weights: Path, prm: bool, consumer: str = "w0"
) -> subprocess.Popen[bytes]:
    """`psgpo serve rollout` for one run name (with PRM scoring when `prm`)."""
    args = [
        "--policy",
        str(policy),
        "--redis",
        ends.redis_url,
        "--run",
        run,
        "--sandbox",
        ends.sandbox_grpc,
        "--consumer",
        consumer,
    ]
    if prm:
        if ends.prm_grpc is None:
            raise RuntimeError("a PRM-scoring worker needs the PRM service")
        args += ["--prm", ends.prm_grpc]
    log_path.parent.mkdir(parents=True, exist_ok=True)
    return subprocess.Popen(
        [sys.executable, "-m", "services.cli", "serve", "rollout", *args],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=log_path.open("a"),
        env=child_env(ROLLOUT_WEIGHTS_CACHE=str(weights)),
    )


@contextmanager
def serving(
    policy: Path, run: str, ends: Endpoints, logs: Path, weights: Path, count: int, name: str
) -> Iterator[None]:
    """`count` rollout workers (no PRM scoring) serving `policy` on `run` while the block runs; logs
    LOGS/rollout-NAME-i.log, consumers NAME-i."""
    procs = [
        start_worker(
            policy, run, ends, logs / f"rollout-{name}-{i}.log", weights, prm=False, consumer=f"{name}-{i}"
        )
        for i in range(count)
    ]
    try:
        yield
    finally:
        for proc in procs:
            stop(proc)


def stop(proc: subprocess.Popen[Any], timeout: float = 20.0) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@dataclass(frozen=True)
class PpoRun:
    """One (variant, seed) PPO run."""

    variant: str
    seed: int
    out_dir: Path
    run: str
    """Redis run name (psgpo:{run}:...)."""

    @property
    def name(self) -> str:
        return f"{self.variant}-s{self.seed}"

    def metrics(self) -> list[dict[str, Any]]:
        path = self.out_dir / "metrics.jsonl"
        if not path.is_file():
            return []
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]

    def finished(self, steps: int) -> bool:
        rows = self.metrics()
        return (
            (self.out_dir / "policy" / "config.json").is_file() and bool(rows) and rows[-1]["step"] >= steps
        )


def trainer_command(
    run: PpoRun, cfg: DemoConfig, sft: Path, prm: Path | None, tasks: Path, redis_url: str
) -> list[str]:
    """`psgpo train ppo` for one run: the variant's reward and critic init, the shared hyperparameters."""
    variant = VARIANTS[run.variant]
    flags = {
        "redis-url": redis_url,
        "run": run.run,
        "policy": sft,
        "reward": variant["reward"],
        "value-init": variant["value_init"],
        "task-source": tasks,
        "out-dir": run.out_dir,
        "steps": cfg.steps,
        "trajectories-per-step": cfg.trajectories_per_step,
        "samples-per-task": cfg.samples_per_task,
        "minibatch-size": 16,
        "update-epochs": 2,
        "lr": cfg.lr,
        "critic-lr": cfg.critic_lr,
        "kl-coef": cfg.kl_coef,
        "max-new-tokens": cfg.max_new_tokens,
        "seed": run.seed,
        "device": "cpu",
        "torch-threads": 1,
        "checkpoint-every": max(1, cfg.steps // 2),
        "keep-checkpoints": 2,
        "batch-timeout-s": 600,
    }
    if variant["value_init"] == "prm":
        if prm is None:
            raise RuntimeError(f"variant {run.variant} needs the trained PRM")
        flags["prm-model"] = prm
    args = [sys.executable, "-m", "services.cli", "train", "ppo"]
    for key, value in flags.items():
        args += [f"--{key}", str(value)]
    return args


@dataclass
class _Active:
    run: PpoRun
    worker: subprocess.Popen[bytes]
    trainer: subprocess.Popen[bytes]
    started: float
    log: Path


def run_all(
    runs: Sequence[PpoRun],
    cfg: DemoConfig,
    *,
    sft: Path,
    prm: Path | None,
    tasks: Path,
    ends: Endpoints,
    logs: Path,
    on_done: Callable[[PpoRun, float], None] | None = None,
) -> dict[str, float]:
    """Run every unfinished run, `cfg.parallel_runs` at a time; {run name: seconds}. A run that was
    interrupted resumes from its last checkpoint (the trainer's own resume). Raises RuntimeError naming
    the log of a run that failed; every child is stopped on the way out (also on Ctrl-C)."""
    pending = [r for r in runs if not r.finished(cfg.steps)]
    active: list[_Active] = []
    seconds: dict[str, float] = {}
    try:
        while pending or active:
            while pending and len(active) < cfg.parallel_runs:
                run = pending.pop(0)
                dense = VARIANTS[run.variant]["reward"] == "psgpo"
                worker = start_worker(
                    sft,
                    run.run,
                    ends,
                    logs / f"rollout-{run.name}.log",
                    run.out_dir.parent / "weights" / run.name,
                    prm=dense,
                )
                log = logs / f"ppo-{run.name}.log"
                trainer = subprocess.Popen(
                    trainer_command(run, cfg, sft, prm, tasks, ends.redis_url),
                    stdin=subprocess.DEVNULL,
                    stdout=log.open("a"),
                    stderr=subprocess.STDOUT,
                    env=child_env(),
                )
                active.append(_Active(run, worker, trainer, time.monotonic(), log))
            time.sleep(0.5)
            for a in list(active):
                if a.worker.poll() is not None and a.trainer.poll() is None:
                    stop(a.trainer)
                    raise RuntimeError(
                        f"the rollout worker of {a.run.name} exited ({a.worker.returncode}); "
                        f"see {logs / f'rollout-{a.run.name}.log'}"
                    )
                if a.trainer.poll() is None:
                    continue
                stop(a.worker)
                active.remove(a)
                if a.trainer.returncode != 0:
                    raise RuntimeError(f"psgpo train ppo for {a.run.name} failed; see {a.log}")
                seconds[a.run.name] = time.monotonic() - a.started
                if on_done is not None:
                    on_done(a.run, seconds[a.run.name])
    finally:
        for a in active:
            stop(a.trainer)
            stop(a.worker)
    return seconds
