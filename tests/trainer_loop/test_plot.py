"""`psgpo plot`: a valid PNG with one panel per numeric metric, drawn without a plotting library."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from typer.testing import CliRunner

from services.common.errors import UserError
from tests.pngs import decode_png


def write_metrics(run: Path) -> None:
    run.mkdir(parents=True, exist_ok=True)
    rows = [
        {"step": s, "time": 1e9 + s, "reward/total": math.sin(s / 3), "kl": 0.01 * s, "flag": s % 2 == 0,
         "published_version": s if s % 2 else None, "pass_rate": float("nan") if s == 4 else s / 20}
        for s in range(1, 21)
    ]  # fmt: skip
    (run / "metrics.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))


def test_plot_writes_one_panel_per_numeric_metric(tmp_path):
    from trainer.plot import PANEL_H, PANEL_W, plot_run

    write_metrics(tmp_path / "run")
    path = plot_run(tmp_path / "run", columns=2)
    pixels = decode_png(path)
    # reward/total, kl, published_version, pass_rate (time, step and booleans are not plotted)
    assert pixels.shape == (2 * PANEL_H, 2 * PANEL_W, 3)
    blue = (pixels[..., 2] > 150) & (pixels[..., 0] < 80)
    for r in range(2):
        for c in range(2):
            panel = blue[r * PANEL_H : (r + 1) * PANEL_H, c * PANEL_W : (c + 1) * PANEL_W]
            assert panel.sum() > 100, f"panel {r},{c} has no curve"


def test_plot_cli_and_errors(tmp_path):
    import typer

    from trainer.cli_train import plot
    from trainer.plot import plot_run

    write_metrics(tmp_path / "run")
    app = typer.Typer()
    app.command("plot")(plot)
    app.command("other")(lambda: None)  # a group, as in services/cli.py
    result = CliRunner().invoke(
        app, ["plot", str(tmp_path / "run"), "--keys", "kl", "--out", str(tmp_path / "kl.png")]
    )
    assert result.exit_code == 0, result.output
    assert decode_png(tmp_path / "kl.png").shape[:2] == (220, 3 * 360)
    with pytest.raises(UserError, match="no metric named nope"):
        plot_run(tmp_path / "run", keys=["nope"])
    with pytest.raises(UserError, match="does not exist"):
        plot_run(tmp_path / "missing")
