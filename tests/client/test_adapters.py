"""The framework adapters, called exactly the way verl, TRL and OpenRLHF call them, against real
sandbox and PRM servers."""

from __future__ import annotations

import json
import math
import pickle
from typing import Any

import pytest

from services.client import adapters
from services.client.adapters import (
    RewardConfig,
    RewardError,
    check_openrlhf_reward_url,
    compute_score,
    compute_score_batch,
    make_trl_reward,
)
from tests.client.conftest import Services

ADD_TESTS = "assert add(1, 2) == 3\nassert add(2, 2) == 4\n"
GOOD_ADD = "Here is the function:\n```python\ndef add(a, b):\n    return a + b\n```\n"
BAD_ADD = "def add(a, b):\n    return a - b\n"
PROMPT = "# Write add(a, b) that returns the sum.\n"
UNREACHABLE = "http://127.0.0.1:9"  # the discard port: connection refused


@pytest.fixture
def verl_env(monkeypatch: pytest.MonkeyPatch, services: Services) -> Services:
    for variable in adapters.ENV.values():
        monkeypatch.delenv(variable, raising=False)
    monkeypatch.setenv("PSGPO_SANDBOX_URL", services.sandbox_url)
    return services


def verl_naive_call(solution: str, ground_truth: Any, **extra: Any) -> dict[str, Any]:
    """As verl's NaiveRewardManager does: keyword arguments, extra_info with num_turns and
    rollout_reward_scores added by verl."""
    extra_info = {"index": 0, "split": "train", **extra, "num_turns": None, "rollout_reward_scores": {}}
    result = compute_score(
        data_source="mbpp", solution_str=solution, ground_truth=ground_truth, extra_info=extra_info
    )
    assert isinstance(result, dict)
    return result


def test_verl_compute_score_passing_and_failing(verl_env: Services) -> None:
    good = verl_naive_call(GOOD_ADD, ADD_TESTS)
    bad = verl_naive_call(BAD_ADD, ADD_TESTS)
    assert good == {"score": 1.0, "acc": 1.0, "tests_passed": 2, "tests_total": 2, "sandbox_status": "passed"}
    assert bad["score"] == 0.0 and bad["acc"] == 0.0 and bad["sandbox_status"] == "failed"
    assert bad["tests_total"] == 2 and bad["tests_passed"] < 2
    # prime's reward manager calls it positionally: (data_source, solution_str, ground_truth, extra_info)
    assert compute_score("mbpp", GOOD_ADD, ADD_TESTS, None)["score"] == 1.0


def test_verl_ground_truth_shapes(verl_env: Services) -> None:
    double = "def double(x):\n    return 2 * x\n"
    cases = [
        (
            json.dumps(
                {"test": "def check(candidate):\n    assert candidate(3) == 6\n", "entry_point": "double"}
            ),
            double,
        ),
        (
            {
                "test_list": ["assert double(2) == 4", "assert double(0) == 0"],
                "test_setup_code": "import math",
            },
            double,
        ),
        (json.dumps({"inputs": ["3\n", "5\n"], "outputs": ["6\n", "10\n"]}), "print(int(input()) * 2)\n"),
        (json.dumps({"inputs": [[2], [5]], "outputs": [4, 10], "fn_name": "double"}), double),
        ({"kind": "call", "fn": "double", "cases": [{"args": [1.5], "expected": 3.0}]}, double),
        ({"kind": "stdio", "cases": [{"stdin": "1\n", "stdout": "2"}]}, "print(int(input()) * 2)\n"),
    ]
    extra_infos = [{"index": i} for i in range(len(cases))]
    # verl's BatchRewardManager: keyword lists
    results = compute_score_batch(
        data_sources=["x"] * len(cases),
        solution_strs=[solution for _, solution in cases],
        ground_truths=[truth for truth, _ in cases],
        extra_infos=extra_infos,
    )
    assert [r["score"] for r in results] == [1.0] * len(cases), results
    wrong = compute_score_batch(
        data_sources=["x"] * len(cases),
        solution_strs=["def double(x):\n    return x\n"] * 4
        + ["def double(x):\n    return x\n", "print(0)\n"],
        ground_truths=[truth for truth, _ in cases],
        extra_infos=extra_infos,
    )
    assert [r["score"] for r in wrong] == [0.0] * len(cases), wrong
    with pytest.raises(ValueError, match="unrecognised mapping"):
        verl_naive_call(double, {"answer": "4"})


def test_verl_with_the_prm(verl_env: Services, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PSGPO_PRM_URL", verl_env.prm_url)
    monkeypatch.setenv("PSGPO_PRM_WEIGHT", "0.5")
    good = verl_naive_call(GOOD_ADD, ADD_TESTS, prompt=PROMPT)
    bad = verl_naive_call(BAD_ADD, ADD_TESTS, prompt=PROMPT)
    for result, acc in ((good, 1.0), (bad, 0.0)):
        assert result["acc"] == acc and result["prm_lines"] == 2
        assert math.isfinite(result["prm_score"])
        assert result["score"] == pytest.approx(acc + 0.5 * result["prm_score"])
    # verl's reward_kwargs arrive as keyword arguments and override the environment
    weighted = compute_score(
        "mbpp", GOOD_ADD, ADD_TESTS, {"prompt": PROMPT}, prm_weight=2.0, reward_router_address=None
    )
    assert weighted["score"] == pytest.approx(1.0 + 2.0 * good["prm_score"])
    with pytest.raises(ValueError, match="no prompt"):
        verl_naive_call(GOOD_ADD, ADD_TESTS)  # the PRM needs the prompt (extra_info["prompt"])


def test_verl_raises_instead_of_a_made_up_reward(verl_env: Services, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PSGPO_RETRIES", "0")
    monkeypatch.setenv("PSGPO_SANDBOX_URL", UNREACHABLE)
    with pytest.raises(RewardError, match="sandbox at http://127.0.0.1:9"):
        verl_naive_call(GOOD_ADD, ADD_TESTS)
    monkeypatch.setenv("PSGPO_SANDBOX_URL", verl_env.sandbox_url)
    monkeypatch.setenv("PSGPO_PRM_URL", UNREACHABLE)
    with pytest.raises(RewardError, match="PRM at http://127.0.0.1:9"):
        verl_naive_call(GOOD_ADD, ADD_TESTS, prompt=PROMPT)
    monkeypatch.delenv("PSGPO_SANDBOX_URL")
    with pytest.raises(ValueError, match="PSGPO_SANDBOX_URL"):
        verl_naive_call(GOOD_ADD, ADD_TESTS)


def test_reward_config_from_env() -> None:
    env = {
        "PSGPO_SANDBOX_URL": "http://sandbox:8002",
        "PSGPO_PRM_URL": "http://prm:8001",
        "PSGPO_PRM_WEIGHT": "0.25",
        "PSGPO_PRM_AGGREGATE": "mean",
        "PSGPO_EXTRACT_CODE": "off",
        "PSGPO_PREPEND_PROMPT": "1",
        "PSGPO_RUN_TIMEOUT_S": "5",
        "PSGPO_RETRIES": "1",
        "PSGPO_SANDBOX_TOKEN": "s3cret",
    }
    config = RewardConfig.from_env(env)
    assert config == RewardConfig(
        sandbox_url="http://sandbox:8002",
        sandbox_token="s3cret",
        prm_url="http://prm:8001",
        prm_weight=0.25,
        prm_aggregate="mean",
        extract_code=False,
        prepend_prompt=True,
        run_timeout_s=5.0,
        retries=1,
    )
    for bad, match in [
        ({"PSGPO_PRM_WEIGHT": "lots"}, "not a number"),
        ({"PSGPO_EXTRACT_CODE": "maybe"}, "expected 1/0"),
        ({"PSGPO_PRM_AGGREGATE": "max"}, "prm_aggregate"),
        ({"PSGPO_PRM_URL": ""}, "no PRM URL"),
        ({"PSGPO_SANDBOX_URL": "sandbox:8002"}, "http"),
    ]:
        with pytest.raises(ValueError, match=match):
            RewardConfig.from_env({**env, **bad})


def test_trl_reward_standard_format(services: Services) -> None:
    reward = make_trl_reward(services.sandbox_url, tests_column="tests", prepend_prompt=True)
    metrics: dict[str, float] = {}
    columns: dict[str, list[Any]] = {}
    prompts = ["def add(a, b):\n"] * 3
    completions = ["    return a + b\n", "    return a - b\n", "    return a + b\n"]
    # GRPOTrainer._calculate_rewards: keyword arguments, every dataset column but "prompt" as a list
    rewards = reward(
        prompts=prompts,
        completions=completions,
        completion_ids=[[1, 2], [3, 4], [5]],
        tests=[ADD_TESTS, ADD_TESTS, None],  # a row without tests gets None: TRL ignores it
        task=["code"] * 3,
        trainer_state=None,
        log_extra=lambda column, values: columns.__setitem__(column, values),
        log_metric=lambda name, value: metrics.__setitem__(name, value),
    )
    assert rewards == [1.0, 0.0, None]
    assert metrics == {"psgpo/pass_rate": 0.5}
    assert columns == {"psgpo_status": ["passed", "failed", "no tests"]}
    assert reward.__name__ == "psgpo_unit_tests"
    with pytest.raises(ValueError, match="no dataset column 'tests'"):
        reward(
            prompts=prompts, completions=completions, completion_ids=[[1]] * 3, ground_truth=[ADD_TESTS] * 3
        )


def test_trl_reward_conversational_with_prm_and_pickle(services: Services) -> None:
    reward = make_trl_reward(services.sandbox_url, "tests", prm_url=services.prm_url, prm_weight=0.5)
    prompts = [[{"role": "system", "content": "You write Python."}, {"role": "user", "content": PROMPT}]] * 2
    completions = [
        [{"role": "assistant", "content": GOOD_ADD}],
        [{"role": "assistant", "content": [{"type": "text", "text": BAD_ADD}]}],
    ]
    tests = [{"test_list": ADD_TESTS.splitlines()}] * 2
    rewards = reward(prompts=prompts, completions=completions, completion_ids=[[1], [2]], tests=tests)
    assert len(rewards) == 2 and all(isinstance(x, float) for x in rewards)
    assert rewards[0] is not None and rewards[1] is not None
    assert 0.5 < rewards[0] - rewards[1] < 1.5  # the tests decide; the PRM term adds at most 0.5 x [-1, 1]
    assert rewards[0] != 1.0  # the PRM term is really added
    # a closure would not pickle; TRL's async GRPO ships reward functions to a spawned process
    clone = pickle.loads(pickle.dumps(reward))
    assert clone(prompts=prompts, completions=completions, completion_ids=[[1], [2]], tests=tests) == rewards
    clone.close()
    reward.close()


def test_trl_reward_raises_when_the_sandbox_is_down() -> None:
    reward = make_trl_reward(UNREACHABLE, retries=0)
    with pytest.raises(RewardError, match="sandbox"):
        reward(prompts=["p"], completions=[GOOD_ADD], completion_ids=[[1]], tests=[ADD_TESTS])


def test_openrlhf_remote_reward_url(services: Services, capsys: pytest.CaptureFixture[str]) -> None:
    url = f"{services.prm_url}/get_reward"
    (probe,) = check_openrlhf_reward_url(url)
    assert math.isfinite(probe)
    assert adapters.main(["check-openrlhf", url]) == 0
    assert "speaks OpenRLHF's remote reward protocol" in capsys.readouterr().out
    with pytest.raises(RewardError, match="HTTP 404"):
        check_openrlhf_reward_url(f"{services.sandbox_url}/get_reward")
    with pytest.raises(RewardError, match="unreachable"):
        check_openrlhf_reward_url(f"{UNREACHABLE}/get_reward", timeout_s=5)
    assert adapters.main(["check-openrlhf", f"{UNREACHABLE}/get_reward"]) == 1
    assert "not usable" in capsys.readouterr().err


def test_extract_code() -> None:
    assert adapters.extract_code("x = 1\n") == "x = 1\n"
    text = "Plan:\n```python\ndef f():\n    return 1\n```\nOutput:\n```\n1\n```\n"
    assert adapters.extract_code(text) == "def f():\n    return 1\n"  # a python block wins over a bare one
    assert adapters.extract_code("```\nprint(1)\n```") == "print(1)\n"
    assert adapters.extract_code("```py\nx = 2\n") == "x = 2\n"  # truncated: runs to the end
    assert adapters.extract_code("```js\nlet x\n```") == "let x\n"
