"""The PRM's data in the demo, as the paper collects it: sample responses from the RLTF run's checkpoints,
label their lines by binary search (probes are ordinary rollout tasks on the stack's workers), train the
PRM on the training tasks' labels and evaluate it on the held-out tasks' labels."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

from services.demo.config import DemoConfig
from services.demo.runs import Endpoints, serving
from trainer.data import read_jsonl_rows

STOP = ["\ndef ", "\nclass ", "\nif __name__", "\nprint("]


def subset(tasks: Path, count: int, seed: int, out: Path) -> Path:
    """`count` tasks of a task JSONL drawn with `seed` (all when count >= their number)."""
    lines = [line for line in tasks.read_text().splitlines() if line.strip()]
    chosen = sorted(random.Random(seed).sample(range(len(lines)), min(count, len(lines))))
    out.write_text("".join(lines[i] + "\n" for i in chosen))
    return out


def sample_checkpoints(
    checkpoints: dict[str, Path],
    splits: dict[str, tuple[Path, Path]],
    n: int,
    cfg: DemoConfig,
    ends: Endpoints,
    run: str,
    logs: Path,
    weights: Path,
    workers: int,
) -> dict[str, int]:
    """n samples per task of every split ({name: (task JSONL, output JSONL)}) from each checkpoint, served
    by `workers` rollout workers on `<run>-sample`; {split: rows written}."""
    from trainer.label_sample import SampleArgs, sample

    for _, out in splits.values():
        out.unlink(missing_ok=True)  # the stage is redone as a whole
    rows = dict.fromkeys(splits, 0)
    for i, (tag, policy) in enumerate(checkpoints.items()):
        with serving(policy, f"{run}-sample", ends, logs, weights, workers, f"sample-{tag}"):
            for name, (tasks, out) in splits.items():
                args = SampleArgs(
                    tasks=str(tasks),
                    out=out,
                    n=n,
                    run=run,
                    redis_url=ends.redis_url,
                    checkpoint=tag,
                    max_new_tokens=cfg.max_new_tokens,
                    seed=101 + i,
                    timeout_s=300,
                )
                rows[name] += sample(args)
    return rows


def label(
    samples: Path,
    out: Path,
    policy: Path,
    tag: str,
    cfg: DemoConfig,
    ends: Endpoints,
    run: str,
    logs: Path,
    weights: Path,
    workers: int,
) -> dict[str, Any]:
    """Binary-search labels of every failed response; completions from `policy` (workers on `<run>-label`)."""
    from trainer.label_job import LabelArgs
    from trainer.label_job import label as label_job

    with serving(policy, f"{run}-label", ends, logs, weights, workers, "label"):
        return label_job(
            LabelArgs(
                input=samples,
                out=out,
                k=cfg.label_k,
                run=run,
                redis_url=ends.redis_url,
                sandbox_url=ends.sandbox_http,
                max_new_tokens=cfg.max_new_tokens,
                seed=7,
                stop=json.dumps(STOP),
                completion_policy=tag,
                probe_timeout_s=300,
            )
        )


def groups(samples: Path, out: Path) -> Path:
    """Best-of-N groups ({"task_id", "prompt", "samples": [...]}): every sample of a task, all checkpoints."""
    by_task: dict[str, dict[str, Any]] = {}
    for _, row in read_jsonl_rows(samples):
        group = by_task.setdefault(
            row["task_id"], {"task_id": row["task_id"], "prompt": row["prompt"], "samples": []}
        )
        group["samples"].append(
            {"response": row["response"], "passed": row["passed"], "logprob": row["logprob"]}
        )
    out.write_text("".join(json.dumps(g) + "\n" for g in by_task.values()))
    return out


def train_prm(labels: Path, start: Path, out: Path, cfg: DemoConfig) -> dict[str, Any]:
    from trainer.prm_train import PrmTrainArgs, train_prm

    return train_prm(
        PrmTrainArgs(
            data=labels, model=start, out=out, epochs=cfg.prm_epochs, lr=1e-3, batch_size=16, device="cpu"
        )
    )


def eval_prm(model: Path, labels: Path, group_file: Path, out: Path) -> dict[str, Any]:
    from trainer.prm_eval import PrmEvalArgs, eval_prm

    return eval_prm(PrmEvalArgs(model=model, data=labels, groups=group_file, out=out, device="cpu"))
