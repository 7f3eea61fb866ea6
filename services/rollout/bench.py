"""`psgpo bench pipeline`: rollouts per second through the services (Redis streams, a rollout worker
process, the PRM and sandbox services over gRPC) vs the same generation and scoring in one process
(the same backend, the sandbox core and the PRM scorer called directly), same model, same tasks,
same machine, one run.
"""

from __future__ import annotations

import asyncio
import json
import os
import platform
import tempfile
import time
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry
from rich.console import Console
from rich.table import Table

from psgpo.v1 import rollout_pb2, sandbox_pb2
from services.common import keys
from services.common.procs import start_service
from services.rollout.backend import SamplingConfig
from services.rollout.scoring import score_task

console = Console()
PROMPT = "def add(a, b):\n    # add two numbers\n"
TESTS = sandbox_pb2.TestSpec(assert_tests=sandbox_pb2.AssertTests(code="assert add(1, 2) == 3\n"))


def make_tasks(count: int, n: int, max_new_tokens: int) -> list[rollout_pb2.Task]:
    return [
        rollout_pb2.Task(
            task_id=f"bench-{i}",
            prompt=f"{PROMPT}    # variant {i}\n",
            tests=TESTS,
            n=n,
            sampling=rollout_pb2.SamplingParams(temperature=1.0, max_new_tokens=max_new_tokens, seed=1 + i),
            score_with_prm=True,
        )
        for i in range(count)
    ]


class _LocalSandbox:
    def __init__(self, core) -> None:
        self.core = core

    async def run_many(self, requests):
        from services.sandbox.convert import request_from_pb, result_to_pb

        return [result_to_pb(r) for r in await self.core.run_batch([request_from_pb(q) for q in requests])]


class _LocalPrm:
    model = "prm"

    def __init__(self, core) -> None:
        self.core = core

    async def score(self, items, aggregate: str = "min"):
        return await self.core.score(list(items), aggregate)


async def in_process(models: Path, tasks: list[rollout_pb2.Task], per_batch: int) -> dict[str, float]:
    """Generation, sandbox and PRM scoring in this process: no Redis, no gRPC, no HTTP."""
    from services.prm.config import PrmSettings
    from services.prm.core import PrmCore
    from services.prm.scorer import PrmScorer
    from services.rollout.backend_hf import HfBackend
    from services.sandbox.config import SandboxSettings
    from services.sandbox.core import SandboxCore

    backend = HfBackend(models / "policy")
    sandbox = SandboxCore(SandboxSettings(), CollectorRegistry())
    prm = PrmCore(PrmScorer(models / "prm"), PrmSettings(), CollectorRegistry())
    await sandbox.start()
    await prm.start()
    try:
        await _local_batches(backend, sandbox, prm, tasks[:1], per_batch)  # warm-up
        t0 = time.perf_counter()
        count = await _local_batches(backend, sandbox, prm, tasks, per_batch)
        seconds = time.perf_counter() - t0
    finally:
        await prm.stop()
        await sandbox.stop()
        backend.close()
    return {"trajectories": count, "seconds": seconds, "per_s": count / seconds}


async def _local_batches(backend, sandbox, prm, tasks, per_batch: int) -> int:
    count = 0
    for start in range(0, len(tasks), per_batch):
        batch = tasks[start : start + per_batch]
        params = SamplingConfig.from_proto(batch[0].sampling)
        t0 = time.perf_counter()
        seeds = [t.sampling.seed or None for t in batch]
        prompts = [t.prompt for t in batch]
        samples = await asyncio.to_thread(backend.generate, prompts, batch[0].n, params, seeds)
        ms = 1000 * (time.perf_counter() - t0)
        scored = await asyncio.gather(
            *(
                score_task(t, s, backend.version, _LocalSandbox(sandbox), _LocalPrm(prm), 1, 60, 10, ms)
                for t, s in zip(batch, samples, strict=True)
            )
        )
        count += sum(len(x.SerializeToString()) > 0 for trajs in scored for x in trajs)
    return count


def through_services(
    models: Path, tasks: list[rollout_pb2.Task], per_batch: int, out: Path
) -> dict[str, float]:
    """Redis + a rollout worker process + PRM and sandbox service processes, over gRPC."""
    from services.common.redis_local import start_redis
    from services.common.streams import connect, enqueue_task, enqueue_tasks

    run = "bench"
    logs = out / "bench_pipeline_logs"
    with start_redis() as redis_server:
        r = connect(redis_server.url)
        ports = ["--http-port", "0", "--grpc-port", "0"]
        prm = start_service("prm", ["--model", str(models / "prm"), *ports], logs / "prm.log")
        sandbox = start_service("sandbox", ports, logs / "sandbox.log")
        env = {
            "ROLLOUT_TASKS_PER_BATCH": str(per_batch),
            "ROLLOUT_WEIGHTS_CACHE": str(out / "bench_pipeline_weights"),
        }
        args = ["--policy", str(models / "policy"), "--redis", redis_server.url, "--run", run,
                "--prm", prm.grpc_target, "--sandbox", sandbox.grpc_target]  # fmt: skip
        worker = _start_worker(args, env, logs / "rollout.log")
        try:
            k = keys.run_keys(run)
            warm = rollout_pb2.Task()
            warm.CopyFrom(tasks[0])
            warm.task_id = "warm-up"
            enqueue_task(r, run, warm)
            _wait(r, k.trajectories, warm.n, 300)
            t0 = time.perf_counter()
            enqueue_tasks(r, run, tasks)  # a trainer enqueues a step's tasks at once
            expected = warm.n + sum(t.n for t in tasks)
            _wait(r, k.trajectories, expected, 600)
            seconds = time.perf_counter() - t0
        finally:
            worker.terminate()
            worker.wait(30)
            prm.stop()
            sandbox.stop()
            r.close()
    count = expected - warm.n
    return {"trajectories": count, "seconds": seconds, "per_s": count / seconds}


def _start_worker(args: list[str], env: dict[str, str], log_path: Path):
    import subprocess
    import sys

    log_path.parent.mkdir(parents=True, exist_ok=True)
    return subprocess.Popen(
        [sys.executable, "-m", "services.cli", "serve", "rollout", *args],
        stdout=subprocess.DEVNULL,
        stderr=log_path.open("w"),
        env={**os.environ, **env},
    )


def _wait(r, stream: str, count: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while r.xlen(stream) < count:
        if time.monotonic() > deadline:
            raise TimeoutError(f"only {r.xlen(stream)} of {count} trajectories after {timeout:.0f}s")
        time.sleep(0.02)


def run_bench(out: Path, models: Path | None = None, quick: bool = False) -> dict[str, Any]:
    out.mkdir(parents=True, exist_ok=True)
    count, n, new_tokens, per_batch = (8, 4, 32, 4) if quick else (32, 4, 64, 8)
    tasks = make_tasks(count, n, new_tokens)
    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        if models is None:
            from trainer.models.tiny import build_tiny

            console.print("building the tiny models ...")
            build_tiny(Path(tmp))
            models = Path(tmp)
        console.print(f"in one process: {count} tasks x {n} samples x {new_tokens} new tokens ...")
        local = asyncio.run(in_process(models, tasks, per_batch))
        console.print("through Redis + rollout worker + PRM and sandbox services ...")
        served = through_services(models, tasks, per_batch, out)
    result = {
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
        "config": {"tasks": count, "n": n, "max_new_tokens": new_tokens, "tasks_per_batch": per_batch},
        "in_process": local,
        "services": served,
        "ratio_services_vs_in_process": served["per_s"] / local["per_s"],
        "target": ">= 0.8",
        "quick": quick,
        "seconds": time.perf_counter() - t_start,
    }
    (out / "bench_pipeline.json").write_text(json.dumps(result, indent=2))
    table = Table(title=f"psgpo bench pipeline (tiny policy and PRM, {os.cpu_count()} CPUs)")
    for col in ("path", "trajectories", "seconds", "trajectories/s"):
        table.add_column(col)
    table.add_row(
        "one process", str(local["trajectories"]), f"{local['seconds']:.2f}", f"{local['per_s']:.1f}"
    )
    table.add_row(
        "services", str(served["trajectories"]), f"{served['seconds']:.2f}", f"{served['per_s']:.1f}"
    )
    console.print(table)
    console.print(f"services / one process: {result['ratio_services_vs_in_process']:.2f} (target >= 0.8)")
    console.print(f"wrote {out / 'bench_pipeline.json'}")
    return result
