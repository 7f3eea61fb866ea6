"""`psgpo bench prm`: in one run, on one model and machine:
(a) raw batched forward throughput of the model (no server),
(b) the server's throughput and p50/p99 latency under concurrent clients (HTTP and gRPC),
(c) one-pass line scoring vs scoring every line prefix as its own sequence,
(d) a single request's latency vs one raw forward of that request.
"""

from __future__ import annotations

import json
import os
import platform
import random
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from services.common.procs import start_service

console = Console()
LINES_PER_RESPONSE = 20
SINGLE = 15


def make_items(n: int, seed: int = 0) -> list[tuple[str, str]]:
    """Deterministic 20-line Python functions (prompt = signature and docstring)."""
    rng = random.Random(seed)
    names = ["total", "acc", "value", "count", "result", "tmp", "best", "cur"]
    items = []
    for i in range(n):
        prompt = f'def task_{i}(xs, k):\n    """Combine xs with k (task {i})."""\n'
        body = ["    total = 0"]
        while len(body) < LINES_PER_RESPONSE - 1:
            a, b = rng.choice(names), rng.choice(names)
            kind = rng.randrange(4)
            if kind == 0:
                body.append(f"    {a} = {b} + {rng.randrange(100)} * k")
            elif kind == 1:
                body.append(f"    for x in xs[:{rng.randrange(1, 9)}]:")
                body.append(f"        {a} = {a} * x - {rng.randrange(10)} if {a} else x")
            elif kind == 2:
                body.append(f"    if {a} > {rng.randrange(50)}:")
                body.append(f"        {b} = min({a}, {b}, k)")
            else:
                body.append(f"    {a} = sum(x * {rng.randrange(7)} for x in xs) % {rng.randrange(3, 97)}")
        body = body[: LINES_PER_RESPONSE - 1] + ["    return total"]
        items.append((prompt, "\n".join(body)))
    return items


def _batches(prepared: list, budget: int) -> list[list]:
    """Length-sorted padded batches within the token budget (what the server's batcher forms)."""
    ordered = sorted(prepared, key=lambda p: p.num_tokens)
    batches, cur = [], []
    for p in ordered:
        if cur and max(p.num_tokens, cur[-1].num_tokens) * (len(cur) + 1) > budget:
            batches.append(cur)
            cur = []
        cur.append(p)
    return batches + ([cur] if cur else [])


def _time(fn, repeat: int) -> list[float]:
    out = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def raw_model(model_dir: Path, items: list[tuple[str, str]], budget: int, repeat: int) -> dict[str, Any]:
    from services.prm.scorer import PrmScorer

    scorer = PrmScorer(model_dir)
    prepared = scorer.prepare(items)
    batches = _batches(prepared, budget)
    on_model_thread = scorer.thread.submit  # time torch where the server runs it
    on_model_thread(scorer.forward, batches[0]).result()  # warm-up
    run_all = lambda: [scorer.forward(b) for b in batches]  # noqa: E731
    best = min(on_model_thread(_time, run_all, repeat).result())
    tokens = sum(p.num_tokens for p in prepared)
    # (c) naive: every line prefix of every response as its own sequence.
    naive_items = []
    for prompt, response in items[: max(4, len(items) // 4)]:
        lines = response.split("\n")
        naive_items += [(prompt, "\n".join(lines[: m + 1])) for m in range(len(lines))]
    naive_batches = _batches(scorer.prepare(naive_items), budget)
    run_naive = lambda: [scorer.forward(b) for b in naive_batches]  # noqa: E731
    naive_best = min(on_model_thread(_time, run_naive, max(1, repeat // 2)).result())
    naive_responses = len(naive_items) // LINES_PER_RESPONSE
    # (d) each of the first SINGLE items alone (the server's single-request run sends the same ones)
    single = sorted(
        min(on_model_thread(_time, lambda p=p: scorer.forward([p]), 3).result()) for p in prepared[:SINGLE]
    )
    return {
        "parameters": scorer.parameters,
        "items": len(items),
        "tokens_per_item": tokens / len(items),
        "raw_items_per_s": len(items) / best,
        "raw_tokens_per_s": tokens / best,
        "naive_prefix_responses_per_s": naive_responses / naive_best,
        "one_pass_speedup_vs_prefixes": (len(items) / best) / (naive_responses / naive_best),
        "single_forward_ms_p50": 1000 * single[len(single) // 2],
        "single_item_tokens": prepared[0].num_tokens,
    }


def _load(make_client, items, concurrency: int, per_request: int, requests: int) -> dict[str, float]:
    """`concurrency` threads, each with its own sync client, send `requests` requests in total."""
    latencies: list[float] = []
    counter = iter(range(requests))
    lock = threading.Lock()

    def worker() -> None:
        with make_client() as client:
            while True:
                with lock:
                    n = next(counter, None)
                if n is None:
                    return
                start = (n * per_request) % len(items)
                batch = [items[(start + j) % len(items)] for j in range(per_request)]
                t0 = time.perf_counter()
                client.score(batch)
                latencies.append(time.perf_counter() - t0)

    t0 = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        for f in [pool.submit(worker) for _ in range(concurrency)]:
            f.result()
    wall = time.perf_counter() - t0
    latencies.sort()
    return {
        "concurrency": concurrency,
        "items_per_request": per_request,
        "requests": len(latencies),
        "items_per_s": len(latencies) * per_request / wall,
        "p50_ms": 1000 * latencies[len(latencies) // 2],
        "p99_ms": 1000 * latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))],
    }


def server_load(http_port: int, grpc_port: int, items, quick: bool) -> dict[str, Any]:
    from services.prm.client import PrmGrpcClient, PrmHttpClient

    clients = {
        "http": lambda: PrmHttpClient(f"http://127.0.0.1:{http_port}", retries=0),
        "grpc": lambda: PrmGrpcClient(f"127.0.0.1:{grpc_port}", retries=0),
    }
    out: dict[str, Any] = {"runs": [], "single_request": {}}
    _load(clients["http"], items, 1, 2, 2)  # warm-up
    for name, make in clients.items():
        out["single_request"][name] = _load(make, items[:SINGLE], 1, 1, 3 * SINGLE)
    for name, make in clients.items():
        for c in [8] if quick else [4, 16, 32]:
            run = _load(make, items, c, 4, (24 if quick else 64) * max(1, c // 4))
            run["transport"] = name
            out["runs"].append(run)
    return out


def run_bench(out: Path, model_dir: Path | None = None, quick: bool = False, budget: int = 16384) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        if model_dir is None:
            from trainer.models.tiny import TinyConfig, build_tiny

            console.print("building the benchmark PRM (Qwen2, hidden 256, 4 layers) ...")
            build_tiny(Path(tmp), TinyConfig(hidden_size=256, num_layers=4, corpus_bytes=1_000_000))
            model_dir = Path(tmp) / "prm"
        items = make_items(32 if quick else 128)
        console.print("(a, c, d) raw forward, one-pass vs per-prefix, single forward ...")
        raw = raw_model(model_dir, items, budget, 2 if quick else 4)
        console.print("(b) server under concurrent clients ...")
        server = start_service(
            "prm",
            ["--model", str(model_dir), "--http-port", "0", "--grpc-port", "0"],
            out / "bench_prm_server.log",
            env={"PRM_MAX_BATCH_TOKENS": str(budget)},
        )
        try:
            served = server_load(server.http_port, server.grpc_port, items, quick)
        finally:
            server.stop()
    best = max(served["runs"], key=lambda r: r["items_per_s"])
    result = {
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "python": platform.python_version(),
        },
        "model": {"path": str(model_dir), "parameters": raw["parameters"]},
        "raw": raw,
        "server": served,
        "ratios": {
            "server_vs_raw_throughput": best["items_per_s"] / raw["raw_items_per_s"],
            "one_pass_vs_prefix_speedup": raw["one_pass_speedup_vs_prefixes"],
            "single_request_vs_raw_forward_latency": min(
                r["p50_ms"] for r in served["single_request"].values()
            )
            / raw["single_forward_ms_p50"],
        },
        "targets": {
            "server_vs_raw_throughput": ">= 0.85",
            "one_pass_vs_prefix_speedup": ">= 5",
            "single_request_vs_raw_forward_latency": "<= 1.3",
        },  # fmt: skip
        "quick": quick,
        "seconds": time.perf_counter() - t_start,
    }
    (out / "bench_prm.json").write_text(json.dumps(result, indent=2))
    table = Table(title=f"psgpo bench prm ({raw['parameters']:,}-parameter PRM, {os.cpu_count()} CPUs)")
    for col in ("what", "items/s", "p50 ms", "p99 ms"):
        table.add_column(col)
    table.add_row("raw batched forward", f"{raw['raw_items_per_s']:.1f}", "", "")
    table.add_row("raw: every prefix separately", f"{raw['naive_prefix_responses_per_s']:.1f}", "", "")
    table.add_row("raw: one item, batch 1", "", f"{raw['single_forward_ms_p50']:.1f}", "")
    for transport, s in served["single_request"].items():
        table.add_row(f"server: one item, 1 client ({transport})", f"{s['items_per_s']:.1f}",
                      f"{s['p50_ms']:.1f}", f"{s['p99_ms']:.1f}")  # fmt: skip
    for r in served["runs"]:
        table.add_row(
            f"server: {r['concurrency']} clients x 4 items ({r['transport']})",
            f"{r['items_per_s']:.1f}", f"{r['p50_ms']:.1f}", f"{r['p99_ms']:.1f}",
        )  # fmt: skip
    console.print(table)
    for key, value in result["ratios"].items():
        console.print(f"{key}: {value:.2f} (target {result['targets'][key]})")
    console.print(f"wrote {out / 'bench_prm.json'}")
    return result
