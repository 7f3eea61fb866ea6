"""The generated protobuf code is committed, importable as psgpo.v1, and up to date."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_generated_code_is_up_to_date():
    proc = subprocess.run(
        [sys.executable, str(ROOT / "protos" / "generate.py"), "--check"], capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_messages_roundtrip():
    from psgpo.v1 import prm_pb2, rollout_pb2, sandbox_pb2, weights_pb2

    traj = rollout_pb2.Trajectory(
        schema_version=1,
        trajectory_id="t1:0",
        task_id="t1",
        response_token_ids=[1, 2, 3],
        logprobs=[-0.5, -0.1, -2.0],
        verdict=sandbox_pb2.RunResult(status=sandbox_pb2.RUN_STATUS_PASSED, passed=True, tests_total=3),
    )
    again = rollout_pb2.Trajectory.FromString(traj.SerializeToString())
    assert again == traj and again.verdict.passed
    line = prm_pb2.LineScore(line=0)
    assert not line.HasField("score")  # neutral lines carry no score, not 0.0
    assert weights_pb2.PolicyVersion(version=3).version == 3


def test_importing_clients_does_not_import_torch():
    code = (
        "import sys, services.prm.client, services.cli, psgpo.v1.sandbox_pb2;"
        "assert 'torch' not in sys.modules and 'transformers' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
