"""The miniature benchmark (trainer/tasks/mini.py): seeded, held-out names unseen in training, canonical
solutions pass their own tests in the real sandbox, wrong digits fail them, the data files load."""

from __future__ import annotations

import json

from services.sandbox.client import AssertTests
from tests.sandbox.conftest import Sandbox, sandbox  # noqa: F401 - the real sandbox service fixture
from trainer.data import load_sft_pairs, load_task_file
from trainer.tasks import mini


def test_generation_is_seeded_and_held_out_names_never_appear_in_training():
    train, test = mini.generate(seed=3)
    again_train, again_test = mini.generate(seed=3)
    assert [t.name for t in train] == [t.name for t in again_train]
    assert [t.name for t in test] == [t.name for t in again_test]
    assert {t.name for t in train}.isdisjoint({t.name for t in test})
    assert {t.family for t in test} == {*mini.FAMILIES, "pipeline"}
    other_train, _ = mini.generate(seed=4)
    assert [t.name for t in other_train] != [t.name for t in train]


def test_lengths_span_short_and_long_programs():
    train, test = mini.generate(seed=0)
    lines = [t.lines for t in train + test]
    assert min(lines) <= 4 and max(lines) >= 9
    assert any(t.lines >= mini.LONG_LINES for t in test) and any(t.lines < mini.LONG_LINES for t in test)


def test_canonical_solutions_pass_and_a_wrong_digit_fails_in_the_sandbox(sandbox: Sandbox):  # noqa: F811
    _, test = mini.generate(seed=0)
    for task in test[:: max(1, len(test) // 12)]:  # a dozen, every family represented by the stride
        tests = AssertTests(task.to_json()["tests"]["code"])
        assert sandbox.run(task.prompt + task.solution, tests).passed, task.name
        digit = next(c for c in reversed(task.solution) if c.isdigit())
        wrong = str(int(digit) % 9 + 1)
        broken = task.solution[::-1].replace(digit, wrong, 1)[::-1]  # the last digit in the body
        result = sandbox.run(task.prompt + broken, tests)
        assert not result.passed, (task.name, broken)


def test_written_files_load_with_the_trainers_readers(tmp_path):
    summary = mini.write(tmp_path, seed=1, n_sft=50)
    tasks = load_task_file(tmp_path / "train.jsonl")
    held_out = load_task_file(tmp_path / "test.jsonl")
    pairs = load_sft_pairs(tmp_path / "sft.jsonl")
    assert len(tasks) == summary["train"] and len(held_out) == summary["test"] and len(pairs) == 50
    assert all(t.prompt.startswith("def ") and t.prompt.endswith("):\n") for t in tasks)
    row = json.loads((tmp_path / "test.jsonl").read_text().splitlines()[0])
    assert row["metadata"]["length"] in ("short", "long") and int(row["metadata"]["lines"]) >= 3
    train_prompts = {t.prompt for t in tasks}
    assert all(p.prompt in train_prompts for p in pairs)  # SFT sees training names only
