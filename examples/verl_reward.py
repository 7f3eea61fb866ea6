"""A verl custom reward function backed by the psgpo sandbox (unit tests) and, optionally, the PRM.

In verl (this file re-exports `compute_score` and `compute_score_batch` from
services.client.adapters, so psgpo must be installed where verl's reward workers run):

    export PSGPO_SANDBOX_URL=http://127.0.0.1:8002
    export PSGPO_PRM_URL=http://127.0.0.1:8001 PSGPO_PRM_WEIGHT=0.1   # optional
    python -m verl.trainer.main_ppo ... \\
        custom_reward_function.path=examples/verl_reward.py custom_reward_function.name=compute_score

Each parquet row carries the tests in `reward_model.ground_truth` (e.g. JSON text of
{"test_list": [...]}, {"test": ..., "entry_point": ...}, {"inputs": [...], "outputs": [...]}) and
the prompt text in `extra_info.prompt` (needed by the PRM). For `reward_model.reward_manager=batch`
use `custom_reward_function.name=compute_score_batch`.

Run alone, it scores a passing and a failing solution the way verl's naive reward manager calls
the function and exits 1 unless the passing one scores higher:

    PSGPO_SANDBOX_URL=http://127.0.0.1:8002 python examples/verl_reward.py
"""

from __future__ import annotations

import json

from services.client.adapters import compute_score, compute_score_batch

__all__ = ["compute_score", "compute_score_batch"]


def main() -> int:
    ground_truth = json.dumps({"test_list": ["assert add(1, 2) == 3", "assert add(-1, 1) == 0"]})
    prompt = "Write a Python function add(a, b) that returns the sum of a and b."
    solutions = {
        "passing": "```python\ndef add(a, b):\n    return a + b\n```",
        "failing": "```python\ndef add(a, b):\n    return a * b\n```",
    }
    scores = {}
    for name, solution in solutions.items():
        # verl's NaiveRewardManager: keyword arguments; extra_info is the row's dict plus num_turns etc.
        extra_info = {"index": 0, "prompt": prompt, "num_turns": None, "rollout_reward_scores": {}}
        result = compute_score(
            data_source="mbpp", solution_str=solution, ground_truth=ground_truth, extra_info=extra_info
        )
        print(f"{name}: {result}")
        scores[name] = result["score"]
    return 0 if scores["passing"] > scores["failing"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
