"""PRM evaluation: AUC with ties against hand-computed values, calibration bins, best-of-N picks, and an
end-to-end evaluation of a trained tiny PRM (JSON summary and a valid PNG)."""

from __future__ import annotations

import itertools
import json
import math
import random
import struct
from pathlib import Path
from typing import Any

import pytest

from services.common.errors import UserError
from tests.trainer.test_prm_train import marker_rows, train_marker_prm, write_jsonl


def pairwise_auc(scores: list[float], positive: list[bool]) -> float:
    """The definition: P(s+ > s-) + P(s+ = s-) / 2 over every (positive, negative) pair."""
    pos = [s for s, p in zip(scores, positive, strict=True) if p]
    neg = [s for s, p in zip(scores, positive, strict=True) if not p]
    wins = sum(1.0 if a > b else 0.5 if a == b else 0.0 for a, b in itertools.product(pos, neg))
    return wins / (len(pos) * len(neg))


def test_auc_by_hand_with_ties():
    from trainer.prm_eval import roc_auc

    # positives 0.9, 0.5, 0.5; negatives 0.5, 0.1. Pairs: 0.9 beats both (2), each 0.5 ties 0.5 (0.5)
    # and beats 0.1 (1): 2 + 2 * 1.5 = 5 of 6.
    assert roc_auc([0.9, 0.5, 0.5, 0.5, 0.1], [True, True, True, False, False]) == pytest.approx(5 / 6)
    assert roc_auc([0.3] * 4, [True, False, True, False]) == 0.5  # all tied: chance
    assert roc_auc([1.0, 2.0, 3.0], [False, True, True]) == 1.0
    assert roc_auc([1.0, 2.0, 3.0], [True, False, False]) == 0.0
    # negatives 0.2, 0.2; positives 0.2, 0.4: pairs 0.5 + 0.5 + 1 + 1 = 3 of 4
    assert roc_auc([0.2, 0.4, 0.2, 0.2], [True, True, False, False]) == 0.75
    assert roc_auc([0.1, 0.2], [True, True]) is None and roc_auc([], []) is None
    rng = random.Random(0)
    for _ in range(20):  # many ties: integer scores from a small range
        scores = [float(rng.randint(0, 4)) for _ in range(30)]
        positive = [rng.random() < 0.4 for _ in scores]
        if 0 < sum(positive) < len(positive):
            assert roc_auc(scores, positive) == pytest.approx(pairwise_auc(scores, positive))


def test_calibration_bins_by_hand():
    from trainer.prm_eval import calibration_bins

    scores = [0.9, -0.8, 0.1, -0.2, 0.7, 0.5]
    targets = [1.0, -1.0, -1.0, 1.0, 1.0, 1.0]
    bins = calibration_bins(scores, targets, 3)  # sorted: -0.8 -0.2 | 0.1 0.5 | 0.7 0.9
    assert [b["count"] for b in bins] == [2, 2, 2]
    assert [b["mean_score"] for b in bins] == pytest.approx([-0.5, 0.3, 0.8])
    assert [b["mean_label"] for b in bins] == pytest.approx([0.0, 0.0, 1.0])
    assert [b["fraction_correct"] for b in bins] == pytest.approx([0.5, 0.5, 1.0])
    assert [b["min_score"] for b in bins] == [-0.8, 0.1, 0.7]
    assert len(calibration_bins(scores, targets, 10)) == 6  # never an empty bin


def test_best_of_n_by_hand():
    from trainer.prm_eval import best_of_n

    prm = [[0.2, 0.9, 0.9], [-0.5, 0.1], [math.nan, 0.3]]
    passed = [[False, True, False], [True, False], [True, True]]
    logprob = [[-1.0, -3.0, -2.0], [None, -1.0], [-0.5, -0.7]]
    result = best_of_n(prm, passed, logprob)
    # group 1: the PRM's top two tie (one passes): 0.5; random 1/3; logprob picks sample 0: 0.
    # group 2: the PRM picks the failure: 0; random 0.5; no logprob for sample 0: left out of that metric.
    # group 3: NaN ranks last, the PRM picks sample 1: 1; random 1; logprob picks sample 0: 1.
    assert result["prm"] == pytest.approx((0.5 + 0 + 1) / 3)
    assert result["random"] == pytest.approx((1 / 3 + 0.5 + 1) / 3)
    assert result["oracle"] == 1.0 and result["groups"] == 3 and result["samples"] == 7
    assert result["logprob_groups"] == 2 and result["logprob"] == pytest.approx(0.5)
    assert result["prm_on_logprob_groups"] == pytest.approx(0.75)
    none = best_of_n([[0.1]], [[False]], [[None]])
    assert none["logprob"] is None and none["prm"] == 0.0


def read_png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR" and data.endswith(b"IEND\xaeB`\x82")
    return struct.unpack(">II", data[16:24])


def groups_of(rows: list[dict[str, Any]], seed: int) -> list[dict[str, Any]]:
    """Best-of-N groups: the samples of each task, with made-up policy logprobs."""
    rng = random.Random(seed)
    by_task: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        by_task.setdefault(row["task_id"], []).append(row)
    groups = []
    for task, rs in by_task.items():
        samples = [
            {"response": r["response"], "passed": r["passed"], "logprob": rng.uniform(-9, 0)} for r in rs
        ]
        groups.append({"task_id": task, "prompt": rs[0]["prompt"], "samples": samples})
    return groups


def test_eval_of_a_trained_prm(tiny_models: Path, tmp_path: Path):
    from trainer.cli_prm import run_prm_eval

    trained = train_marker_prm(tiny_models / "prm", tmp_path, seed=1)  # from an existing PRM dir this time
    held_out = marker_rows(8, per_task=4, seed=7, prefix="held")
    data = write_jsonl(tmp_path / "held.jsonl", held_out)
    groups = write_jsonl(tmp_path / "groups.jsonl", groups_of(held_out, seed=3))
    out = tmp_path / "eval"
    summary = run_prm_eval(["--model", trained["out"], "--data", str(data), "--groups", str(groups),
                            "--out", str(out), "--bins", "5", "--device", "cpu"])  # fmt: skip
    assert json.loads((out / "prm_eval.json").read_text()) == summary
    lines = summary["labelled"]["lines"]
    labels = [y for r in held_out for y in r["labels"] if y is not None]
    assert lines["count"] == len(labels) and lines["negative"] == labels.count(-1)
    assert lines["auc"] > 0.95 and lines["accuracy"] > 0.9, lines
    assert summary["labelled"]["responses"]["auc_passed"] > 0.95
    assert sum(b["count"] for b in summary["labelled"]["calibration"]) == len(labels)
    width, height = read_png_size(out / "calibration.png")
    assert width > 300 and height > 300
    bon = summary["best_of_n"]
    # Passing responses are exactly those without a marked line: a good PRM (min aggregate) finds one
    # whenever the group has one, so it matches pass@N and beats a random pick.
    assert bon["groups"] == 8 and bon["samples"] == 32 and bon["logprob_groups"] == 8
    assert bon["prm"] == bon["oracle"] and bon["prm"] > bon["random"]


def test_eval_refuses_bad_input_with_one_line(tiny_models: Path, tmp_path: Path):
    from trainer.prm_eval import PrmEvalArgs, eval_prm

    data = write_jsonl(tmp_path / "d.jsonl", marker_rows(2, per_task=1))
    bad_groups = write_jsonl(
        tmp_path / "g.jsonl", [{"task_id": "a", "prompt": "", "samples": [{"response": "x"}]}]
    )
    prm = tiny_models / "prm"
    cases = [
        (PrmEvalArgs(model=prm), "nothing to evaluate"),
        (PrmEvalArgs(model=tiny_models / "policy", data=data), "is not a PRM"),
        (PrmEvalArgs(model=tmp_path / "nope", data=data), "does not exist"),
        (PrmEvalArgs(model=prm, data=tmp_path / "missing.jsonl"), "--data .*missing.jsonl: no such file"),
        (PrmEvalArgs(model=prm, groups=bad_groups, out=tmp_path / "o"), r"g.jsonl:1: samples\[0\] must be"),
    ]
    for args, message in cases:
        with pytest.raises(UserError, match=message) as info:
            eval_prm(args)
        assert "\n" not in str(info.value)
