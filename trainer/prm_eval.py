"""PRM evaluation: line-level ROC AUC, accuracy and calibration on held-out labelled responses, and
best-of-N reranking against random choice and the policy's own logprob.

Scores come from `PrmScorer` (services/prm/scorer.py), the PRM service's core: the numbers here are
the numbers `psgpo serve prm` returns. Outputs: OUT/prm_eval.json and OUT/calibration.png.

- AUC: Mann-Whitney U over labelled lines (+1 positive), ties counted one half, so it equals
  P(score of a +1 line > score of a -1 line) + P(equal) / 2. No sklearn needed.
- Accuracy: a line is called correct when its score > --threshold (0: the midpoint of the -1/+1 targets).
- Calibration: the lines sorted by score into equal-count bins; per bin, the mean label (on the -1/+1
  scale, = 2 P(correct) - 1) against the mean score. A calibrated regressor lies on the diagonal.
- Best-of-N: per group of N samples of one prompt, the pass rate of the sample the PRM ranks first
  (the --aggregate of its line scores; a response without a scored line falls back to the score at its
  last token, as the service's /get_reward does), vs a uniformly random pick (the group's mean pass
  rate, its expected value) and vs the highest policy logprob (groups where every sample has one).
  Tied top samples count as a uniform pick among them.
"""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from services.common.errors import UserError
from services.prm.scorer import Prepared, PrmScorer, Scored, aggregate
from trainer.data import DataError, read_jsonl_rows
from trainer.plot import BLACK, BLUE, GREY, LIGHT, WHITE, draw_line, draw_text, text_width, write_png
from trainer.prm_train import load_labelled, prepare_items


@dataclass
class PrmEvalArgs:
    """Arguments of `psgpo eval prm` (each field is a flag: `--kebab-case`)."""

    model: Path | None = None
    """The PRM to evaluate (Hugging Face token classifier, num_labels=1; required)."""
    data: Path | None = None
    """Held-out labelled JSONL (the labeller's format, docs/prm.md): line AUC, accuracy, calibration."""
    groups: Path | None = None
    """Best-of-N JSONL: {"task_id", "prompt", "samples": [{"response", "passed", "logprob"}]} per line."""
    out: Path = Path("runs/prm_eval")
    """Output dir: prm_eval.json and calibration.png."""
    threshold: float = 0.0
    """A line is predicted correct when its score is above this."""
    aggregate: Literal["min", "mean", "last"] = "min"
    """How line scores become one response score for best-of-N and the response-level AUC."""
    bins: int = 10
    """Equal-count bins of the calibration plot."""
    batch_size: int = 16
    """Responses per forward pass."""
    max_length: int = 0
    """Longest prompt + response in tokens (0: the model's max_position_embeddings); longer rows are
    refused, never truncated."""
    device: str = "auto"
    """auto (cuda if available, else cpu), cpu, cuda, cuda:N."""
    dtype: str = "auto"
    """auto (bfloat16 on GPU, float32 on CPU), float32, bfloat16, float16."""
    threads: int = 0
    """torch CPU threads (0: torch's default)."""


# =====================================================================================================
# Metrics (pure)
# =====================================================================================================


def roc_auc(scores: Sequence[float], positive: Sequence[bool]) -> float | None:
    """Mann-Whitney U / (n+ n-), tied scores sharing their average rank; None when a class is empty."""
    n_pos = sum(bool(p) for p in positive)
    n_neg = len(scores) - n_pos
    if not n_pos or not n_neg:
        return None
    order = sorted(range(len(scores)), key=lambda i: scores[i])
    ranks = [0.0] * len(scores)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and scores[order[j + 1]] == scores[order[i]]:
            j += 1
        for k in range(i, j + 1):
            ranks[order[k]] = (i + j) / 2 + 1  # 1-based average rank of the tie block
        i = j + 1
    rank_sum = sum(r for r, p in zip(ranks, positive, strict=True) if p)
    return (rank_sum - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)


def calibration_bins(scores: Sequence[float], targets: Sequence[float], bins: int) -> list[dict[str, float]]:
    """Equal-count bins over the sorted scores: count, score range, mean score, mean target (-1/+1)."""
    order = sorted(range(len(scores)), key=lambda i: scores[i])
    edges = [round(k * len(order) / bins) for k in range(bins + 1)]
    out = []
    for lo, hi in zip(edges, edges[1:], strict=False):
        if hi > lo:
            idx = order[lo:hi]
            mean_label = sum(targets[i] for i in idx) / len(idx)
            out.append({
                "count": len(idx),
                "min_score": scores[idx[0]],
                "max_score": scores[idx[-1]],
                "mean_score": sum(scores[i] for i in idx) / len(idx),
                "mean_label": mean_label,
                "fraction_correct": (mean_label + 1) / 2,
            })  # fmt: skip
    return out


def top_pass_rate(keys: Sequence[float], passed: Sequence[bool]) -> float:
    """Pass rate of the sample ranked first by `keys` (ties: a uniform pick among the tied ones; NaN is
    ranked last)."""
    clean = [k if math.isfinite(k) or k == math.inf else -math.inf for k in keys]
    best = max(clean)
    tied = [p for k, p in zip(clean, passed, strict=True) if k == best]
    return sum(tied) / len(tied)


def best_of_n(
    prm: Sequence[Sequence[float]],
    passed: Sequence[Sequence[bool]],
    logprob: Sequence[Sequence[float | None]],
) -> dict[str, Any]:
    """Per group: the PRM's pick vs random vs the highest logprob vs any sample passing (pass@N)."""

    def mean(values: list[float]) -> float | None:
        return sum(values) / len(values) if values else None

    with_logprob = [g for g, lps in enumerate(logprob) if lps and all(lp is not None for lp in lps)]
    return {
        "groups": len(prm),
        "samples": sum(len(p) for p in passed),
        "prm": mean([top_pass_rate(s, p) for s, p in zip(prm, passed, strict=True)]),
        "random": mean([sum(p) / len(p) for p in passed]),
        "oracle": mean([float(any(p)) for p in passed]),
        "logprob_groups": len(with_logprob),
        "logprob": mean([top_pass_rate(logprob[g], passed[g]) for g in with_logprob]),  # type: ignore[arg-type]
        "prm_on_logprob_groups": mean([top_pass_rate(prm[g], passed[g]) for g in with_logprob]),
    }


# =====================================================================================================
# The calibration plot (trainer/plot.py's PNG writer and font: no plotting library)
# =====================================================================================================


def draw_calibration(bins: Sequence[dict[str, float]], title: str) -> np.ndarray:
    """Mean label (y) against mean score (x) per bin, with the diagonal y = x; axes span at least [-1, 1]."""
    size, left, top, bottom, right = 360, 64, 40, 40, 16
    img = np.full((top + size + bottom, left + size + right, 3), WHITE, dtype=np.uint8)
    values = [b["mean_score"] for b in bins] + [b["mean_label"] for b in bins]
    lo, hi = min([-1.0, *values]), max([1.0, *values])

    def px(v: float) -> float:
        return left + (v - lo) / (hi - lo) * size

    def py(v: float) -> float:
        return top + size - (v - lo) / (hi - lo) * size

    img[int(py(0)), left : left + size] = LIGHT
    img[top : top + size, int(px(0))] = LIGHT
    img[top : top + size + 1, [left, left + size]] = GREY
    img[[top, top + size], left : left + size + 1] = GREY
    draw_line(img, px(lo), py(lo), px(hi), py(hi), GREY)
    draw_text(img, left, 6, title[: size // 8])
    draw_text(img, left, 20, "Y: MEAN LABEL, X: MEAN SCORE", GREY)
    for v in (lo, hi):
        label = f"{v:.3g}"
        draw_text(img, left - 4 - text_width(label), int(py(v)) - 5, label)
        draw_text(img, int(px(v)) - text_width(label) // 2, top + size + 8, label)
    previous: tuple[float, float] | None = None
    for b in bins:
        x, y = px(b["mean_score"]), py(b["mean_label"])
        if previous is not None:
            draw_line(img, previous[0], previous[1], x, y, BLUE)
        xi, yi = int(round(x)), int(round(y))
        img[max(0, yi - 3) : yi + 4, max(0, xi - 3) : xi + 4] = BLUE
        previous = (x, y)
    if not bins:
        draw_text(img, left + 8, top + size // 2, "NO LABELLED LINES", BLACK)
    return img


# =====================================================================================================
# Inputs and scoring
# =====================================================================================================


@dataclass(frozen=True)
class Group:
    task_id: str
    prompt: str
    responses: list[str]
    passed: list[bool]
    logprob: list[float | None]
    where: str


def load_groups(path: Path) -> list[Group]:
    """Best-of-N groups from JSONL, validated (one line per group of samples of one prompt)."""
    groups = []
    try:
        for number, row in read_jsonl_rows(Path(path)):
            where = f"{path}:{number}"
            samples = row.get("samples")
            if not isinstance(row.get("task_id"), str) or not isinstance(row.get("prompt"), str):
                raise DataError(f"{where}: task_id and prompt must be strings")
            if not isinstance(samples, list) or not samples:
                raise DataError(f"{where}: samples must be a non-empty list")
            for s, sample in enumerate(samples):
                lp = sample.get("logprob") if isinstance(sample, dict) else None
                if (
                    not isinstance(sample, dict)
                    or not isinstance(sample.get("response"), str)
                    or not isinstance(sample.get("passed"), bool)
                    or isinstance(lp, bool)
                    or not (lp is None or isinstance(lp, int | float))
                ):
                    raise DataError(
                        f"{where}: samples[{s}] must be "
                        "{'response': str, 'passed': bool, 'logprob': float|null}"
                    )
            responses, passed = [s["response"] for s in samples], [s["passed"] for s in samples]
            logprob = [None if s.get("logprob") is None else float(s["logprob"]) for s in samples]
            groups.append(Group(row["task_id"], row["prompt"], responses, passed, logprob, where))
    except DataError as exc:
        raise UserError(str(exc)) from None
    return groups


def score_prepared(scorer: PrmScorer, items: Sequence[Prepared], batch_size: int, desc: str) -> list[Scored]:
    """The scorer's forward over length-sorted batches (less padding), results in input order."""
    from tqdm.auto import tqdm

    order = sorted(range(len(items)), key=lambda i: items[i].num_tokens)
    out: list[Scored | None] = [None] * len(items)
    with tqdm(total=len(items), desc=desc, dynamic_ncols=True) as progress:
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            for i, scored in zip(idx, scorer.forward_on_model_thread([items[i] for i in idx]), strict=True):
                out[i] = scored
            progress.update(len(idx))
    return out  # type: ignore[return-value]


def response_score(scored: Scored, how: str) -> float:
    """The --aggregate of the line scores; the last token's score when no line is scored (as /get_reward)."""
    value = aggregate(scored.line_scores, how)
    return value if value is not None else scored.last_token_score


def _mean(values: Sequence[float]) -> float | None:
    return sum(values) / len(values) if values else None


def eval_labelled(scorer: PrmScorer, args: PrmEvalArgs) -> tuple[dict[str, Any], np.ndarray]:
    """Line-level and response-level metrics on labelled data, and the calibration figure."""
    assert args.data is not None
    rows = load_labelled(args.data)
    prepared = prepare_items(scorer, [(r.prompt, r.response) for r in rows], [r.where for r in rows])
    scored = score_prepared(scorer, prepared, args.batch_size, "prm eval lines")
    scores: list[float] = []
    targets: list[float] = []
    unscored = 0
    for row, out in zip(rows, scored, strict=True):
        for label, score in zip(row.labels, out.line_scores, strict=True):
            if label is not None and score is None:
                unscored += 1  # a non-finite model output
            elif label is not None and score is not None:
                scores.append(score)
                targets.append(float(label))
    positive = [t > 0 for t in targets]
    predicted = [s > args.threshold for s in scores]
    bins = calibration_bins(scores, targets, args.bins)
    lines = {
        "count": len(scores),
        "positive": sum(positive),
        "negative": len(scores) - sum(positive),
        "unscored": unscored,
        "auc": roc_auc(scores, positive),
        "accuracy": _mean([float(p == y) for p, y in zip(predicted, positive, strict=True)]),
        "threshold": args.threshold,
        "mse": _mean([(s - t) ** 2 for s, t in zip(scores, targets, strict=True)]),
        "mean_score_positive": _mean([s for s, y in zip(scores, positive, strict=True) if y]),
        "mean_score_negative": _mean([s for s, y in zip(scores, positive, strict=True) if not y]),
    }
    response_scores = [response_score(out, args.aggregate) for out in scored]
    responses = {
        "count": len(rows),
        "passed": sum(r.passed for r in rows),
        "auc_passed": roc_auc(response_scores, [r.passed for r in rows]),  # aggregate score vs unit tests
    }
    figure = draw_calibration(bins, f"{scorer.name} calibration")
    return {"lines": lines, "responses": responses, "calibration": bins}, figure


def eval_groups(scorer: PrmScorer, args: PrmEvalArgs) -> dict[str, Any]:
    assert args.groups is not None
    groups = load_groups(args.groups)
    items = [(g.prompt, r) for g in groups for r in g.responses]
    wheres = [f"{g.where} samples[{s}]" for g in groups for s in range(len(g.responses))]
    scored = iter(
        score_prepared(scorer, prepare_items(scorer, items, wheres), args.batch_size, "prm best-of-n")
    )
    prm = [[response_score(next(scored), args.aggregate) for _ in g.responses] for g in groups]
    result = best_of_n(prm, [g.passed for g in groups], [g.logprob for g in groups])
    return {"aggregate": args.aggregate, **result}


def eval_prm(args: PrmEvalArgs) -> dict[str, Any]:
    """Evaluate, write OUT/prm_eval.json (+ OUT/calibration.png with --data), return the summary."""
    if args.model is None:
        raise UserError("--model DIR (the PRM) is required")
    if args.data is None and args.groups is None:
        raise UserError("nothing to evaluate: give --data (labelled JSONL) and/or --groups (best-of-N JSONL)")
    for flag, path in (("--data", args.data), ("--groups", args.groups)):
        if path is not None and not Path(path).is_file():
            raise UserError(f"{flag} {path}: no such file")
    if args.bins < 1 or args.batch_size < 1 or args.max_length < 0:
        raise UserError("--bins and --batch-size must be >= 1, --max-length >= 0")
    scorer = PrmScorer(Path(args.model), args.device, args.dtype, args.threads, args.max_length)
    try:
        summary: dict[str, Any] = {"model": str(args.model), "labelled": None, "best_of_n": None}
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        if args.data is not None:
            summary["labelled"], figure = eval_labelled(scorer, args)
            write_png(out / "calibration.png", figure)
            summary["labelled"]["calibration_png"] = str(out / "calibration.png")
        if args.groups is not None:
            summary["best_of_n"] = eval_groups(scorer, args)
    finally:
        scorer.thread.shutdown()
    (out / "prm_eval.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def main(argv: Sequence[str] | None = None) -> None:
    """`python -m trainer.prm_eval --flags`."""
    from trainer.cli_prm import run_prm_eval

    try:
        run_prm_eval(argv)
    except UserError as exc:  # one line, as `psgpo` prints it
        print(f"psgpo: error: {exc}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
