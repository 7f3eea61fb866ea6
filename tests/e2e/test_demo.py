"""`psgpo demo --quick` as a user runs it (a child process), so the main job cannot silently break."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path


def test_demo_quick(tmp_path: Path, tiny_models: Path):
    out = tmp_path / "demo"
    (out / "models").mkdir(parents=True)
    for name in ("policy", "prm"):  # reuse the session's tiny models (the demo builds them otherwise)
        (out / "models" / name).symlink_to(tiny_models / name)
    proc = subprocess.run(
        [sys.executable, "-m", "services.cli", "demo", "--quick", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads((out / "results.json").read_text())
    verdicts = {p["program"]: p["verdict"]["status"] for p in result["programs"]}
    assert verdicts["sum_squares: correct"] == "passed"
    assert verdicts["sum_squares: bug on line 3"] == "failed"
    assert verdicts["fizz: sys.exit(0) to fake a pass"] != "passed"
    assert verdicts["fizz: rigged __eq__"] != "passed"
    assert verdicts["infinite loop"] == "timeout"
    assert len(result["trajectories"]) == 2 * 4
    for variant in ("rltf", "psgpo"):
        steps = result["ppo"][variant]
        assert [m["step"] for m in steps] == [1, 2]
        assert steps[-1]["policy_version"] >= 1  # the worker hot-swapped to a published version
    assert all(m["reward/prm"] == 0 for m in result["ppo"]["rltf"])
    assert set(result["stages"]) >= {"models", "services_up", "direct_scoring", "rollouts", "ppo"}
