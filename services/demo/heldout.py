"""Held-out evaluation of the demo's policies: n samples per held-out task at T=1 judged by the sandbox
service, pass@1 (the unbiased estimate from n samples) overall and by solution length (short / long)."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def evaluate_policy(
    policy: Path, tasks: Path, sandbox_http: str, n: int, max_new_tokens: int, seed: int = 0
) -> dict[str, Any]:
    """{"pass_at_1", "pass_at_1_short", "pass_at_1_long", "problems", "samples", "seconds"} of one policy."""
    from services.sandbox.client import SandboxClient
    from trainer.tasks.evaluate import evaluate, policy_generator
    from trainer.tasks.loaders import load

    eval_tasks, _ = load(f"tasks:{tasks}")
    generate, close = policy_generator(policy, "cpu", 1.0, max_new_tokens, seed)
    try:
        with SandboxClient(sandbox_http) as sandbox:
            report = evaluate(eval_tasks, generate, sandbox.run_batch, n, [1], timeout_s=10.0)
    finally:
        close()
    result = {
        "pass_at_1": report["overall"]["pass@1"],
        "problems": report["overall"]["problems"],
        "samples": n,
        "seconds": report["seconds"],
    }
    for group in ("short", "long"):
        row = report["groups"].get(group)
        result[f"pass_at_1_{group}"] = row["pass@1"] if row else None
        result[f"problems_{group}"] = row["problems"] if row else 0
    return result
