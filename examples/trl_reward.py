"""A TRL GRPOTrainer reward function backed by the psgpo sandbox (unit tests) and, optionally, the PRM.

In a TRL script (the dataset has a "prompt" column and a "tests" column with the tests of each row,
e.g. MBPP's test_list):

    from trl import GRPOConfig, GRPOTrainer
    from services.client.adapters import make_trl_reward

    reward = make_trl_reward("http://127.0.0.1:8002", tests_column="tests",
                             prm_url="http://127.0.0.1:8001", prm_weight=0.1)
    trainer = GRPOTrainer(model="Qwen/Qwen2.5-Coder-0.5B-Instruct", reward_funcs=[reward],
                          args=GRPOConfig(output_dir="runs/grpo"), train_dataset=dataset)
    trainer.train()

Run alone, it calls the reward function the way GRPOTrainer does (keyword arguments, every dataset
column as a list, text and chat formats) and exits 1 unless passing solutions score higher:

    python examples/trl_reward.py --sandbox-url http://127.0.0.1:8002 [--prm-url http://127.0.0.1:8001]
"""

from __future__ import annotations

import argparse
import os

from services.client.adapters import make_trl_reward


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sandbox-url", default=os.environ.get("PSGPO_SANDBOX_URL", "http://127.0.0.1:8002"))
    parser.add_argument("--prm-url", default=os.environ.get("PSGPO_PRM_URL"))
    parser.add_argument("--prm-weight", type=float, default=0.1)
    args = parser.parse_args()
    reward = make_trl_reward(
        args.sandbox_url,
        tests_column="tests",
        prm_url=args.prm_url,
        prm_weight=args.prm_weight if args.prm_url else 0.0,
    )
    tests = ["assert add(1, 2) == 3\nassert add(-1, 1) == 0\n"] * 2
    logged: dict[str, object] = {}

    # Standard (text) format: prompts and completions are strings.
    prompts = ["Write a Python function add(a, b) that returns the sum of a and b.\n"] * 2
    completions = ["def add(a, b):\n    return a + b\n", "def add(a, b):\n    return a - b\n"]
    text_rewards = reward(
        prompts=prompts,
        completions=completions,
        completion_ids=[[0], [0]],  # token ids; not used by this reward
        tests=tests,  # the dataset's "tests" column, one entry per completion
        trainer_state=None,
        log_extra=lambda column, values: logged.__setitem__(column, values),
        log_metric=lambda name, value: logged.__setitem__(name, value),
    )
    print(f"text format:   rewards {text_rewards}  logged {logged}")

    # Conversational format: lists of chat messages; the code is the assistant's fenced block.
    chat_prompts = [[{"role": "user", "content": prompts[0]}]] * 2
    chat_completions = [[{"role": "assistant", "content": f"```python\n{c}```"}] for c in completions]
    chat_rewards = reward(
        prompts=chat_prompts, completions=chat_completions, completion_ids=[[0], [0]], tests=tests
    )
    print(f"chat format:   rewards {chat_rewards}")
    reward.close()
    ok = all(r[0] is not None and r[1] is not None and r[0] > r[1] for r in (text_rewards, chat_rewards))
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
