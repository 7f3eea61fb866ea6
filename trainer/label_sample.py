"""`psgpo label sample` (make the input of `psgpo label run` by sampling a policy through the
rollout workers) and `psgpo label select` (write one data strategy's training set from labelled
records). docs/labelling.md has the formats and the commands.
"""

from __future__ import annotations

import json
import logging
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from services.client.testspec import parse_tests
from services.common import keys
from services.common.errors import UserError
from services.sandbox.model import tests_to_dict
from trainer.label import Strategy, read_jsonl, select_records
from trainer.label_job import _write_jsonl

log = logging.getLogger(__name__)

# =====================================================================================================
# 4. Making the input (`sample`) and a training set (`select`)
# =====================================================================================================


@dataclass
class SampleArgs:
    """Arguments of `psgpo label sample`: responses of the policy the rollout workers of `<run>-sample`
    serve, with their verdicts, in the input format of `psgpo label run`."""

    tasks: str = "builtin:tiny"
    """Task JSONL ({"id", "prompt", "tests": {"kind": ...}, "stop"?}, trainer/data.py) or builtin:tiny."""
    out: Path = Path("runs/label/samples.jsonl")
    """Output JSONL, appended to: run once per checkpoint (workers serving it) to collect several."""
    n: int = 4
    """Samples per task (1..1024)."""
    run: str = "default"
    """Base run name: tasks go to run `<run>-sample` (`psgpo serve rollout --run <run>-sample`)."""
    redis_url: str = "redis://127.0.0.1:6379/0"
    """Redis of the rollout workers."""
    checkpoint: str = ""
    """Tag written to every row; empty: `v<policy_version>` of the trajectory."""
    temperature: float = 1.0
    """Sampling temperature."""
    top_p: float = 1.0
    """Nucleus sampling (1: off)."""
    max_new_tokens: int = 256
    """Longest response, in tokens."""
    seed: int = 0
    """Sampling seed of every task (0: fresh randomness)."""
    timeout_s: float = 600.0
    """Stop with an error when no trajectory arrived for this long."""
    consumer: str = "label-sampler"
    """Consumer name in the trajectories group of `<run>-sample`."""


def sample(args: SampleArgs) -> int:
    """Enqueues every task with n samples, writes one input row per trajectory; returns rows written."""
    import redis

    from trainer.data import DataError, load_tasks

    if not 1 <= args.n <= 1024 or not 1 <= args.max_new_tokens <= 32768 or args.timeout_s <= 0:
        raise UserError("need 1 <= --n <= 1024, 1 <= --max-new-tokens <= 32768 and --timeout-s > 0")
    try:
        run_name = keys.validate_run(f"{args.run}-sample")
        specs = load_tasks(args.tasks)
    except (ValueError, DataError) as exc:
        raise UserError(str(exc)) from None
    try:
        return _sample(args, run_name, specs)
    except redis.RedisError as exc:
        raise UserError(f"Redis at {args.redis_url}: {exc}") from None


def _sample(args: SampleArgs, run_name: str, specs: Sequence[Any]) -> int:
    from services.client.sdk import PsgpoRun

    nonce = uuid.uuid4().hex[:10]
    with PsgpoRun(args.redis_url, run_name) as run:
        by_task_id = {}
        for spec in specs:
            sampling = {
                "temperature": args.temperature,
                "top_p": args.top_p,
                "max_new_tokens": args.max_new_tokens,
                "seed": args.seed,
                "stop": list(spec.stop),
            }
            task_id = run.enqueue(
                spec.prompt, spec.tests, args.n, sampling, task_id=f"{spec.id}@{nonce}", score_with_prm=False
            )
            by_task_id[task_id] = spec
        expected, written, refused = args.n * len(specs), 0, 0
        args.out.parent.mkdir(parents=True, exist_ok=True)
        with open(args.out, "a", encoding="utf-8") as f:
            for batch in run.trajectories(
                args.consumer, batch=64, block_ms=1000, idle_timeout_s=args.timeout_s
            ):
                for traj in batch:
                    spec = by_task_id.get(traj.task_id)
                    if spec is None:
                        continue  # an earlier sample job's leftovers: acknowledged with the batch
                    if any(fail.component == "task" for fail in traj.failures):
                        refused += args.n  # a refused task leaves one record for all its samples
                        log.warning("task %s refused: %s", spec.id, traj.failures[0].reason)
                        continue
                    row = {
                        "task_id": spec.id,
                        "prompt": spec.prompt,
                        "response": traj.response,
                        "tests": tests_to_dict(parse_tests(spec.tests)),
                        "checkpoint": args.checkpoint or f"v{traj.policy_version}",
                        "logprob": float(sum(traj.logprobs)),  # the policy's log-likelihood of the response
                    }
                    if traj.HasField("verdict"):  # else the label job asks the sandbox
                        row["passed"] = bool(traj.verdict.passed)
                    f.write(json.dumps(row, ensure_ascii=False) + "\n")
                    written += 1
                f.flush()
                batch.ack()
                if written + refused >= expected:
                    break
    if written + refused < expected:
        raise UserError(
            f"only {written + refused} of {expected} samples arrived within {args.timeout_s:g}s of silence: "
            f"are rollout workers serving run '{run_name}'? ({written} rows written to {args.out})"
        )
    print(f"sample: {written} rows appended to {args.out} ({refused} refused)", flush=True)
    return written


@dataclass
class SelectArgs:
    """Arguments of `psgpo label select`: one data strategy's training set from labelled records."""

    input: Path | None = None
    """Labelled JSONL (`psgpo label run` output; required)."""
    out: Path | None = None
    """Output JSONL, same format (required)."""
    strategy: Strategy = "full"
    """full, revised-only (failed responses with a correct prefix), remove-hard (drop prompts where no
    sample passed and no correct prefix was found), medium-only (prompts with a pass rate in the band)."""
    medium_low: float = 0.1
    """Lowest sample pass rate of a medium prompt."""
    medium_high: float = 0.9
    """Highest sample pass rate of a medium prompt."""


def select(args: SelectArgs) -> int:
    if args.input is None or args.out is None:
        raise UserError("--input and --out are required")
    if not 0 <= args.medium_low <= args.medium_high <= 1:
        raise UserError("need 0 <= --medium-low <= --medium-high <= 1")
    records = read_jsonl(args.input)
    for number, record in enumerate(records, 1):
        missing = [k for k in ("task_id", "passed", "labels") if k not in record]
        if missing:
            raise UserError(f"{args.input}:{number}: not a labelled record (missing {', '.join(missing)})")
    chosen = select_records(records, args.strategy, args.medium_low, args.medium_high)
    _write_jsonl(args.out, chosen)
    tasks = len({r["task_id"] for r in chosen})
    print(f"select {args.strategy}: {len(chosen)} of {len(records)} records ({tasks} prompts) -> {args.out}")
    return len(chosen)
