"""The load driver behind `psgpo bench load` (services/loadtest.py): closed-loop async clients, half over
HTTP (httpx) and half over gRPC (grpc.aio, raw bytes through a channel with no serializers), each
request classified (ok, shed = 429 / RESOURCE_EXHAUSTED, server error, timeout, ...) and timed; and
the process measurements (resident memory from /proc, CPU of a process tree and of the machine)."""

from __future__ import annotations

import asyncio
import random
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import httpx
import psutil

from services.common.procs import ServiceProcess

KINDS = ("ok", "shed", "server_error", "timeout", "transport_error", "client_error", "bad_result")


@dataclass(frozen=True)
class Workload:
    """What one client sends, over each transport, and how a good answer is recognised."""

    service: str
    capacity: int
    http_path: str
    http_bodies: list[bytes]
    grpc_method: str
    grpc_bodies: list[bytes]
    http_good: Callable[[bytes], bool]
    grpc_good: Callable[[bytes], bool]


@dataclass
class Tally:
    counts: Counter[str] = field(default_factory=Counter)
    ok_s: list[float] = field(default_factory=list)
    shed_s: list[float] = field(default_factory=list)

    def add(self, kind: str, seconds: float) -> None:
        self.counts[kind] += 1
        if kind == "ok":
            self.ok_s.append(seconds)
        elif kind == "shed":
            self.shed_s.append(seconds)

    def merge(self, other: Tally) -> Tally:
        return Tally(self.counts + other.counts, self.ok_s + other.ok_s, self.shed_s + other.shed_s)

    def summary(self, seconds: float) -> dict[str, Any]:
        total = sum(self.counts.values())
        return {
            "requests": total,
            **{kind: self.counts.get(kind, 0) for kind in KINDS},
            "ok_per_s": self.counts.get("ok", 0) / seconds,
            "shed_fraction": self.counts.get("shed", 0) / total if total else 0.0,
            "ok_p50_ms": _pct_ms(self.ok_s, 0.5),
            "ok_p99_ms": _pct_ms(self.ok_s, 0.99),
            "shed_p50_ms": _pct_ms(self.shed_s, 0.5),
            "shed_p99_ms": _pct_ms(self.shed_s, 0.99),
        }


def _pct_ms(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return 1000 * ordered[min(len(ordered) - 1, int(q * len(ordered)))]


# ---------------------------------------------------------------------------------------- one request


async def send_http(client: httpx.AsyncClient, path: str, body: bytes, good: Callable[[bytes], bool]) -> str:
    try:
        resp = await client.post(path, content=body, headers={"Content-Type": "application/json"})
    except httpx.TimeoutException:
        return "timeout"
    except httpx.HTTPError:
        return "transport_error"
    if resp.status_code == 200:
        return "ok" if good(resp.content) else "bad_result"
    if resp.status_code == 429:
        return "shed"
    return "server_error" if resp.status_code >= 500 else "client_error"


SERVER_CODES = {grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL, grpc.StatusCode.UNAVAILABLE,
                grpc.StatusCode.DATA_LOSS, grpc.StatusCode.UNIMPLEMENTED}  # fmt: skip


async def send_grpc(call: grpc.aio.UnaryUnaryMultiCallable, body: bytes, timeout_s: float,
                    good: Callable[[bytes], bool]) -> str:  # fmt: skip
    try:
        reply = await call(body, timeout=timeout_s)
    except grpc.aio.AioRpcError as exc:
        code = exc.code()
        if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
            return "shed"
        if code == grpc.StatusCode.DEADLINE_EXCEEDED:
            return "timeout"
        return "server_error" if code in SERVER_CODES else "client_error"
    return "ok" if good(reply) else "bad_result"


# ---------------------------------------------------------------------------------------- one level


class Driver:
    """Closed-loop clients against one running service; one event loop, one HTTP pool, one channel."""

    def __init__(self, workload: Workload, service: ServiceProcess, request_timeout_s: float = 10.0,
                 shed_backoff_s: float = 0.05, seed: int = 0) -> None:  # fmt: skip
        self.workload = workload
        self.service = service
        self.request_timeout_s = request_timeout_s
        self.shed_backoff_s = shed_backoff_s
        self.rng = random.Random(seed)

    async def level(self, clients: int, seconds: float) -> dict[str, Any]:
        w = self.workload
        limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
        timeout = httpx.Timeout(self.request_timeout_s)
        tallies = {"http": Tally(), "grpc": Tally()}
        stop_at = time.monotonic() + seconds
        async with (
            httpx.AsyncClient(base_url=self.service.http_url, limits=limits, timeout=timeout) as http,
            grpc.aio.insecure_channel(self.service.grpc_target) as channel,
        ):
            call = channel.unary_unary(w.grpc_method)  # no serializers: bytes in, bytes out

            async def client(index: int) -> None:
                over_http = index % 2 == 0
                tally = tallies["http" if over_http else "grpc"]
                n = index
                while time.monotonic() < stop_at:
                    n += 1
                    t0 = time.perf_counter()
                    if over_http:
                        body = w.http_bodies[n % len(w.http_bodies)]
                        kind = await send_http(http, w.http_path, body, w.http_good)
                    else:
                        body = w.grpc_bodies[n % len(w.grpc_bodies)]
                        kind = await send_grpc(call, body, self.request_timeout_s, w.grpc_good)
                    tally.add(kind, time.perf_counter() - t0)
                    if kind != "ok":  # back off as a client's first retry does (never spin)
                        await asyncio.sleep(self.shed_backoff_s * (1 + self.rng.random()))

            lag_s: list[float] = []
            monitor = asyncio.create_task(loop_lag(lag_s, stop_at))
            pid = self.service.proc.pid
            cpu0, service_cpu0, machine_cpu0 = time.process_time(), tree_cpu_s(pid), busy_cpu_s()
            t0 = time.perf_counter()
            bound = seconds + self.request_timeout_s + 10  # each call has its own timeout: a backstop
            await asyncio.wait_for(asyncio.gather(*(client(i) for i in range(clients))), bound)
            wall = time.perf_counter() - t0
            driver_cpu = time.process_time() - cpu0
            service_cpu = tree_cpu_s(pid) - service_cpu0
            machine_cpu = busy_cpu_s() - machine_cpu0
            await monitor
        both = tallies["http"].merge(tallies["grpc"])
        return {
            "clients": clients,
            "seconds": wall,
            **both.summary(wall),
            "by_transport": {name: t.summary(wall) for name, t in tallies.items()},
            "driver_cpu_pct": 100 * driver_cpu / wall,
            "driver_lag_p99_ms": _pct_ms(lag_s, 0.99),
            "driver_lag_max_ms": 1000 * max(lag_s, default=0.0),
            "service_cpu_pct": 100 * service_cpu / wall,
            "other_cpu_pct": max(0.0, 100 * (machine_cpu - driver_cpu - service_cpu) / wall),
        }

    async def one_good(self) -> dict[str, Any]:
        """After the cool-down: does a single request get a good answer at once?"""
        async with httpx.AsyncClient(base_url=self.service.http_url, timeout=self.request_timeout_s) as c:
            t0 = time.perf_counter()
            w = self.workload
            kind = await send_http(c, w.http_path, w.http_bodies[0], w.http_good)
            return {"kind": kind, "ms": 1000 * (time.perf_counter() - t0)}


async def loop_lag(out: list[float], stop_at: float, every_s: float = 0.01) -> None:
    """How late the driver's own event loop wakes up: latency the driver adds, not the service."""
    while time.monotonic() < stop_at:
        t0 = time.perf_counter()
        await asyncio.sleep(every_s)
        out.append(time.perf_counter() - t0 - every_s)


# ---------------------------------------------------------------------------------------- memory, CPU


def rss_mb(pid: int) -> dict[str, float]:
    """VmRSS and VmHWM (peak) of one process, from /proc/PID/status, in MiB."""
    fields: dict[str, float] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            fields[key] = int(value.split()[0]) / 1024
    return {
        "rss_mb": fields.get("VmRSS", 0.0),
        "hwm_mb": fields.get("VmHWM", 0.0),
        "tree_rss_mb": _tree_rss(pid),
    }


def _tree_rss(pid: int) -> float:
    """The process and all its descendants (the sandbox's workers), in MiB."""
    total = 0
    try:
        root = psutil.Process(pid)
        for proc in [root, *root.children(recursive=True)]:
            try:
                total += proc.memory_info().rss
            except psutil.NoSuchProcess:
                continue
    except psutil.NoSuchProcess:
        return 0.0
    return total / 2**20


def busy_cpu_s() -> float:
    """CPU seconds the whole machine spent busy (all cores, every process)."""
    t = psutil.cpu_times()
    return sum(t) - t.idle - getattr(t, "iowait", 0.0)


def tree_cpu_s(pid: int) -> float:
    total = 0.0
    try:
        root = psutil.Process(pid)
        for proc in [root, *root.children(recursive=True)]:
            try:
                t = proc.cpu_times()
                total += t.user + t.system + t.children_user + t.children_system
            except psutil.NoSuchProcess:
                continue
    except psutil.NoSuchProcess:
        pass
    return total
