"""Sharded PPO (`--parallel fsdp`): torchrun starts 2 processes on CPU (gloo); the policy, the critic and
the reference are sharded with FSDP2. Both ranks end with identical (changed) full weights, the
checkpoint holds the full weights and optimizer state in the DDP format, and a second run resumes from it
with the optimizer state restored."""

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


def torchrun(redis_url: str, run: str, tiny: Path, out: Path, dump: Path, steps: int, per_step: int) -> str:
    argv = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
        str(ROOT / "tests" / "trainer_loop" / "ddp_entry.py"), "--parallel", "fsdp",
        "--redis-url", redis_url, "--run-name", run, "--policy", str(tiny / "policy"),
        "--prm-model", str(tiny / "prm"), "--out-dir", str(out), "--task-source", "none",
        "--steps", str(steps), "--trajectories-per-step", str(per_step), "--minibatch-size", "2",
        "--update-epochs", "2", "--max-staleness", "-1", "--lr", "3e-4", "--critic-lr", "3e-4",
        "--batch-timeout-s", "30", "--device", "cpu", "--torch-threads", "1",
    ]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PSGPO_DDP_DUMP": str(dump), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    return done.stdout


def optimizer_steps(checkpoint: Path) -> set[int]:
    saved = torch.load(checkpoint / "optimizers.pt", weights_only=True)
    assert set(saved) == {"policy", "critic"}
    state = saved["policy"]["state"]
    assert all(isinstance(k, int) for k in state)  # numbered as optimizer.state_dict() numbers them
    return {int(v["step"]) for v in state.values()}


def test_fsdp_two_gloo_ranks_full_weights_and_resume(r, redis_server, tiny_models, tmp_path):
    run, out = "fsdp", tmp_path / "out"
    per_step = 8  # 4 per rank, minibatch 2, 2 epochs: 4 optimizer steps per PPO step
    fill_stream(r, run, make_trajectories(tiny_models / "policy", 8, seed=5), 5 * per_step, "f")

    stdout = torchrun(redis_server.url, run, tiny_models, out, tmp_path / "dump1", 3, per_step)
    assert "rank 0 done at step 3" in stdout and "rank 1 done at step 3" in stdout
    initial = load_file(str(tiny_models / "policy" / "model.safetensors"))
    for name in ("policy", "critic"):
        rank0 = load_file(str(tmp_path / "dump1" / f"rank0-{name}.safetensors"))
        rank1 = load_file(str(tmp_path / "dump1" / f"rank1-{name}.safetensors"))
        assert set(rank0) == set(rank1)
        for key in rank0:
            assert torch.equal(rank0[key], rank1[key]), f"{name}.{key} differs between the ranks"
        saved = load_file(str(out / "checkpoints" / "step-00000003" / name / "model.safetensors"))
        for key in saved:  # the checkpoint holds the full, unsharded weights
            assert torch.equal(saved[key], rank0[key]), f"checkpoint {name}.{key} is not the full tensor"
    policy = load_file(str(tmp_path / "dump1" / "rank0-policy.safetensors"))
    assert any(not torch.equal(policy[k], initial[k]) for k in initial)  # and they did train
    final = load_file(str(out / "policy" / "model.safetensors"))
    assert set(final) == set(initial)  # the same format (tied embeddings once) as the initial model
    assert all(torch.equal(final[k], policy[k]) for k in final)
    assert optimizer_steps(out / "checkpoints" / "step-00000003") == {3 * 4}

    stdout = torchrun(redis_server.url, run, tiny_models, out, tmp_path / "dump2", 5, per_step)
    assert "rank 0 done at step 5" in stdout and "rank 1 done at step 5" in stdout
    assert optimizer_steps(out / "checkpoints" / "step-00000005") == {5 * 4}  # Adam state restored
    rank0 = load_file(str(tmp_path / "dump2" / "rank0-policy.safetensors"))
    rank1 = load_file(str(tmp_path / "dump2" / "rank1-policy.safetensors"))
    assert all(torch.equal(rank0[k], rank1[k]) for k in rank0)
    assert any(not torch.equal(rank0[k], policy[k]) for k in initial)  # trained on from step 3

    rows = read_jsonl(out / "metrics.jsonl")
    assert [row["step"] for row in rows] == [1, 2, 3, 4, 5]
    assert all(row["trajectories"] == per_step for row in rows)
    ids = trained_ids(out)
    assert len(ids) == len(set(ids)) == 5 * per_step
    k = keys.run_keys(run)
    assert r.xpending(k.trajectories, keys.TRAJECTORIES_GROUP)["pending"] == 0
