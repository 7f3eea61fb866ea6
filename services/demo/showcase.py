"""What the demo shows first and last: model-written programs (correct, buggy, hostile) sent straight to
the sandbox service with its verdicts, and the trained PRM's per-line scores on example programs."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

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


def sandbox_verdicts(sandbox_http: str) -> list[dict[str, Any]]:
    """Each example program through the sandbox service; prints the verdicts (the hostile ones must fail)."""
    from services.sandbox.client import SandboxClient
    from services.sandbox.model import AssertTests, RunRequest

    with SandboxClient(sandbox_http) as client:
        requests = [
            RunRequest(ex.prompt + ex.response, AssertTests(ex.tests), timeout_s=2.0) for ex in EXAMPLES
        ]
        verdicts = [r.to_dict() for r in client.run_batch(requests)]
    table = Table(title="programs sent straight to the sandbox service (the unit tests decide)")
    for col in ("program", "sandbox", "tests", "why"):
        table.add_column(col)
    for ex, verdict in zip(EXAMPLES, verdicts, strict=True):
        table.add_row(
            ex.name,
            verdict["status"],
            f"{verdict['tests_passed']}/{verdict['tests_total']}",
            verdict["detail"][:60],
        )
    console.print(table)
    return [{"program": ex.name, "verdict": v} for ex, v in zip(EXAMPLES, verdicts, strict=True)]


def _buggy(solution: str) -> tuple[str, int] | None:
    """The solution with one arithmetic or comparison slip on a middle line, and that line's number."""
    lines = solution.splitlines(keepends=True)
    swaps = ((" + ", " - "), (" * ", " + "), (" > ", " < "), (" - ", " + "), (" < ", " > "), ("+= ", "-= "))
    for number in range(len(lines) // 2, len(lines)):
        for a, b in swaps:
            if a in lines[number]:
                return "".join(
                    lines[:number] + [lines[number].replace(a, b, 1)] + lines[number + 1 :]
                ), number
    return None


def line_examples(tasks: Path, prm_grpc: str, count: int = 2) -> list[dict[str, Any]]:
    """Per-line scores of the trained PRM (through the PRM service) on held-out reference solutions and on
    a copy of each with one wrong line; the longest tasks first. Printed and returned for the figure."""
    from services.prm.client import PrmGrpcClient

    rows = [json.loads(line) for line in tasks.read_text().splitlines() if line.strip()]
    rows.sort(key=lambda r: -len(r["metadata"]["solution"].splitlines()))
    examples: list[dict[str, Any]] = []
    for row in rows:
        buggy = _buggy(row["metadata"]["solution"])
        if buggy is None:
            continue
        examples.append(
            {
                "title": f"{row['id']}: reference",
                "prompt": row["prompt"],
                "response": row["metadata"]["solution"],
            }
        )
        examples.append(
            {
                "title": f"{row['id']}: line {buggy[1] + 1} wrong",
                "prompt": row["prompt"],
                "response": buggy[0],
            }
        )
        if len(examples) >= 2 * count:
            break
    with PrmGrpcClient(prm_grpc) as client:
        scores = client.score([(ex["prompt"], ex["response"]) for ex in examples])
    for ex, score in zip(examples, scores, strict=True):
        ex["lines"] = [ex["response"][ln.start : ln.end] for ln in score.lines]
        ex["scores"] = [ln.score for ln in score.lines]
        table = Table(title=f"trained PRM, per line: {ex['title']}")
        for col in ("line", "code", "score"):
            table.add_column(col)
        for i, (text, value) in enumerate(zip(ex["lines"], ex["scores"], strict=True), 1):
            table.add_row(str(i), text.rstrip(), "neutral" if value is None else f"{value:+.3f}")
        console.print(table)
    return examples
