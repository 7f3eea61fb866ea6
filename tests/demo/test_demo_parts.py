"""The demo's pure parts: presets, run commands, aggregation and the honest comparison, the Markdown
table, resumable stages, the buggy-example maker. The whole pipeline runs in tests/e2e/test_demo.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from services.common.errors import UserError
from services.demo.config import FULL, QUICK, VARIANTS, preset
from services.demo.pipeline import Stages
from services.demo.report import aggregate, compare, markdown
from services.demo.runs import PpoRun, trainer_command
from services.demo.showcase import _buggy


def test_presets_and_overrides():
    assert FULL.seeds >= 3 and QUICK.seeds == 1
    cfg = preset(True, steps=3, seeds=None)
    assert cfg.steps == 3 and cfg.seeds == QUICK.seeds
    assert cfg.key() != QUICK.key() and preset(True).key() == QUICK.key()


def _flags(argv: list[str]) -> dict[str, str]:
    return {argv[i][2:]: argv[i + 1] for i in range(5, len(argv), 2)}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_trainer_command_per_variant(tmp_path: Path, variant: str):
    run = PpoRun(variant, 2, tmp_path / "ppo" / f"{variant}-s2", f"demo-x-{variant}-s2")
    argv = trainer_command(
        run, FULL, tmp_path / "sft", tmp_path / "prm", tmp_path / "train.jsonl", "redis://h:1/0"
    )
    assert argv[2:5] == ["services.cli", "train", "ppo"]
    flags = _flags(argv)
    assert flags["reward"] == VARIANTS[variant]["reward"]
    assert flags["value-init"] == VARIANTS[variant]["value_init"]
    assert ("prm-model" in flags) == (VARIANTS[variant]["value_init"] == "prm")
    assert flags["seed"] == "2" and flags["run"] == run.run and flags["steps"] == str(FULL.steps)
    # every variant shares the hyperparameters: only reward / value-init / prm-model / names differ
    base = _flags(trainer_command(PpoRun("rltf", 2, run.out_dir, run.run), FULL, tmp_path / "sft",
                                  tmp_path / "prm", tmp_path / "train.jsonl", "redis://h:1/0"))  # fmt: skip
    differing = {k for k in flags.keys() | base.keys() if flags.get(k) != base.get(k)}
    assert differing <= {"reward", "value-init", "prm-model"}


def test_trainer_command_refuses_prm_init_without_prm(tmp_path: Path):
    with pytest.raises(RuntimeError, match="needs the trained PRM"):
        trainer_command(PpoRun("psgpo", 0, tmp_path, "r"), FULL, tmp_path, None, tmp_path, "redis://h:1/0")


def _run(
    tmp_path: Path, variant: str, seed: int, pass_rates: list[float], ev: float = float("nan")
) -> PpoRun:
    run = PpoRun(variant, seed, tmp_path / f"{variant}-s{seed}", f"r-{variant}-{seed}")
    run.out_dir.mkdir(parents=True)
    rows = [
        {"step": i + 1, "pass_rate": p, "value/explained_variance": ev + i} for i, p in enumerate(pass_rates)
    ]
    (run.out_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return run


def _eval(p: float, short: float, long: float | None) -> dict:
    return {"pass_at_1": p, "pass_at_1_short": short, "pass_at_1_long": long, "problems": 10,
            "problems_long": 2}  # fmt: skip


def test_aggregate_and_compare(tmp_path: Path):
    runs = [_run(tmp_path, v, s, [0.1] * 6 + [0.2 + s * 0.1], ev=-s) for v in VARIANTS for s in range(3)]
    evals = {}
    for s in range(3):
        evals[f"rltf-s{s}"] = _eval(0.30 + 0.01 * s, 0.4, 0.10)
        evals[f"psgpo-s{s}"] = _eval(0.50 + 0.01 * s, 0.6, 0.30 + 0.1 * s)
        evals[f"dense_only-s{s}"] = _eval(0.31 + 0.01 * s, 0.4, None)
        evals[f"value_init_only-s{s}"] = _eval(0.29 + 0.02 * s, 0.4, 0.1)
    variants = aggregate(evals, runs)
    assert variants["rltf"]["pass_at_1"] == pytest.approx(0.31)
    assert variants["rltf"]["pass_at_1_std"] == pytest.approx(0.01)
    assert variants["dense_only"]["pass_at_1_long"] is None  # no value measured: no made-up number
    assert variants["psgpo"]["dense_prm"] and variants["psgpo"]["value_init"] == "prm"
    assert variants["rltf"]["seeds"] == 3 and set(variants["rltf"]["per_seed"]) == {"s0", "s1", "s2"}
    # last five steps: 0.1, 0.1, 0.1, 0.1, 0.2 + seed * 0.1 -> mean over seeds of (0.6 + 0.1 s) / 5
    assert variants["rltf"]["train_pass_rate_last5"] == pytest.approx((0.6 + 0.7 + 0.8) / 15)
    # first five steps' explained variance: -s + (0..4) -> mean over seeds of (2 - s) = 1
    assert variants["psgpo"]["critic_explained_variance_first5"] == pytest.approx(1.0)
    overall = compare(variants, "pass_at_1")
    assert overall["difference"] == pytest.approx(0.20) and "better" in overall["verdict"]
    near = compare(variants, "pass_at_1", name="value_init_only")  # -0.01 +- ~0.013: noise
    assert "no difference" in near["verdict"]
    assert compare(variants, "pass_at_1_long", name="dense_only")["verdict"] == "not measured"


def test_compare_with_one_seed_draws_no_conclusion(tmp_path: Path):
    runs = [_run(tmp_path, v, 0, [0.1]) for v in VARIANTS]
    evals = {f"{v}-s0": _eval(0.9 if v == "psgpo" else 0.1, 0.5, 0.5) for v in VARIANTS}
    c = compare(aggregate(evals, runs), "pass_at_1")
    assert c["difference"] == pytest.approx(0.8) and c["stderr"] is None and "no conclusion" in c["verdict"]


def test_markdown_table(tmp_path: Path):
    runs = [_run(tmp_path, v, 0, [0.25]) for v in VARIANTS]
    evals = {f"{v}-s0": _eval(0.125, 0.25, None) for v in VARIANTS}
    variants = aggregate(evals, runs)
    results = {"config": FULL.to_dict() | {"seeds": 1}, "variants": variants, "sft": _eval(0.5, 0.5, 0.0),
               "comparison": {k: compare(variants, k) for k in ("pass_at_1", "pass_at_1_long")},
               "prm": {"auc": 0.75, "accuracy": 0.5, "best_of_n": {"n": 4, "prm": 0.2, "random": 0.1,
                                                                   "logprob": None}},
               "stages": {"sft": 10.0, "eval": 5.0}, "seconds": 15.0}  # fmt: skip
    text = markdown(results)
    rows = [line for line in text.splitlines() if line.startswith("| ")]
    assert rows[0].startswith("| policy |")
    assert "| SFT (start of every run) | | | 50.0 | 50.0 | 0.0 |" in text
    psgpo = next(r for r in rows if r.startswith("| PSGPO"))
    assert psgpo == "| PSGPO (dense + value init) | ✓ | ✓ | 12.5 | 25.0 | - | 25.0 |"
    assert "line AUC 0.750" in text and "policy likelihood nan" in text
    assert "| total (all stages) | 15 |" in text


def test_stages_resume_and_refuse_other_config(tmp_path: Path):
    calls = []
    stages = Stages(tmp_path, QUICK)
    assert stages.run("a", "stage a", lambda: calls.append(1) or {"x": 1}) == {"x": 1}
    again = Stages(tmp_path, QUICK)  # a rerun on the same dir: stage a is not redone
    assert again.nonce == stages.nonce
    assert again.run("a", "stage a", lambda: calls.append(2) or {"x": 2}) == {"x": 1}
    assert calls == [1] and set(again.seconds()) == {"a"}
    with pytest.raises(UserError, match="another configuration"):
        Stages(tmp_path, preset(True, steps=QUICK.steps + 1))


def test_buggy_example_changes_one_later_line():
    solution = "    total = 0\n    for x in xs:\n        total += x * 3\n    return total\n"
    buggy, number = _buggy(solution)
    old, new = solution.splitlines(), buggy.splitlines()
    assert [i for i in range(len(old)) if old[i] != new[i]] == [number] and number >= len(old) // 2
    assert _buggy("    return x\n") is None


def test_not_enough_disk_is_one_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """A full disk cannot be made here safely: the free space `shutil.disk_usage` reports is replaced."""
    import shutil

    from services.demo import pipeline

    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(pipeline.shutil, "disk_usage", lambda _: usage._replace(free=100 * 2**20))
    with pytest.raises(UserError, match=r"only 100 MiB free on the disk of .*: the demo needs about \d+ MiB"):
        pipeline.check_disk(tmp_path, FULL)
    monkeypatch.setattr(pipeline.shutil, "disk_usage", lambda _: usage._replace(free=10 * 2**30))
    pipeline.check_disk(tmp_path, FULL)  # 10 GiB: enough


def test_second_demo_on_the_same_out_is_refused(tmp_path: Path):
    """A second `psgpo demo` on an OUT another one is using stops with one line naming the holder."""
    import os

    from services.demo.pipeline import _lock

    first = _lock(tmp_path)
    try:
        with pytest.raises(UserError, match=rf"another psgpo demo \(pid {os.getpid()}\) is running on"):
            _lock(tmp_path)
    finally:
        first.close()
    _lock(tmp_path).close()  # released: the next one gets it
