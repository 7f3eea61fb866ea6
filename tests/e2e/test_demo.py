"""`psgpo demo` as a user runs it (a child process), in a still smaller configuration than --quick (2 PPO
steps, 1 SFT epoch), so the main job cannot silently break: every stage runs on the real stack. The first
start is interrupted with Ctrl-C (SIGINT to the whole process group, as a terminal sends it) while the
RLTF runs train; the same command then resumes and finishes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from services.demo.config import VARIANTS

STAGES = {"tasks", "models", "sft", "sandbox_checks", "ppo_rltf", "sample", "label", "prm_train", "prm_eval",
          "prm_lines", "ppo_prm", "eval", "services_up"}  # fmt: skip


def _argv(out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "services.cli", "demo", "--quick", "--steps", "2", "--sft-epochs", "1",
            "--out", str(out), *extra]  # fmt: skip


def _demo(out: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(_argv(out, *extra), capture_output=True, text=True, timeout=900)


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def _interrupt_during_rltf(out: Path, tmp_path: Path) -> None:
    """Start the demo, Ctrl-C it once the RLTF runs train: exit 130, one line, no process left behind."""
    log = tmp_path / "first.log"
    with open(log, "w") as f:
        proc = subprocess.Popen(
            _argv(out), stdout=f, stderr=subprocess.PIPE, text=True, start_new_session=True
        )
    deadline = time.monotonic() + 600
    while "RLTF baseline runs" not in log.read_text() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.5)
    assert proc.poll() is None, log.read_text()[-3000:]
    time.sleep(8)  # the trainer and the worker are up and stepping
    os.killpg(proc.pid, signal.SIGINT)
    _, err = proc.communicate(timeout=90)
    assert proc.returncode == 130, log.read_text()[-2000:] + err
    said = [line for line in err.splitlines() if line.startswith("psgpo")]
    assert said == [f"psgpo demo: interrupted; rerun the same command to resume ({out})"], err[-2000:]
    assert "Traceback" not in err
    for _ in range(50):  # Redis, services, workers, trainers: all stopped with the demo
        if not _group_alive(proc.pid):
            break
        time.sleep(0.2)
    assert not _group_alive(proc.pid), "processes of the interrupted demo are still running"
    state = json.loads((out / "demo_state.json").read_text())
    assert {"tasks", "models", "sft"} <= set(state["stages"]) and "ppo_rltf" not in state["stages"]


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_demo_smallest_configuration_interrupted_then_resumed(tmp_path: Path):
    out = tmp_path / "demo"
    _interrupt_during_rltf(out, tmp_path)
    proc = _demo(out)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for stage in ("miniature benchmark tasks", "SFT of the tiny policy"):  # not redone after Ctrl-C
        assert f"= {stage}: done earlier" in proc.stdout
    result = json.loads((out / "results.json").read_text())
    assert set(result["stages"]) == STAGES
    verdicts = {p["program"]: p["verdict"]["status"] for p in result["programs"]}
    assert verdicts["sum_squares: correct"] == "passed"
    assert verdicts["sum_squares: bug on line 3"] == "failed"
    assert verdicts["fizz: sys.exit(0) to fake a pass"] != "passed"
    assert verdicts["fizz: rigged __eq__"] != "passed"
    assert verdicts["infinite loop"] == "timeout"

    assert set(result["variants"]) == set(VARIANTS)
    for name, row in result["variants"].items():
        assert row["seeds"] == 1 and set(row["per_seed"]) == {"s0"}, name
        assert 0.0 <= row["pass_at_1"] <= 1.0
        metrics = [
            json.loads(x) for x in (out / "ppo" / f"{name}-s0" / "metrics.jsonl").read_text().splitlines()
        ]
        assert [m["step"] for m in metrics] == [1, 2]
        assert metrics[-1]["policy_version"] >= 1  # the worker hot-swapped to weights the trainer published
        dense = VARIANTS[name]["reward"] == "psgpo"
        assert any(m["reward/prm"] != 0 for m in metrics) == dense, name  # PRM scores reach dense runs only
        assert (out / "ppo" / f"{name}-s0" / "policy" / "config.json").is_file()
    assert result["sft"]["problems"] == 59 and result["sft"]["problems_long"] >= 1
    assert result["comparison"]["pass_at_1"]["verdict"].startswith("one seed")
    assert "auc" in result["prm"] and result["prm"]["lines"] > 0
    for name in ("learning_curves", "prm_calibration", "prm_lines"):
        assert (out / result["plots"][name]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = (out / "results.md").read_text()
    assert "| PSGPO (dense + value init) | ✓ | ✓ |" in table and "| RLTF (unit tests only) |" in table
    assert "| policy |" in proc.stdout  # the table is printed

    # The same command again resumes: every stage is reused, the results are the same.
    again = _demo(out)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert again.stdout.count("done earlier") == len(STAGES) - 1  # services_up is not a stage
    second = json.loads((out / "results.json").read_text())
    assert second["variants"] == result["variants"] and second["prm"] == result["prm"]

    # Another configuration on the same dir is refused in one line, nothing touched.
    other = _demo(out, "--seeds", "2")
    assert other.returncode == 2 and "another configuration" in other.stderr
    assert len(other.stderr.strip().splitlines()) == 1
