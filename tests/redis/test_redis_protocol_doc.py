"""The redis-py-only external trainer in docs/redis.md, run against this code base's producers and
weight followers: the documented protocol and the implementation agree."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import redis

from psgpo.v1.rollout_pb2 import Trajectory
from services.common import keys
from services.common.streams import add_trajectory, backlog
from services.common.weights import PolicyFollower

DOC = Path(__file__).resolve().parents[2] / "docs" / "redis.md"


def external_trainer() -> dict[str, Any]:
    section = DOC.read_text().split("## External trainer (redis-py only)", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S)
    assert code is not None, "no python block in the External trainer section"
    namespace: dict[str, Any] = {}
    exec(compile(code.group(1), str(DOC), "exec"), namespace)
    return namespace


def test_the_documented_trainer_consumes_dedups_and_publishes(r: redis.Redis, tmp_path: Path) -> None:
    trainer = external_trainer()
    run = trainer["RUN"]
    k = keys.run_keys(run)
    for i in range(3):
        add_trajectory(r, run, Trajectory(trajectory_id=f"t{i}:0", task_id=f"t{i}", policy_version=1))
    r.xadd(k.trajectories, {"pb": b"\x0a\xff garbage"})

    batch = trainer["read_batch"](r, count=10, block_ms=100)
    assert [t.trajectory_id for _, t in batch] == ["t0:0", "t1:0", "t2:0"]
    trainer["ack"](r, batch)
    (dead,) = [fields for _, fields in r.xrange(k.dead)]
    assert dead[b"stream"] == k.trajectories.encode() and dead[b"reason"]
    r.xadd(k.trajectories, {"pb": Trajectory(schema_version=1, trajectory_id="t0:0").SerializeToString()})
    assert trainer["read_batch"](r, count=10, block_ms=100) == []  # duplicate of an acked id
    assert backlog(r, k.trajectories, keys.TRAJECTORIES_GROUP).unconsumed == 0

    torch = pytest.importorskip("torch", reason="the weights half builds tensors: install the ml extra")
    from safetensors.torch import save_file

    blob = tmp_path / "policy-v1.safetensors"
    save_file({"w": torch.arange(6.0)}, str(blob))
    policy = trainer["publish_weights"](r, 1, blob)
    update = PolicyFollower(r, run, tmp_path / "cache").update()
    assert update is not None and update.policy == policy
    assert torch.equal(update.state_dict()["w"], torch.arange(6.0))
    with pytest.raises(ValueError, match="refused: current is 1"):
        trainer["publish_weights"](r, 1, blob)
