"""Data-parallel PPO: torchrun starts 2 processes on CPU (gloo); rank 0 reads Redis and broadcasts the
batch, each rank trains on its shard under DDP, and both ranks end with identical (changed) weights."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

from services.common import keys
from tests.trainer_loop.helpers import fill_stream, make_trajectories, read_jsonl, trained_ids

ROOT = Path(__file__).resolve().parents[2]


def test_two_gloo_ranks_end_with_identical_weights(r, redis_server, tiny_models, tmp_path):
    run, out, dump = "ddp", tmp_path / "out", tmp_path / "dump"
    steps, per_step = 3, 8
    fill_stream(r, run, make_trajectories(tiny_models / "policy", 8, seed=5), steps * per_step, "d")
    argv = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
        str(ROOT / "tests" / "trainer_loop" / "ddp_entry.py"),
        "--redis-url", redis_server.url, "--run-name", run, "--policy", str(tiny_models / "policy"),
        "--prm-model", str(tiny_models / "prm"), "--out-dir", str(out), "--task-source", "none",
        "--steps", str(steps), "--trajectories-per-step", str(per_step), "--minibatch-size", "2",
        "--update-epochs", "2", "--max-staleness", "-1", "--lr", "3e-4", "--critic-lr", "3e-4",
        "--batch-timeout-s", "30", "--device", "cpu", "--torch-threads", "1",
    ]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PSGPO_DDP_DUMP": str(dump), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    assert "rank 0 done at step 3" in done.stdout and "rank 1 done at step 3" in done.stdout

    initial = load_file(str(tiny_models / "policy" / "model.safetensors"))
    for name in ("policy", "critic"):
        rank0 = load_file(str(dump / f"rank0-{name}.safetensors"))
        rank1 = load_file(str(dump / f"rank1-{name}.safetensors"))
        assert set(rank0) == set(rank1)
        for key in rank0:
            assert torch.equal(rank0[key], rank1[key]), f"{name}.{key} differs between the ranks"
    policy = load_file(str(dump / "rank0-policy.safetensors"))
    assert any(not torch.equal(policy[k], initial[k]) for k in initial)  # and they did train

    rows = read_jsonl(out / "metrics.jsonl")  # rank 0 logs the whole batch: both shards
    assert [row["step"] for row in rows] == [1, 2, 3] and all(row["trajectories"] == per_step for row in rows)
    ids = trained_ids(out)
    assert len(ids) == len(set(ids)) == steps * per_step
    k = keys.run_keys(run)
    assert r.xpending(k.trajectories, keys.TRAJECTORIES_GROUP)["pending"] == 0
