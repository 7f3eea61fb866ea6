"""PRM training: regression (MSE) of the PRM's score at each labelled line end onto the line's label.

Input: the labeller's JSONL (one labelled response per line; docs/prm.md has the format). A line
labelled +1 ends a prefix from which a passing program can still be written, -1 one from which none
was found; null (neutral: blank or comment-only) lines carry no loss (DESIGN.md, "PSGPO, precisely").

The model reads exactly what the PRM service reads: `PrmScorer.prepare` (services/prm/scorer.py) tokenizes
every example, line-aligned, and the loss sits on the token the service reads that line's score from.
So a trained score at a line end is the number `psgpo serve prm` returns for that line.

The start model is a causal LM (the policy or SFT checkpoint: transformers builds a
*ForTokenClassification on its backbone with a fresh one-output `score` head, as the paper initialises
the PRM from the policy) or an existing PRM. Responses are split into train and validation by task_id
(seeded; one task never straddles both), training stops early when the validation loss has not improved
for `patience` epochs, and the best epoch is saved in Hugging Face format (model and tokenizer), the
format the PRM service and the PPO critic (trainer/modeling.py) load.
"""

from __future__ import annotations

import json
import logging
import math
import random
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from services.common.errors import RequestError, UserError
from services.common.lines import split_lines
from services.common.torch_device import resolve_device
from services.prm.scorer import Prepared, PrmScorer
from trainer.data import DataError, read_jsonl_rows

log = logging.getLogger(__name__)
LABELS = (1, -1)  # a line's label; None (JSON null): neutral, no loss


@dataclass
class PrmTrainArgs:
    """Arguments of `psgpo train prm` (each field is a flag: `--kebab-case`)."""

    data: Path | None = None
    """Labelled JSONL from the labeller (format in docs/prm.md; required)."""
    model: Path | None = None
    """Start model: a causal LM dir (policy / SFT; gets a fresh score head) or a PRM dir (required)."""
    out: Path = Path("runs/prm")
    """Output: the best PRM (Hugging Face dir, model + tokenizer), metrics.jsonl and prm_train.json."""
    epochs: int = 10
    """Most passes over the training split."""
    patience: int = 3
    """Stop after this many epochs without a validation loss lower than the best by min_delta."""
    min_delta: float = 0.0
    """Smallest drop of the validation loss that counts as an improvement."""
    val_fraction: float = 0.1
    """Fraction of task_ids held out for validation (at least one task); 0: no validation, the last epoch
    is saved."""
    lr: float = 2e-5
    """AdamW learning rate (peak, after warm-up)."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    warmup_steps: int = 0
    """Linear warm-up of the learning rate over this many optimizer steps."""
    batch_size: int = 8
    """Responses per optimizer step."""
    max_length: int = 0
    """Longest prompt + response in tokens (0: the model's max_position_embeddings); longer rows are
    refused, never truncated."""
    max_grad_norm: float = 1.0
    """Gradient-norm clipping."""
    tags: str | None = None
    """Comma-separated strategy tags: train only on rows whose strategy_tags hold one of them (none: all)."""
    seed: int = 0
    """Seed of the split, the example order and the fresh head."""
    device: str = "auto"
    """auto (cuda if available, else cpu), cpu, cuda, cuda:N."""
    threads: int = 0
    """torch CPU threads (0: torch's default)."""


# =====================================================================================================
# Data: the labelled JSONL, validated against the one line definition
# =====================================================================================================


@dataclass(frozen=True)
class LabelledResponse:
    task_id: str
    prompt: str
    response: str
    passed: bool
    labels: list[int | None]  # one per line of split_lines(response); None: no label
    where: str  # "path:line" for messages

    @property
    def num_labelled(self) -> int:
        return sum(label is not None for label in self.labels)


def _labels(row: dict[str, Any], response: str, where: str) -> list[int | None]:
    """The row's labels after checking its line_spans against split_lines(response)."""
    lines = split_lines(response)
    spans, labels = row["line_spans"], row["labels"]
    if not isinstance(spans, list) or not isinstance(labels, list):
        raise DataError(f"{where}: line_spans and labels must be lists")
    expected = [[line.start, line.end] for line in lines]
    if len(spans) != len(expected):
        raise DataError(
            f"{where}: {len(spans)} line_spans but split_lines(response) gives {len(expected)} lines "
            "(services/common/lines.py defines a line)"
        )
    for m, (span, want) in enumerate(zip(spans, expected, strict=True)):
        if span != want:
            raise DataError(f"{where}: line_spans[{m}] is {span}, split_lines(response) gives {want}")
    if len(labels) != len(lines):
        raise DataError(f"{where}: {len(labels)} labels for {len(lines)} line_spans")
    for m, (label, line) in enumerate(zip(labels, lines, strict=True)):
        if label is None:
            continue
        if type(label) is not int or label not in LABELS:
            raise DataError(f"{where}: labels[{m}] is {json.dumps(label)}; expected 1, -1 or null")
        if line.neutral:
            raise DataError(f"{where}: labels[{m}] is {label} on a blank or comment-only line; expected null")
    return labels


def load_labelled(path: Path, tags: Sequence[str] = ()) -> list[LabelledResponse]:
    """Validated rows of a labelled JSONL (unknown keys ignored); with `tags`, only rows carrying one."""
    rows: list[LabelledResponse] = []
    try:
        for number, row in read_jsonl_rows(Path(path)):
            where = f"{path}:{number}"
            missing = [k for k in ("task_id", "prompt", "response", "line_spans", "labels") if k not in row]
            if missing:
                raise DataError(f"{where}: missing field(s) {', '.join(missing)}")
            task_id, prompt, response = row["task_id"], row["prompt"], row["response"]
            if not isinstance(task_id, str) or not task_id:
                raise DataError(f"{where}: task_id must be a non-empty string")
            if not isinstance(prompt, str) or not isinstance(response, str):
                raise DataError(f"{where}: prompt and response must be strings")
            passed = row.get("passed", False)
            if not isinstance(passed, bool):
                raise DataError(f"{where}: passed must be true or false")
            labels = _labels(row, response, where)
            if tags and not set(tags) & set(row.get("strategy_tags") or []):
                continue
            rows.append(LabelledResponse(task_id, prompt, response, passed, labels, where))
    except DataError as exc:
        raise UserError(str(exc)) from None
    if not rows:
        raise UserError(f"{path}: no row carries any of the strategy tags {', '.join(tags)}")
    if not any(r.num_labelled for r in rows):
        raise UserError(f"{path}: every label is null: no line is labelled 1 or -1")
    return rows


def split_by_task(
    rows: Sequence[LabelledResponse], val_fraction: float, seed: int
) -> tuple[list[LabelledResponse], list[LabelledResponse]]:
    """(train, validation): a seeded shuffle of the task_ids, the first ones (at least one) held out."""
    if val_fraction <= 0:
        return list(rows), []
    tasks = sorted({r.task_id for r in rows})
    if len(tasks) < 2:
        raise UserError(
            f"a validation split needs 2+ task_ids, the data has {len(tasks)} (or --val-fraction 0)"
        )
    random.Random(seed).shuffle(tasks)
    held_out = set(tasks[: min(len(tasks) - 1, max(1, round(len(tasks) * val_fraction)))])
    return [r for r in rows if r.task_id not in held_out], [r for r in rows if r.task_id in held_out]


# =====================================================================================================
# Tokenization: the PRM service's own (`PrmScorer.prepare`), without loading a second model
# =====================================================================================================


class LineAlignedTokenizer(PrmScorer):
    """`PrmScorer.prepare`, inherited unchanged, over a tokenizer alone: the trainer and the evaluator
    put labels on exactly the tokens the service reads scores from. The attributes set here are the
    ones `prepare` reads, with the values `PrmScorer._load` gives them."""

    def __init__(self, tokenizer: Any, max_length: int) -> None:  # no model: PrmScorer.__init__ not called
        if not getattr(tokenizer, "is_fast", False):
            raise UserError("a fast (Rust) tokenizer is required (tokenizer.json), as the PRM service needs")
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.max_chars = sys.maxsize  # only a shortcut in prepare; the exact token count still applies
        self.bos = [tokenizer.bos_token_id] if getattr(tokenizer, "add_bos_token", False) else []


def prepare_items(
    tok: PrmScorer, items: Sequence[tuple[str, str]], wheres: Sequence[str], chunk: int = 1024
) -> list[Prepared]:
    """`tok.prepare` over (prompt, response) items, batched; a refusal names the item's `where`."""
    out: list[Prepared] = []
    for start in range(0, len(items), chunk):
        part = items[start : start + chunk]
        try:
            out.extend(tok.prepare(list(part)))
        except RequestError:
            for item, where in zip(part, wheres[start : start + chunk], strict=True):  # name the item
                try:
                    tok.prepare([item])
                except RequestError as exc:
                    raise UserError(f"{where}: {exc.message.removeprefix('items[0]: ')}") from None
            raise
    return out


@dataclass
class Example:
    input_ids: list[int]  # prompt + line-aligned response tokens, as the service builds them
    positions: list[int]  # per labelled line: the token its score is read from
    targets: list[float]  # per labelled line: +1 / -1


def make_examples(tok: PrmScorer, rows: Sequence[LabelledResponse]) -> list[Example]:
    """One example per row with at least one labelled line."""
    examples = []
    prepared = prepare_items(tok, [(r.prompt, r.response) for r in rows], [r.where for r in rows])
    for row, item in zip(rows, prepared, strict=True):
        marks = [
            (item.prompt_len + item.token_index[m], float(y))
            for m, y in enumerate(row.labels)
            if y is not None
        ]
        if marks:
            examples.append(Example(item.input_ids, [p for p, _ in marks], [y for _, y in marks]))
    return examples


def collate(examples: Sequence[Example], pad_id: int, device: torch.device) -> dict[str, torch.Tensor]:
    """Right padding (causal outputs at real tokens ignore it, as in the service's forward)."""
    width = max(len(e.input_ids) for e in examples)
    input_ids = torch.full((len(examples), width), pad_id, dtype=torch.long)  # (B, L)
    attention_mask = torch.zeros((len(examples), width), dtype=torch.long)  # (B, L)
    rows, cols, targets = [], [], []
    for b, e in enumerate(examples):
        input_ids[b, : len(e.input_ids)] = torch.tensor(e.input_ids)
        attention_mask[b, : len(e.input_ids)] = 1
        rows += [b] * len(e.positions)
        cols += e.positions
        targets += e.targets
    return {
        "input_ids": input_ids.to(device),
        "attention_mask": attention_mask.to(device),
        "rows": torch.tensor(rows, device=device),  # (N,) labelled lines of the batch
        "cols": torch.tensor(cols, device=device),  # (N,)
        "targets": torch.tensor(targets, device=device),  # (N,)
    }


def line_scores(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The model's score at every labelled line end of the batch: (N,)."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits  # (B, L, 1)
    return logits[..., 0].float()[batch["rows"], batch["cols"]]  # (N,)


@torch.no_grad()
def evaluate(model: nn.Module, examples: Sequence[Example], pad_id: int, batch_size: int) -> dict[str, float]:
    """Line-weighted MSE and sign accuracy over the examples' labelled lines."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    squared, correct, count = 0.0, 0, 0
    ordered = sorted(examples, key=lambda e: len(e.input_ids))  # less padding
    for start in range(0, len(ordered), batch_size):
        batch = collate(ordered[start : start + batch_size], pad_id, device)
        scores = line_scores(model, batch)  # (N,)
        squared += float(((scores - batch["targets"]) ** 2).sum())
        correct += int(((scores > 0) == (batch["targets"] > 0)).sum())
        count += len(scores)
    model.train(was_training)
    return {"loss": squared / count, "accuracy": correct / count}


# =====================================================================================================
# Model
# =====================================================================================================


def load_start_model(path: Path, seed: int) -> tuple[nn.Module, Any]:
    """(token classifier with one output, tokenizer) from a causal LM dir (fresh seeded head) or a PRM dir."""
    from transformers import AutoConfig, AutoModelForTokenClassification, AutoTokenizer

    from trainer.modeling import quiet_transformers

    if not path.is_dir():
        raise UserError(f"--model {path} is not a directory")
    if not (path / "config.json").is_file():
        raise UserError(f"--model {path} is not a Hugging Face model dir (no config.json)")
    quiet_transformers()
    try:
        config = AutoConfig.from_pretrained(path)
        archs = list(getattr(config, "architectures", None) or [])
        if any(a.endswith("ForTokenClassification") for a in archs) and config.num_labels != 1:
            raise UserError(
                f"--model {path} is a token classifier with num_labels={config.num_labels}, not 1"
            )
        tokenizer = AutoTokenizer.from_pretrained(path)
        torch.manual_seed(seed)  # the fresh head's init
        model, info = AutoModelForTokenClassification.from_pretrained(
            path, num_labels=1, dtype=torch.float32, output_loading_info=True
        )
    except (OSError, ValueError, KeyError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"cannot load --model {path} as a token classifier: {first}") from None
    backbone_missing = [k for k in info["missing_keys"] if not k.startswith(("score.", "classifier."))]
    if backbone_missing:
        raise UserError(f"--model {path} lacks backbone weights {sorted(backbone_missing)[:5]}")
    if info["missing_keys"]:
        log.info("%s has no score head: starting from a fresh one (seed %d)", path, seed)
    return model, tokenizer


# =====================================================================================================
# Training
# =====================================================================================================


def _check_args(args: PrmTrainArgs) -> None:
    if args.data is None or args.model is None:
        raise UserError("--data JSONL and --model DIR are required")
    if not Path(args.data).is_file():
        raise UserError(f"--data {args.data}: no such file")
    if args.epochs < 1 or args.batch_size < 1 or args.patience < 1:
        raise UserError("--epochs, --batch-size and --patience must be >= 1")
    if not 0 <= args.val_fraction < 1:
        raise UserError("--val-fraction must be in [0, 1)")
    if args.max_length < 0 or args.lr <= 0:
        raise UserError("--max-length must be >= 0 and --lr > 0")


def train_prm(args: PrmTrainArgs) -> dict[str, Any]:
    """Train, keep the best validation epoch in args.out, return (and write prm_train.json) a summary."""
    from tqdm.auto import tqdm

    _check_args(args)
    assert args.data is not None and args.model is not None
    try:
        device = torch.device(resolve_device(args.device, "float32", args.threads)[0])
    except ValueError as exc:
        raise UserError(str(exc)) from None
    tags = [t.strip() for t in (args.tags or "").split(",") if t.strip()]
    rows = load_labelled(args.data, tags)
    train_rows, val_rows = split_by_task([r for r in rows if r.num_labelled], args.val_fraction, args.seed)

    model, tokenizer = load_start_model(Path(args.model), args.seed)
    model.to(device).train()
    max_length = args.max_length or getattr(model.config, "max_position_embeddings", None) or 1 << 20
    tok = LineAlignedTokenizer(tokenizer, max_length)
    train_set, val_set = make_examples(tok, train_rows), make_examples(tok, val_rows)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    pad = int(pad) if pad is not None else 0
    train_lines = sum(len(e.targets) for e in train_set)
    positive = sum(t > 0 for e in train_set for t in e.targets)
    log.info(
        "%d train responses (%d lines, %.0f%% +1) over %d tasks, %d validation responses over %d tasks",
        len(train_set), train_lines, 100 * positive / train_lines, len({r.task_id for r in train_rows}),
        len(val_set), len({r.task_id for r in val_rows}),
    )  # fmt: skip

    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / args.warmup_steps) if args.warmup_steps else 1.0
    )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    metrics_path = out / "metrics.jsonl"
    metrics_path.unlink(missing_ok=True)
    rng = random.Random(args.seed)
    torch.manual_seed(args.seed)

    def save() -> None:
        model.save_pretrained(out, safe_serialization=True)
        tokenizer.save_pretrained(out)

    initial = evaluate(model, val_set, pad, args.batch_size) if val_set else None
    if initial:
        with open(metrics_path, "a") as metrics_file:
            metrics_file.write(json.dumps({"step": 0, "epoch": 0, "val_loss": initial["loss"],
                                           "val_accuracy": initial["accuracy"]}) + "\n")  # fmt: skip
    best_loss, best_epoch, bad_epochs, epoch, train_loss = math.inf, 0, 0, 0, math.nan
    steps_per_epoch = math.ceil(len(train_set) / args.batch_size)
    progress = tqdm(total=args.epochs * steps_per_epoch, desc="prm", dynamic_ncols=True)
    with open(metrics_path, "a") as metrics_file:
        for epoch in range(1, args.epochs + 1):
            t0 = time.perf_counter()
            order = list(range(len(train_set)))
            rng.shuffle(order)
            squared, count = 0.0, 0
            for start in range(0, len(order), args.batch_size):
                batch = collate([train_set[i] for i in order[start : start + args.batch_size]], pad, device)
                scores = line_scores(model, batch)  # (N,)
                loss = nn.functional.mse_loss(scores, batch["targets"])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                nn.utils.clip_grad_norm_(model.parameters(), args.max_grad_norm)
                optimizer.step()
                schedule.step()
                squared, count = squared + float(loss.detach()) * len(scores), count + len(scores)
                progress.update(1)
                progress.set_postfix(loss=f"{float(loss.detach()):.4f}")
            train_loss = squared / count
            record: dict[str, Any] = {"step": epoch, "epoch": epoch, "train_loss": train_loss}
            if val_set:
                val = evaluate(model, val_set, pad, args.batch_size)
                record |= {"val_loss": val["loss"], "val_accuracy": val["accuracy"]}
                improved = val["loss"] < best_loss - args.min_delta
                if improved:
                    best_loss, best_epoch, bad_epochs = val["loss"], epoch, 0
                    save()
                else:
                    bad_epochs += 1
                record["best"] = improved
                progress.set_postfix(loss=f"{train_loss:.4f}", val=f"{val['loss']:.4f}")
            record |= {"lr": schedule.get_last_lr()[0], "seconds": time.perf_counter() - t0}
            metrics_file.write(json.dumps(record) + "\n")
            metrics_file.flush()
            if bad_epochs >= args.patience:
                break
    progress.close()
    if not val_set:
        best_epoch = epoch
        save()
    summary = {
        "out": str(out),
        "epochs_run": epoch,
        "best_epoch": best_epoch,
        "stopped_early": epoch < args.epochs,
        "initial_val_loss": initial["loss"] if initial else None,
        "best_val_loss": best_loss if val_set else None,
        "last_train_loss": train_loss,
        "train_responses": len(train_set),
        "val_responses": len(val_set),
        "train_lines": train_lines,
        "val_lines": sum(len(e.targets) for e in val_set),
        "train_task_ids": sorted({r.task_id for r in train_rows}),
        "val_task_ids": sorted({r.task_id for r in val_rows}),
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(args).items()},
    }
    (out / "prm_train.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def main(argv: Sequence[str] | None = None) -> None:
    """`python -m trainer.prm_train --flags`."""
    from trainer.cli_prm import run_prm_train

    try:
        run_prm_train(argv)
    except UserError as exc:  # one line, as `psgpo` prints it
        print(f"psgpo: error: {exc}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
