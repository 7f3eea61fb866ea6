"""The per-step logs: JSONL lines, Prometheus gauges, and the cut back to a checkpoint on resume."""

from __future__ import annotations

import json
import socket

import httpx

from psgpo.v1.rollout_pb2 import Trajectory


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_metrics_go_to_jsonl_and_prometheus_and_are_cut_back_on_resume(tmp_path):
    from trainer.ppo import MetricsLog, truncate_jsonl

    port = free_port()
    log = MetricsLog(tmp_path, port)
    for step in (1, 2, 3):
        trained = [Trajectory(trajectory_id=f"t{step}:{i}", policy_version=step - 1) for i in range(2)]
        log.write({"step": step, "reward/total": 0.5 * step, "published_version": None}, trained)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [row["reward/total"] for row in rows] == [0.5, 1.0, 1.5]
    ids = [json.loads(line) for line in (tmp_path / "trained_ids.jsonl").read_text().splitlines()]
    assert ids[2] == {"step": 3, "ids": ["t3:0", "t3:1"], "versions": [2, 2]}
    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
    assert "psgpo_trainer_reward_total 1.5" in text and "psgpo_trainer_step 3.0" in text

    truncate_jsonl(tmp_path / "metrics.jsonl", 2)  # the checkpoint holds steps 1-2 only
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows] == [1, 2]
