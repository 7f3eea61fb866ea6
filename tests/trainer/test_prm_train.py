"""PRM training: learns a learnable labelling, saves a PRM the service and the critic load, trains on exactly
the tokens the service reads scores from, and refuses bad input with one line."""

from __future__ import annotations

import json
import os
import random
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from services.common.errors import UserError
from services.common.lines import split_lines

MARKER = "oops"  # a line holding it is labelled -1: learnable from the line-end token alone


def labelled_row(task_id: str, prompt: str, body: list[str], **extra: Any) -> dict[str, Any]:
    """One row in the labeller's format; lines containing MARKER get -1, neutral lines null."""
    response = "\n".join(body) + "\n"
    lines = split_lines(response)
    labels = [None if ln.neutral else (-1 if MARKER in response[ln.start : ln.end] else 1) for ln in lines]
    first_bad = next((m for m, y in enumerate(labels) if y == -1), None)
    row = {"task_id": task_id, "prompt": prompt, "response": response, "checkpoint": "tiny",
           "passed": first_bad is None, "line_spans": [[ln.start, ln.end] for ln in lines], "labels": labels,
           "first_bad_line": first_bad, "probes": [], "strategy_tags": ["full"]}  # fmt: skip
    return row | extra


def marker_rows(n_tasks: int, per_task: int = 3, seed: int = 0, prefix: str = "t") -> list[dict[str, Any]]:
    """Small programs of `v_k = v_{k-1} + c` lines (some c = MARKER), comments sprinkled in."""
    rng = random.Random(seed)
    rows = []
    for t in range(n_tasks):
        for _ in range(per_task):
            body, var = [], "x"
            for k in range(rng.randint(3, 5)):
                body.append(f"    v{k} = {var} + {MARKER if rng.random() < 0.35 else rng.randint(1, 9)}")
                if rng.random() < 0.2:
                    body.append("    # next")
                var = f"v{k}"
            body.append(f"    return {var}")
            rows.append(labelled_row(f"{prefix}{t}", f"def f{t}(x):\n", body))
    return rows


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def train_marker_prm(start: Path, tmp: Path, seed: int = 0) -> dict[str, Any]:
    """Train on the marker task through the CLI's flag parser (as `psgpo train prm` does)."""
    from trainer.cli_prm import run_prm_train

    data = write_jsonl(tmp / "labelled.jsonl", marker_rows(12, seed=seed))
    return run_prm_train(["--data", str(data), "--model", str(start), "--out", str(tmp / "prm"),
                          "--epochs", "8", "--patience", "2", "--lr", "3e-3", "--val-fraction", "0.25",
                          "--seed", str(seed), "--device", "cpu"])  # fmt: skip


@pytest.fixture(scope="module")
def trained(tiny_models: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A PRM trained from the tiny POLICY (a causal LM: fresh score head) on the marker task."""
    return train_marker_prm(tiny_models / "policy", tmp_path_factory.mktemp("prm_train"))


@pytest.fixture(scope="module")
def scorer(trained: dict[str, Any]) -> Iterator[Any]:
    from services.prm.scorer import PrmScorer

    s = PrmScorer(Path(trained["out"]), device="cpu")
    yield s
    s.thread.shutdown()


def test_training_lowers_validation_loss_and_keeps_the_best_epoch(trained: dict[str, Any]):
    out = Path(trained["out"])
    assert trained["best_val_loss"] < 0.2 * trained["initial_val_loss"], trained
    assert not set(trained["train_task_ids"]) & set(trained["val_task_ids"])
    assert len(trained["val_task_ids"]) == 3  # 25% of 12 tasks
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == list(range(trained["epochs_run"] + 1))  # epoch 0: before training
    best = min(rows[1:], key=lambda r: r["val_loss"])
    assert best["epoch"] == trained["best_epoch"] and best["val_loss"] == trained["best_val_loss"]
    assert all(r["best"] == (r["val_loss"] == min(x["val_loss"] for x in rows[1 : i + 1]))
               for i, r in enumerate(rows) if i)  # fmt: skip
    assert json.loads((out / "prm_train.json").read_text())["best_epoch"] == trained["best_epoch"]


def test_saved_prm_loads_as_service_scorer_and_critic(trained: dict[str, Any], scorer: Any):
    from services.prm.scorer import check_prm_dir
    from trainer.modeling import load_token_classifier

    out = Path(trained["out"])
    config = check_prm_dir(out)
    assert config["architectures"] == ["Qwen2ForTokenClassification"]
    critic = load_token_classifier(out, device=__import__("torch").device("cpu"))  # every weight present
    assert critic.config.num_labels == 1
    row = labelled_row(
        "x", "def g(x):\n", ["    a = x + 2", "    # c", f"    b = a + {MARKER}", "    return b"]
    )
    (item,) = scorer.prepare([(row["prompt"], row["response"])])
    (scored,) = scorer.forward_on_model_thread([item])
    for label, score in zip(row["labels"], scored.line_scores, strict=True):
        assert (score is None) == (label is None)
        if label is not None:
            assert score * label > 0.5, (row["labels"], scored.line_scores)


def test_training_reads_the_tokens_the_service_scores(trained: dict[str, Any], scorer: Any):
    """The validation MSE computed from the service scorer's line scores equals the trainer's best val loss:
    the trainer put each label on the very token the service reads that line's score from."""
    from trainer.prm_train import load_labelled

    rows = load_labelled(Path(trained["out"]).parent / "labelled.jsonl")
    val = [r for r in rows if r.task_id in set(trained["val_task_ids"])]
    scored = scorer.forward_on_model_thread(scorer.prepare([(r.prompt, r.response) for r in val]))
    errors = [(s - y) ** 2 for r, out in zip(val, scored, strict=True)
              for y, s in zip(r.labels, out.line_scores, strict=True) if y is not None]  # fmt: skip
    assert len(errors) == trained["val_lines"]
    assert sum(errors) / len(errors) == pytest.approx(trained["best_val_loss"], rel=1e-3, abs=1e-6)


def test_line_aligned_tokenizer_is_the_services(tiny_models: Path, tiny_tokenizer: Any):
    from services.prm.scorer import PrmScorer
    from trainer.prm_train import LineAlignedTokenizer

    items = [("def f(x):\n", "    y = x\n\n    # c\n    return y\n"), ("", "x = 1"), ("p = ", ""),
             ("# é\n", "s = 'ünï'  # ok\n\tz = s * 2")]  # fmt: skip
    service = PrmScorer(tiny_models / "prm", device="cpu")
    try:
        assert LineAlignedTokenizer(tiny_tokenizer, service.max_length).prepare(items) == service.prepare(
            items
        )
    finally:
        service.thread.shutdown()


def test_http_server_serves_the_trained_prm(trained: dict[str, Any], scorer: Any):
    from services.common.runner import start_in_thread
    from services.prm.client import PrmHttpClient
    from services.prm.config import PrmSettings
    from services.prm.server import make_factory

    row = labelled_row("x", "def h(x):\n", [f"    a = x + {MARKER}", "", "    b = a + 3", "    return b"])
    running = start_in_thread(make_factory(PrmSettings(model=Path(trained["out"]), http_port=0, grpc_port=0)))
    try:
        with PrmHttpClient(f"http://127.0.0.1:{running.http_port}") as prm:
            (item,) = prm.score([(row["prompt"], row["response"])], aggregate="min")
    finally:
        running.stop()
    (direct,) = scorer.forward_on_model_thread(scorer.prepare([(row["prompt"], row["response"])]))
    assert [ln.score is None for ln in item.lines] == [y is None for y in row["labels"]]
    for line, label, score in zip(item.lines, row["labels"], direct.line_scores, strict=True):
        if label is not None:
            assert line.score == pytest.approx(score, abs=1e-4) and line.score * label > 0.5
    assert item.score == pytest.approx(min(s for s in direct.line_scores if s is not None), abs=1e-4)


def test_split_by_task_is_seeded_and_disjoint():
    from trainer.prm_train import LabelledResponse, split_by_task

    rows = [LabelledResponse(f"t{i % 7}", "", "x", False, [1], f"f:{i}") for i in range(30)]
    train, val = split_by_task(rows, 0.3, seed=5)
    assert {r.task_id for r in train}.isdisjoint({r.task_id for r in val})
    assert len({r.task_id for r in val}) == 2 and len(train) + len(val) == 30
    assert split_by_task(rows, 0.3, seed=5) == (train, val)
    assert split_by_task(rows, 0.0, seed=5) == (rows, [])
    with pytest.raises(UserError, match="2\\+ task_ids"):
        split_by_task(rows[:1], 0.2, seed=0)


def test_tags_filter_rows_and_no_validation_keeps_the_last_epoch(tiny_models: Path, tmp_path: Path):
    from trainer.prm_train import PrmTrainArgs, train_prm

    rows = [
        r | {"strategy_tags": ["revised"] if i % 3 == 0 else ["full"]} for i, r in enumerate(marker_rows(4))
    ]
    data = write_jsonl(tmp_path / "d.jsonl", rows)
    args = PrmTrainArgs(data=data, model=tiny_models / "prm", out=tmp_path / "o", epochs=2, val_fraction=0,
                        tags="revised, other", device="cpu")  # fmt: skip
    summary = train_prm(args)
    assert summary["train_responses"] == 4 and summary["val_responses"] == 0  # rows 0, 3, 6, 9 of 12
    assert summary["best_val_loss"] is None and summary["best_epoch"] == summary["epochs_run"] == 2
    assert (tmp_path / "o" / "model.safetensors").is_file() and (tmp_path / "o" / "tokenizer.json").is_file()
    with pytest.raises(UserError, match="no row carries any of the strategy tags nope"):
        train_prm(PrmTrainArgs(data=data, model=tiny_models / "prm", out=tmp_path / "o", tags="nope"))


def _bad(case: str, tmp: Path) -> Path:
    good = marker_rows(2, per_task=1)
    row = good[0]
    if case == "empty":
        return write_jsonl(tmp / "d.jsonl", [])
    if case == "not json":
        (tmp / "d.jsonl").write_text("{nope\n")
        return tmp / "d.jsonl"
    if case == "all neutral":
        return write_jsonl(tmp / "d.jsonl", [r | {"labels": [None] * len(r["labels"])} for r in good])
    if case == "label 0":
        row["labels"][0] = 0
    if case == "label true":
        row["labels"][0] = True
    if case == "label 0.5":
        row["labels"][0] = 0.5
    if case == "label on neutral":
        row["labels"][-1] = 1
    if case == "span mismatch":
        row["line_spans"][1][1] += 1
    if case == "fewer spans":
        row["line_spans"].pop()
    if case == "missing field":
        del row["labels"]
    return write_jsonl(tmp / "d.jsonl", [row, *good[1:]])


BAD_DATA = {
    "empty": "no rows", "not json": ":1: not JSON", "all neutral": "every label is null",
    "label 0": "labels[0] is 0; expected 1, -1 or null", "label true": "labels[0] is true",
    "label 0.5": "labels[0] is 0.5", "label on neutral": "blank or comment-only line; expected null",
    "span mismatch": ":1: line_spans[1] is", "fewer spans": "split_lines(response) gives",
    "missing field": "missing field(s) labels",
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(BAD_DATA))
def test_bad_data_is_refused_with_one_line(case: str, tmp_path: Path, tiny_models: Path):
    from trainer.prm_train import PrmTrainArgs, train_prm

    args = PrmTrainArgs(
        data=_bad(case, tmp_path), model=tiny_models / "policy", out=tmp_path / "o", device="cpu"
    )
    with pytest.raises(UserError, match=re.escape(BAD_DATA[case])) as info:
        train_prm(args)
    assert "\n" not in str(info.value)


def test_bad_model_dirs_and_long_rows_are_refused(tmp_path: Path, tiny_models: Path):
    from trainer.prm_train import PrmTrainArgs, train_prm

    data = write_jsonl(tmp_path / "d.jsonl", marker_rows(4, per_task=1))
    (tmp_path / "empty").mkdir()
    cases = {tmp_path / "nope": "is not a directory", tmp_path / "empty": "not a Hugging Face model dir"}
    for model, message in cases.items():
        with pytest.raises(UserError, match=message):
            train_prm(PrmTrainArgs(data=data, model=model, out=tmp_path / "o", device="cpu"))
    with pytest.raises(
        UserError, match=r"d.jsonl:\d: \d+ tokens \(prompt \+ response\) exceed .* limit of 8"
    ):
        train_prm(PrmTrainArgs(data=data, model=tiny_models / "prm", out=tmp_path / "o", max_length=8))


def test_cli_errors_are_one_line(tmp_path: Path, tiny_models: Path):
    """`psgpo train prm` and `psgpo eval prm` as a user runs them: exit 2 and one line on stderr."""
    data = write_jsonl(tmp_path / "d.jsonl", marker_rows(2, per_task=1))
    commands = {
        "train": [
            "train",
            "prm",
            "--data",
            str(tmp_path / "missing.jsonl"),
            "--model",
            str(tiny_models / "policy"),
        ],
        "eval": ["eval", "prm", "--model", str(tiny_models / "policy"), "--data", str(data)],  # not a PRM
    }
    messages = {"train": "missing.jsonl: no such file", "eval": "is not a PRM"}
    for name, argv in commands.items():
        proc = subprocess.run([sys.executable, "-m", "services.cli", *argv], capture_output=True, text=True,
                              timeout=120, env={**os.environ, "PYTHONUNBUFFERED": "1"})  # fmt: skip
        lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
        assert proc.returncode == 2 and len(lines) == 1, (name, proc.stderr)
        assert lines[0].startswith("psgpo: error:") and messages[name] in lines[0], (name, proc.stderr)
