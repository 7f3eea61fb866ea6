"""`psgpo plot`: a valid PNG with one panel per numeric metric, drawn without a plotting library."""

from __future__ import annotations

import json
import math
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from services.common.errors import UserError


def decode_png(path: Path) -> np.ndarray:
    """The RGB pixels of a PNG written by trainer.plot (8-bit RGB, filter 0)."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, chunks = 8, {}
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        kind, body = data[pos + 4 : pos + 8], data[pos + 8 : pos + 8 + length]
        (crc,) = struct.unpack(">I", data[pos + 8 + length : pos + 12 + length])
        assert crc == zlib.crc32(kind + body) & 0xFFFFFFFF
        chunks.setdefault(kind, b"")
        chunks[kind] += body
        pos += 12 + length
    width, height, depth, color = struct.unpack(">IIBB", chunks[b"IHDR"][:10])
    assert (depth, color) == (8, 2) and b"IEND" in chunks
    raw = zlib.decompress(chunks[b"IDAT"])
    assert len(raw) == height * (1 + 3 * width)
    rows = np.frombuffer(raw, dtype=np.uint8).reshape(height, 1 + 3 * width)
    assert (rows[:, 0] == 0).all()
    return rows[:, 1:].reshape(height, width, 3)


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
