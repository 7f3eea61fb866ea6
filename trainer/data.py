"""Data the trainers read: task sets for PPO (prompt + unit tests) and (prompt, solution) pairs for SFT.

Task JSONL, one task per line (the `tests` object is the sandbox's HTTP TestSpec, DESIGN.md "Contracts"):

    {"id": "add", "prompt": "def add(a, b):\\n", "tests": {"kind": "assert", "code": "assert add(1, 2) == 3"},
     "stop": ["\\ndef "], "metadata": {"family": "arith"}}

`tests.kind` is one of `assert` {code}, `humaneval` {test, entry_point}, `stdio` {cases: [{stdin, stdout}]},
`call` {fn, cases: [{args, expected}]}. `stop` and `metadata` are optional. `--task-source builtin:tiny`
is a handful of smoke-test tasks the untrained tiny policy can pass or fail; the miniature benchmark
lives in `trainer/tasks/`.

SFT JSONL: {"prompt": str, "solution": str} per line ("response" is accepted for "solution").
"""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from psgpo.v1 import rollout_pb2, sandbox_pb2


class DataError(ValueError):
    """A task or SFT file that cannot be used as is (message names the file and line)."""


@dataclass(frozen=True)
class TaskSpec:
    """One prompt with its unit tests, before it becomes a `psgpo.v1.Task`."""

    id: str
    prompt: str
    tests: sandbox_pb2.TestSpec
    stop: tuple[str, ...] = ()
    metadata: dict[str, str] = field(default_factory=dict)


def tests_from_json(tests: dict[str, Any]) -> sandbox_pb2.TestSpec:
    """The sandbox's JSON TestSpec (`{"kind": ..., ...}`) as the protobuf the rollout workers forward."""
    kind = tests.get("kind")
    if kind == "assert":
        return sandbox_pb2.TestSpec(assert_tests=sandbox_pb2.AssertTests(code=str(tests["code"])))
    if kind == "humaneval":
        return sandbox_pb2.TestSpec(
            humaneval=sandbox_pb2.HumanEvalTests(
                test=str(tests["test"]), entry_point=str(tests["entry_point"])
            )
        )
    if kind == "stdio":
        cases = [
            sandbox_pb2.StdioCase(stdin=str(c["stdin"]), stdout=str(c["stdout"])) for c in tests["cases"]
        ]
        return sandbox_pb2.TestSpec(stdio=sandbox_pb2.StdioTests(cases=cases))
    if kind == "call":
        cases = [
            sandbox_pb2.CallCase(args_json=json.dumps(c["args"]), expected_json=json.dumps(c["expected"]))
            for c in tests["cases"]
        ]
        return sandbox_pb2.TestSpec(call=sandbox_pb2.CallTests(fn=str(tests["fn"]), cases=cases))
    raise ValueError(f"unknown tests kind {kind!r} (assert, humaneval, stdio or call)")


def read_jsonl_rows(path: Path, allow_empty: bool = False) -> list[tuple[int, dict[str, Any]]]:
    """(line number, row) of every non-blank line of a JSONL file; DataError naming the file and line of
    anything that is not a JSON object (and of an empty file unless `allow_empty`)."""
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    rows = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}:{number}: not JSON: {exc}") from None
            if not isinstance(row, dict):
                raise DataError(f"{path}:{number}: expected a JSON object")
            rows.append((number, row))
    if not rows and not allow_empty:
        raise DataError(f"{path}: no rows")
    return rows


def load_task_file(path: Path) -> list[TaskSpec]:
    """Tasks from a JSONL file (format in the module docstring); ids must be unique."""
    specs: list[TaskSpec] = []
    for number, row in read_jsonl_rows(path):
        try:
            spec = TaskSpec(
                id=str(row["id"]),
                prompt=str(row["prompt"]),
                tests=tests_from_json(row["tests"]),
                stop=tuple(str(s) for s in row.get("stop", [])),
                metadata={str(k): str(v) for k, v in row.get("metadata", {}).items()},
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise DataError(f"{path}:{number}: bad task: {exc!r}") from None
        if not spec.prompt.strip() or not spec.id or ":" in spec.id:
            raise DataError(f"{path}:{number}: a task needs an id without ':' and a non-empty prompt")
        specs.append(spec)
    if len({s.id for s in specs}) != len(specs):
        raise DataError(f"{path}: task ids are not unique")
    return specs


def _assert(code: str) -> sandbox_pb2.TestSpec:
    return sandbox_pb2.TestSpec(assert_tests=sandbox_pb2.AssertTests(code=code))


def builtin_tiny_tasks() -> list[TaskSpec]:
    """Smoke-test tasks for the tiny untrained policy. Prompts ending in "# " make the response a comment
    line (stop at "\\n"), so the program is valid and the tests pass whatever is sampled; open-ended ones
    (no stop string, a few lines of code) mostly fail, so a batch mixes passes and failures, and the
    multi-line responses give the PRM lines to score."""
    return [
        TaskSpec("one", "def one():\n    return 1\n# ", _assert("assert one() == 1\n"), ("\n",)),
        TaskSpec("two", "def two():\n    return 2\n# ", _assert("assert two() == 2\n"), ("\n",)),
        TaskSpec("inc", "def inc(x):\n    return x + 1\n", _assert("assert inc(1) == 2\n")),
        TaskSpec("ident", "def ident(x):\n    return ", _assert("assert ident(3) == 3\n")),
        TaskSpec("const", "x = ", _assert("assert x is not None\n")),
    ]


def load_tasks(source: str) -> list[TaskSpec]:
    """`builtin:tiny` or a JSONL path."""
    if source == "builtin:tiny":
        return builtin_tiny_tasks()
    if source.startswith("builtin:"):
        raise DataError(f"unknown built-in task set {source!r} (builtin:tiny)")
    return load_task_file(Path(source))


@dataclass
class SamplingDefaults:
    """Sampling parameters the trainer puts on the tasks it enqueues."""

    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 256


class TaskFeeder:
    """Turns task specs into `psgpo.v1.Task`s: shuffled epochs over the set (seeded), a task id unique
    to this trainer process (`{spec id}@{incarnation}-{cursor}`: trajectory ids derive from it, and a
    reused id would be dropped as a duplicate by the rollout workers), and a per-task sampling seed."""

    def __init__(
        self,
        specs: Sequence[TaskSpec],
        *,
        seed: int,
        samples_per_task: int,
        sampling: SamplingDefaults,
        score_with_prm: bool,
        incarnation: str,
        cursor: int = 0,
    ) -> None:
        if not specs:
            raise DataError("the task source holds no tasks")
        self.specs = list(specs)
        self.seed = seed
        self.samples_per_task = samples_per_task
        self.sampling = sampling
        self.score_with_prm = score_with_prm
        self.incarnation = incarnation
        self.cursor = cursor

    def _spec_at(self, cursor: int) -> TaskSpec:
        epoch, index = divmod(cursor, len(self.specs))
        order = list(range(len(self.specs)))
        random.Random(self.seed * 1_000_003 + epoch).shuffle(order)
        return self.specs[order[index]]

    def next_tasks(self, count: int) -> list[rollout_pb2.Task]:
        tasks = []
        for _ in range(count):
            spec = self._spec_at(self.cursor)
            tasks.append(
                rollout_pb2.Task(
                    task_id=f"{spec.id}@{self.incarnation}-{self.cursor}",
                    prompt=spec.prompt,
                    tests=spec.tests,
                    n=self.samples_per_task,
                    sampling=rollout_pb2.SamplingParams(
                        temperature=self.sampling.temperature,
                        top_p=self.sampling.top_p,
                        max_new_tokens=self.sampling.max_new_tokens,
                        seed=(self.seed * 1_000_003 + self.cursor) % (2**31 - 1) + 1,  # 0 means "none"
                        stop=list(spec.stop),
                    ),
                    metadata={**spec.metadata, "spec_id": spec.id},
                    score_with_prm=self.score_with_prm,
                )
            )
            self.cursor += 1
        return tasks


@dataclass(frozen=True)
class SftPair:
    prompt: str
    solution: str


def load_sft_pairs(path: Path) -> list[SftPair]:
    """(prompt, solution) pairs from JSONL; the loss is on the solution tokens only."""
    pairs = []
    for number, row in read_jsonl_rows(Path(path)):
        solution = row.get("solution", row.get("response"))
        if not isinstance(row.get("prompt"), str) or not isinstance(solution, str) or not solution:
            raise DataError(f"{path}:{number}: expected string fields prompt and solution (non-empty)")
        pairs.append(SftPair(row["prompt"], solution))
    return pairs
