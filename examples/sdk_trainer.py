"""The same external trainer as examples/external_trainer.py, written with the psgpo SDK
(`services.client.sdk.PsgpoRun`): enqueue tasks, consume their scored trajectories with explicit
acknowledgement, publish the next policy version.

Run it with Redis, the sandbox, the PRM and at least one rollout worker up for the same run:

    python examples/sdk_trainer.py --redis redis://127.0.0.1:6379/0 --run demo \\
        --weights runs/demo/policy/model.safetensors --store /shared/psgpo-weights

--weights: a safetensors file of the full policy state dict (a trainer holding the model passes
`model.state_dict()` to `publish_weights` instead); --store: a directory the rollout workers read at
the same path. Without --weights nothing is published. Needs `pip install psgpo` (no torch).
"""

from __future__ import annotations

import argparse
import math
import sys
import uuid
from pathlib import Path

from psgpo.v1.sandbox_pb2 import RUN_STATUS_PASSED
from services.client.sdk import PsgpoRun
from services.sandbox.model import AssertTests

TASKS = [  # (prompt, MBPP-style asserts)
    ("def add(a, b):\n", "assert add(1, 2) == 3\nassert add(-1, 1) == 0\n"),
    ("def square(x):\n", "assert square(3) == 9\nassert square(-2) == 4\n"),
    ("def is_even(n):\n", "assert is_even(4)\nassert not is_even(7)\n"),
    ("def last(items):\n", "assert last([1, 2, 3]) == 3\nassert last('ab') == 'b'\n"),
]
STOP = ["\ndef ", "\nclass ", "\nif __name__"]  # end a sample after its function


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--redis", default="redis://127.0.0.1:6379/0")
    parser.add_argument("--run", default="demo")
    parser.add_argument("--consumer", default="sdk-trainer-0", help="stable name per trainer process")
    parser.add_argument("--tasks", type=int, default=4, help="tasks to enqueue")
    parser.add_argument("--n", type=int, default=4, help="samples per task")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument(
        "--timeout", type=float, default=600, help="seconds without a new trajectory before giving up"
    )
    parser.add_argument("--max-staleness", type=int, default=None, help="drop samples this many versions old")
    parser.add_argument("--weights", type=Path, default=None, help="safetensors file to publish afterwards")
    parser.add_argument("--store", type=Path, default=Path("runs/weights"), help="where workers read weights")
    args = parser.parse_args()

    with PsgpoRun(args.redis, args.run) as run:
        prefix = uuid.uuid4().hex[:8]  # task ids must be unique within a run
        expected: set[str] = set()
        for i in range(args.tasks):
            prompt, asserts = TASKS[i % len(TASKS)]
            sampling = {"temperature": 1.0, "max_new_tokens": args.max_new_tokens, "stop": STOP}
            task_id = run.enqueue(
                prompt, AssertTests(asserts), args.n, sampling=sampling, task_id=f"{prefix}-{i}"
            )
            expected |= {f"{task_id}:{j}" for j in range(args.n)}
        print(f"enqueued {args.tasks} tasks x {args.n} samples on psgpo:{args.run}:tasks", flush=True)

        passed = prm_sum = prm_count = 0.0
        mine = 0
        batches = run.trajectories(
            consumer=args.consumer, batch=32, idle_timeout_s=args.timeout, max_staleness=args.max_staleness
        )
        for batch in batches:
            with batch:  # acknowledged when the block ends without an exception
                # ... your PPO/GRPO update on batch.trajectories goes here, then save a checkpoint ...
                for trajectory in batch:
                    if trajectory.trajectory_id not in expected:
                        continue  # another producer's task: trained on all the same
                    expected.discard(trajectory.trajectory_id)
                    mine += 1
                    passed += trajectory.verdict.status == RUN_STATUS_PASSED
                    scores = [s for s in trajectory.prm_scores if not math.isnan(s)]  # NaN: neutral line
                    if scores:
                        prm_sum, prm_count = prm_sum + min(scores), prm_count + 1
            if not expected:
                break
        if expected:
            print(f"timed out: {len(expected)} trajectories missing", file=sys.stderr)
            return 1
        prm_text = f", mean PRM min-line score {prm_sum / prm_count:.3f}" if prm_count else ""
        backlog = run.backlog().unconsumed
        print(f"consumed {mine} trajectories: {int(passed)} passed{prm_text}; backlog {backlog}")
        if args.weights is not None:
            policy = run.publish_weights(run.policy_version() + 1, args.weights, args.store)
            print(f"published policy v{policy.version} sha256 {policy.sha256[:12]} at {policy.uri}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
