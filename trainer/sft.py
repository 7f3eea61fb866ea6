"""Supervised fine-tuning of the policy on (prompt, solution) pairs: the starting policy of RL.

Each example is tokenized the way the rollout workers see it: the prompt alone (as the worker encodes
it before sampling), then the solution, then EOS, so the model learns to stop. The loss is the mean
cross-entropy over solution tokens only (prompt tokens are labelled -100, as in TRL's completion-only
SFT). The output dir is a Hugging Face model dir (weights + tokenizer), usable as `--policy`.
"""

from __future__ import annotations

import json
import logging
import math
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from services.common.errors import UserError
from trainer.data import DataError, SftPair, load_sft_pairs

log = logging.getLogger(__name__)
IGNORE = -100  # label of tokens without loss (the prompt, padding)


@dataclass
class SFTArgs:
    """Arguments of `psgpo train sft` (each field is a flag: `--kebab-case`)."""

    data: Path | None = None
    """JSONL of {"prompt": str, "solution": str} (required)."""
    policy: Path | None = None
    """Initial causal LM (Hugging Face dir; required)."""
    out: Path = Path("runs/sft")
    """Output: the fine-tuned model (Hugging Face dir) and metrics.jsonl."""
    epochs: int = 1
    """Passes over the data."""
    lr: float = 2e-5
    """AdamW learning rate (peak, after warm-up)."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    warmup_steps: int = 0
    """Linear warm-up of the learning rate over this many optimizer steps."""
    batch_size: int = 8
    """Examples per optimizer step."""
    max_length: int = 1024
    """Longest prompt + solution in tokens; longer examples are refused (never truncated silently)."""
    max_grad_norm: float = 1.0
    """Gradient-norm clipping."""
    add_eos: bool = True
    """Append EOS to each solution (the policy learns to stop)."""
    seed: int = 0
    """Seed of the example order."""
    device: str = "auto"
    """auto (cuda if available), cpu, cuda."""


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]


def encode_pairs(pairs: Sequence[SftPair], tokenizer: Any, max_length: int, add_eos: bool) -> list[Example]:
    prompts = tokenizer([p.prompt for p in pairs], add_special_tokens=False)["input_ids"]
    solutions = tokenizer([p.solution for p in pairs], add_special_tokens=False)["input_ids"]
    eos = [tokenizer.eos_token_id] if add_eos and tokenizer.eos_token_id is not None else []
    # The rollout backend prepends BOS to the prompt when the tokenizer asks for one; so do we.
    bos = [tokenizer.bos_token_id] if getattr(tokenizer, "add_bos_token", False) else []
    examples = []
    for i, (prompt, solution) in enumerate(zip(prompts, solutions, strict=True)):
        prompt = bos + list(prompt)
        response = list(solution) + eos
        if len(prompt) + len(response) > max_length:
            raise DataError(
                f"example {i} has {len(prompt) + len(response)} tokens > --max-length {max_length}"
            )
        if not response:
            raise DataError(f"example {i} has an empty solution")
        examples.append(Example(list(prompt) + response, [IGNORE] * len(prompt) + response))
    return examples


def collate(examples: Sequence[Example], pad_id: int, device: torch.device) -> dict[str, torch.Tensor]:
    """Right padding: input_ids / attention_mask / labels, each (B, L)."""
    width = max(len(e.input_ids) for e in examples)
    input_ids = torch.full((len(examples), width), pad_id, dtype=torch.long)  # (B, L)
    labels = torch.full((len(examples), width), IGNORE, dtype=torch.long)  # (B, L)
    attention_mask = torch.zeros((len(examples), width), dtype=torch.long)  # (B, L)
    for b, e in enumerate(examples):
        n = len(e.input_ids)
        input_ids[b, :n] = torch.tensor(e.input_ids)
        labels[b, :n] = torch.tensor(e.labels)
        attention_mask[b, :n] = 1
    return {
        "input_ids": input_ids.to(device),
        "attention_mask": attention_mask.to(device),
        "labels": labels.to(device),
    }


def solution_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    """(mean cross-entropy over solution tokens, number of those tokens); logits at t predict t+1."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits  # (B, L, V)
    targets = batch["labels"][:, 1:]  # (B, L-1)
    loss = nn.functional.cross_entropy(
        logits[:, :-1].float().reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=IGNORE
    )
    return loss, int((targets != IGNORE).sum())


@torch.no_grad()
def evaluate_loss(
    model: nn.Module, tokenizer: Any, pairs: Sequence[SftPair], batch_size: int = 16, add_eos: bool = True
) -> float:
    """Token-weighted mean solution loss of `pairs` (for tests and evaluation)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    examples = encode_pairs(pairs, tokenizer, 1 << 30, add_eos)
    total, count = 0.0, 0
    for start in range(0, len(examples), batch_size):
        loss, n = solution_loss(model, collate(examples[start : start + batch_size], pad, device))
        total, count = total + float(loss) * n, count + n
    model.train(was_training)
    return total / count


def train_sft(args: SFTArgs) -> dict[str, Any]:
    """Fine-tune and save; returns {"steps", "first_loss", "last_loss", "out"}."""
    from tqdm.auto import tqdm
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if args.data is None or args.policy is None:
        raise UserError("--data JSONL and --policy DIR are required")
    if args.epochs < 1 or args.batch_size < 1:
        raise UserError("--epochs and --batch-size must be >= 1")
    if args.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(args.device)
    try:
        pairs = load_sft_pairs(args.data)
    except DataError as exc:
        raise UserError(str(exc)) from None
    tokenizer = AutoTokenizer.from_pretrained(args.policy)
    model = AutoModelForCausalLM.from_pretrained(args.policy, dtype=torch.float32).to(device)
    model.train()
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    try:
        examples = encode_pairs(pairs, tokenizer, args.max_length, args.add_eos)
    except DataError as exc:
        raise UserError(f"{args.data}: {exc}") from None

    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    steps_per_epoch = math.ceil(len(examples) / args.batch_size)
    total_steps = steps_per_epoch * args.epochs
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / args.warmup_steps) if args.warmup_steps else 1.0
    )
    args.out.mkdir(parents=True, exist_ok=True)
    metrics_path = args.out / "metrics.jsonl"
    metrics_path.unlink(missing_ok=True)
    rng = random.Random(args.seed)
    torch.manual_seed(args.seed)
    losses: list[float] = []
    step = 0
    progress = tqdm(total=total_steps, desc="sft", dynamic_ncols=True)
    with open(metrics_path, "a") as metrics_file:
        for epoch in range(args.epochs):
            order = list(range(len(examples)))
            rng.shuffle(order)
            for start in range(0, len(order), args.batch_size):
                t0 = time.perf_counter()
                batch = collate([examples[i] for i in order[start : start + args.batch_size]], pad, device)
                loss, tokens = solution_loss(model, batch)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                grad_norm = nn.utils.clip_grad_norm_(model.parameters(), args.max_grad_norm)
                optimizer.step()
                schedule.step()
                step += 1
                losses.append(float(loss.detach()))
                seconds = time.perf_counter() - t0
                record = {"step": step, "epoch": epoch, "loss": losses[-1], "grad_norm": float(grad_norm),
                          "lr": schedule.get_last_lr()[0], "tokens": tokens,
                          "throughput/tokens_per_s": tokens / max(seconds, 1e-9)}  # fmt: skip
                metrics_file.write(json.dumps(record) + "\n")
                metrics_file.flush()
                progress.update(1)
                progress.set_postfix(loss=f"{losses[-1]:.4f}")
    progress.close()
    model.save_pretrained(args.out, safe_serialization=True)
    tokenizer.save_pretrained(args.out)
    return {"steps": step, "first_loss": losses[0], "last_loss": losses[-1], "out": str(args.out)}


def main(argv: Sequence[str] | None = None) -> None:
    """`python -m trainer.sft --flags`."""
    import sys

    from trainer.cli_train import run_sft

    try:
        run_sft(argv)
    except UserError as exc:  # one line, as `psgpo` prints it
        print(f"psgpo: error: {exc}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
