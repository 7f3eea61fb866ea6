"""The external-trainer snippet in the README runs as shown (against a real Redis)."""

from __future__ import annotations

import re
from pathlib import Path

from psgpo.v1.rollout_pb2 import Trajectory
from psgpo.v1.weights_pb2 import PolicyVersion
from services.common.streams import add_trajectory
from services.common.weights import read_policy

README = Path(__file__).resolve().parents[2] / "README.md"


def snippet() -> str:
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    (block,) = [b for b in blocks if "# 4. publish weights" in b]
    return block


def test_readme_external_trainer_snippet(r, redis_server, tmp_path, capsys):
    run = "myrun"
    add_trajectory(r, run, Trajectory(schema_version=1, trajectory_id="t:0", task_id="t", sample_index=0))
    weights = tmp_path / "policy-v1.safetensors"
    weights.write_bytes(b"weights")
    code = (
        snippet()
        .replace("redis://127.0.0.1:6379/0", redis_server.url)
        .replace("/shared/weights/policy-v1.safetensors", str(weights))
    )
    exec(compile(code, "README.md", "exec"), {})
    assert "t:0" in capsys.readouterr().out
    assert r.xlen(f"psgpo:{run}:tasks") == 1
    assert r.xpending(f"psgpo:{run}:trajectories", "trainer")["pending"] == 0
    assert r.sismember(f"psgpo:{run}:trajectories:acked", "t:0")
    policy = read_policy(r, run)
    assert isinstance(policy, PolicyVersion) and policy.version == 1 and policy.size == len(b"weights")
