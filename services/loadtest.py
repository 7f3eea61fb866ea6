"""`psgpo bench load`: stepped load at and beyond capacity against the PRM and sandbox services.

Each service runs as deployed (`psgpo serve ...` in its own process, loopback, free ports) with small
admission limits, so that saturation comes quickly on a small machine. Its capacity is the number of
requests it admits at once (sandbox: workers + SANDBOX_MAX_QUEUE; PRM: PRM_MAX_QUEUE_ITEMS one-item
requests). Closed-loop async clients, half over HTTP (httpx) and half over gRPC (grpc.aio, raw bytes),
then drive levels of 1x, 2x, 4x, 8x that many concurrent clients, each for a bounded time. A client
that is shed (429 / RESOURCE_EXHAUSTED) waits a jittered 50-100 ms, as the project's clients' first
retry does, and sends again. Per level: good responses/s, p50/p99 latency of good and of shed
responses, errors by kind, CPU of the driver and of the service, and the service's resident memory;
then a cool-down and the memory growth against a stated bound. Writes OUT/bench_load.json and .md;
asserts nothing itself (tests/load does), but lists every flag: a 5xx, a timeout, a transport error,
memory growth over the bound, slow shedding.
"""

from __future__ import annotations

import asyncio
import os
import platform
import tempfile
import time
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import psutil

from services.common.procs import ServiceProcess, start_service
from services.loadtest_driver import Driver, Workload, rss_mb

SANDBOX_WORKERS = 2
SANDBOX_MAX_QUEUE = 6  # capacity 8 requests: 2 running + 6 waiting
PRM_MAX_QUEUE_ITEMS = 8  # capacity 8 one-item requests waiting for a batch
# One torch thread for the PRM: the driver shares the machine, and torch's 2 OpenMP threads on 2 cores
# with one of them busy elsewhere stall each other (measured: 4 items/s instead of 49).
PRM_THREADS = 1
SHED_P99_LIMIT_S = 1.0


@dataclass(frozen=True)
class Plan:
    multiples: tuple[int, ...] = (1, 2, 4, 8)
    level_s: float = 15.0
    warmup_s: float = 3.0
    cooldown_s: float = 5.0
    request_timeout_s: float = 10.0
    shed_backoff_s: float = 0.05
    rss_bound_mb: float = 50.0
    rss_bound_fraction: float = 0.2

    @classmethod
    def for_seconds(cls, seconds: float, multiples: Sequence[int] = (1, 2, 4, 8)) -> Plan:
        """`seconds` of load per service, split evenly over the levels."""
        level = max(1.0, seconds / len(multiples))
        return cls(tuple(multiples), level, min(3.0, level / 2), max(2.0, min(10.0, seconds / 12)))

    def rss_allowed_mb(self, baseline_mb: float) -> float:
        return max(self.rss_bound_mb, self.rss_bound_fraction * baseline_mb)


# ---------------------------------------------------------------------------------------- one service


async def measure(
    workload: Workload, service: ServiceProcess, plan: Plan, log: Callable[[str], None]
) -> dict:
    driver = Driver(workload, service, plan.request_timeout_s, plan.shed_backoff_s)
    pid = service.proc.pid
    memory: dict[str, Any] = {"start": rss_mb(pid)}
    log(f"{workload.service}: warm-up {plan.warmup_s:.0f}s at 1x")
    await driver.level(workload.capacity, plan.warmup_s)
    memory["baseline"] = rss_mb(pid)
    levels = []
    for multiple in plan.multiples:
        clients = multiple * workload.capacity
        log(f"{workload.service}: {multiple}x capacity = {clients} clients for {plan.level_s:.0f}s")
        row = await driver.level(clients, plan.level_s)
        row.update(multiple=multiple, memory=rss_mb(pid))
        levels.append(row)
    await asyncio.sleep(plan.cooldown_s)
    memory["after_cooldown"] = rss_mb(pid)
    recovery = await driver.one_good()
    base, after = memory["baseline"], memory["after_cooldown"]
    memory["growth_mb"] = after["rss_mb"] - base["rss_mb"]
    memory["tree_growth_mb"] = after["tree_rss_mb"] - base["tree_rss_mb"]
    memory["allowed_mb"] = plan.rss_allowed_mb(base["rss_mb"])
    memory["tree_allowed_mb"] = plan.rss_allowed_mb(base["tree_rss_mb"])
    result = {"capacity": workload.capacity, "levels": levels, "memory": memory, "recovery": recovery}
    result["flags"] = flags(workload.service, result)
    return result


def flags(service: str, result: dict[str, Any]) -> list[str]:
    """Everything a reader must not miss; an empty list is a clean run."""
    out = []
    for row in result["levels"]:
        at = f"{service} {row['multiple']}x"
        for kind in ("server_error", "timeout", "transport_error", "client_error", "bad_result"):
            if row[kind]:
                out.append(f"{at}: {row[kind]} {kind}")
        if row["shed_p99_ms"] is not None and row["shed_p99_ms"] > 1000 * SHED_P99_LIMIT_S:
            out.append(f"{at}: shed p99 {row['shed_p99_ms']:.0f} ms > {SHED_P99_LIMIT_S:.0f} s")
        if row["multiple"] >= 4 and not row["shed"]:
            out.append(f"{at}: nothing shed beyond capacity")
    mem = result["memory"]
    if mem["growth_mb"] > mem["allowed_mb"]:
        out.append(f"{service}: RSS grew {mem['growth_mb']:.0f} MiB > {mem['allowed_mb']:.0f} MiB")
    if mem["tree_growth_mb"] > mem["tree_allowed_mb"]:
        out.append(f"{service}: tree RSS grew {mem['tree_growth_mb']:.0f} MiB > {mem['tree_allowed_mb']:.0f}")
    if result["recovery"]["kind"] != "ok":
        out.append(f"{service}: after the cool-down a request got {result['recovery']['kind']}")
    return out


def prm_workload(n_items: int = 32) -> Workload:
    from psgpo.v1 import prm_pb2
    from services.prm.bench import make_items

    items = make_items(n_items)
    http = [orjson.dumps({"items": [{"prompt": p, "response": r}], "aggregate": "min"}) for p, r in items]
    grpc_bodies = [
        prm_pb2.ScoreRequest(items=[prm_pb2.ScoreItem(prompt=p, response=r)]).SerializeToString()
        for p, r in items
    ]

    def grpc_good(data: bytes) -> bool:
        return len(prm_pb2.ScoreResponse.FromString(data).results) == 1

    return Workload("prm", PRM_MAX_QUEUE_ITEMS, "/v1/score", http, "/psgpo.v1.PrmService/Score",
                    grpc_bodies, lambda data: b'"results":[{"score"' in data, grpc_good)  # fmt: skip


SANDBOX_PROGRAMS = [
    ("def add(a, b):\n    return a + b\n", "assert add(1, 2) == 3\nassert add(-1, 1) == 0\n"),
    ("def rev(s):\n    return s[::-1]\n", "assert rev('abc') == 'cba'\nassert rev('') == ''\n"),
    ("def fib(n):\n    a, b = 0, 1\n    for _ in range(n):\n        a, b = b, a + b\n    return a\n",
     "assert fib(10) == 55\nassert [fib(i) for i in range(5)] == [0, 1, 1, 2, 3]\n"),
]  # fmt: skip


def sandbox_workload() -> Workload:
    from psgpo.v1 import sandbox_pb2
    from services.sandbox.convert import request_to_pb
    from services.sandbox.model import AssertTests, RunRequest

    http = [
        orjson.dumps({"code": code, "tests": {"kind": "assert", "code": test}, "timeout_s": 5})
        for code, test in SANDBOX_PROGRAMS
    ]
    grpc_bodies = [
        request_to_pb(RunRequest(code, AssertTests(test), 5.0, None)).SerializeToString()
        for code, test in SANDBOX_PROGRAMS
    ]

    def grpc_good(data: bytes) -> bool:
        return sandbox_pb2.RunResult.FromString(data).status == sandbox_pb2.RUN_STATUS_PASSED

    return Workload("sandbox", SANDBOX_WORKERS + SANDBOX_MAX_QUEUE, "/v1/run", http,
                    "/psgpo.v1.SandboxService/Run", grpc_bodies,
                    lambda data: orjson.loads(data).get("status") == "passed", grpc_good)  # fmt: skip


def start(name: str, model_dir: Path | None, log_dir: Path) -> ServiceProcess:
    if name == "prm":
        assert model_dir is not None
        env = {
            "PRM_MAX_QUEUE_ITEMS": str(PRM_MAX_QUEUE_ITEMS),
            "PRM_THREADS": str(PRM_THREADS),
            "PRM_LOG_LEVEL": "WARNING",
        }
        args = ["--model", str(model_dir), "--http-port", "0", "--grpc-port", "0"]
        return start_service("prm", args, log_dir / "load_prm.log", env=env)
    env = {"SANDBOX_MAX_QUEUE": str(SANDBOX_MAX_QUEUE), "SANDBOX_LOG_LEVEL": "WARNING"}
    args = ["--http-port", "0", "--grpc-port", "0", "--workers", str(SANDBOX_WORKERS)]
    return start_service("sandbox", args, log_dir / "load_sandbox.log", env=env)


def run_load(out: Path, services: Sequence[str], plan: Plan, model_dir: Path | None = None,
             log: Callable[[str], None] = print) -> dict[str, Any]:  # fmt: skip
    """Start each service in turn, measure it, stop it; write OUT/bench_load.json and .md."""
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    report: dict[str, Any] = {
        "machine": machine(),
        "plan": plan.__dict__ | {"multiples": list(plan.multiples)},
    }
    report["services"] = {}
    with tempfile.TemporaryDirectory() as tmp:
        if "prm" in services and model_dir is None:
            from trainer.models.tiny import TinyConfig, build_tiny

            log("building a tiny PRM (Qwen2, hidden 128, 4 layers) ...")
            build_tiny(Path(tmp), TinyConfig(corpus_bytes=600_000, max_positions=512))
            model_dir = Path(tmp) / "prm"
        for name in services:
            workload = prm_workload() if name == "prm" else sandbox_workload()
            service = start(name, model_dir, out)
            try:
                result = _run_async(measure(workload, service, plan, log))
            finally:
                exit_code = service.stop()
            result["exit_code"] = exit_code
            if exit_code != 0:
                result["flags"].append(f"{name}: exited with {exit_code} on SIGTERM")
            report["services"][name] = result
    report["seconds"] = time.perf_counter() - started
    report["flags"] = [f for s in report["services"].values() for f in s["flags"]]
    (out / "bench_load.json").write_text(orjson.dumps(report, option=orjson.OPT_INDENT_2).decode())
    table = markdown(report)
    (out / "bench_load.md").write_text(table + "\n")
    log(table)
    log(f"wrote {out / 'bench_load.json'} and {out / 'bench_load.md'} in {report['seconds']:.0f}s")
    return report


def machine() -> dict[str, Any]:
    cpu = next((ln.split(":", 1)[1].strip() for ln in _cpuinfo() if ln.startswith("model name")), "?")
    return {
        "cpus": len(os.sched_getaffinity(0)),
        "cpu": cpu,
        "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "load_avg_before": os.getloadavg(),
    }


def _cpuinfo() -> list[str]:
    try:
        return Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return []


def _pct(fraction: float) -> str:
    return "<1" if 0 < fraction < 0.005 else f"{100 * fraction:.0f}"


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f}" if value >= 10 else f"{value:.1f}"


def markdown(report: dict[str, Any]) -> str:
    head = ("| service | load | clients | good/s | p50 ms | p99 ms | shed % | shed p99 ms | 5xx | timeouts "
            "| other errors | CPU % driver / service / others | RSS MiB |")  # fmt: skip
    lines = [head, "|" + "---|" * 13]
    for name, result in report["services"].items():
        for r in result["levels"]:
            other = r["transport_error"] + r["client_error"] + r["bad_result"]
            lines.append(
                f"| {name} | {r['multiple']}x | {r['clients']} | {r['ok_per_s']:.1f} | {_ms(r['ok_p50_ms'])} "
                f"| {_ms(r['ok_p99_ms'])} | {_pct(r['shed_fraction'])} | {_ms(r['shed_p99_ms'])} "
                f"| {r['server_error']} | {r['timeout']} | {other} | {r['driver_cpu_pct']:.0f} / "
                f"{r['service_cpu_pct']:.0f} / {r['other_cpu_pct']:.0f} | {r['memory']['rss_mb']:.0f} |"
            )
    lines += ["", "| service | capacity | RSS baseline MiB | after cool-down | growth | bound | "
              "process tree baseline | after | growth | bound |", "|" + "---|" * 10]  # fmt: skip
    for name, result in report["services"].items():
        m = result["memory"]
        base, after = m["baseline"], m["after_cooldown"]
        lines.append(
            f"| {name} | {result['capacity']} | {base['rss_mb']:.0f} | {after['rss_mb']:.0f} "
            f"| {m['growth_mb']:+.1f} | {m['allowed_mb']:.0f} | {base['tree_rss_mb']:.0f} "
            f"| {after['tree_rss_mb']:.0f} | {m['tree_growth_mb']:+.1f} | {m['tree_allowed_mb']:.0f} |"
        )
    lines.append("")
    lines.append("flags: " + ("; ".join(report["flags"]) if report["flags"] else "none"))
    return "\n".join(lines)


def _run_async(coro: Coroutine[Any, Any, dict[str, Any]]) -> dict[str, Any]:
    """uvloop where installed (less driver CPU per request), as the services themselves use."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    return uvloop.run(coro)
