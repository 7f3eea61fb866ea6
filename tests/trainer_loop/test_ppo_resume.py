"""Checkpoint and resume: a trainer that dies at any moment restarts from its last checkpoint and the
stream's pending entries, and no trajectory is trained on twice (the trained ids are logged per step)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

from psgpo.v1 import rollout_pb2
from services.common import keys
from tests.trainer_loop.helpers import fill_stream, make_trajectories, ppo_args, read_jsonl, trained_ids

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def samples(tiny_models: Path) -> list[rollout_pb2.Trajectory]:
    return make_trajectories(tiny_models / "policy", 8, seed=3)


def check_exactly_once(r, run: str, out: Path, steps: int, per_step: int) -> None:
    rows = read_jsonl(out / "metrics.jsonl")
    assert [row["step"] for row in rows] == list(range(1, steps + 1))
    ids = trained_ids(out)
    duplicates = [tid for tid, n in Counter(ids).items() if n > 1]
    assert not duplicates, f"trained twice: {duplicates}"
    assert len(ids) == steps * per_step
    k = keys.run_keys(run)
    acked = {m.decode() for m in r.smembers(k.trajectories_acked)}
    assert acked == set(ids)  # everything trained is acknowledged, and nothing else was consumed
    assert r.xpending(k.trajectories, keys.TRAJECTORIES_GROUP)["pending"] == 0


class SimulatedCrash(RuntimeError):
    pass


@pytest.mark.parametrize("moment", ["before_commit", "between_commit_and_ack"])
def test_crash_then_resume_trains_each_trajectory_once(
    moment, samples, r, redis_server, tiny_models, tmp_path, monkeypatch
):
    import trainer.ppo as ppo
    import trainer.source as source  # the trajectory source acknowledges (its module holds ack_deliveries)

    run, out = f"crash-{moment}", tmp_path / "out"
    fill_stream(r, run, samples, 24, "c")
    args = ppo_args(tiny_models, redis_server.url, run, out, steps=4, trajectories_per_step=4,
                    task_source="none", batch_timeout_s=20, update_epochs=1)  # fmt: skip

    real_save, real_ack = ppo.save_checkpoint, source.ack_deliveries

    def save_failing_at_step_2(out_dir, state, *rest, **kw):
        if state.step == 2:
            raise SimulatedCrash("killed while checkpointing step 2")
        return real_save(out_dir, state, *rest, **kw)

    calls = {"ack": 0}

    def ack_failing_the_second_time(consumer, deliveries):
        calls["ack"] += 1
        if calls["ack"] == 2:  # step 2 is checkpointed (committed) but not acknowledged
            raise SimulatedCrash("killed between the checkpoint and the ack of step 2")
        real_ack(consumer, deliveries)

    if moment == "before_commit":
        monkeypatch.setattr(ppo, "save_checkpoint", save_failing_at_step_2)
    else:
        monkeypatch.setattr(source, "ack_deliveries", ack_failing_the_second_time)
    with pytest.raises(SimulatedCrash):
        ppo.train(args)
    monkeypatch.setattr(ppo, "save_checkpoint", real_save)
    monkeypatch.setattr(source, "ack_deliveries", real_ack)

    result = ppo.train(args)
    assert result.resumed_from == (1 if moment == "before_commit" else 2)
    assert result.state.step == 4
    check_exactly_once(r, run, out, steps=4, per_step=4)


def test_sigkilled_trainer_resumes_from_its_checkpoint(samples, r, redis_server, tiny_models, tmp_path):
    run, out = "sigkill", tmp_path / "out"
    steps, per_step = 12, 4
    fill_stream(r, run, samples, steps * per_step + 8, "k")
    argv = [
        sys.executable, "-m", "trainer.ppo", "--redis-url", redis_server.url, "--run", run,
        "--policy", str(tiny_models / "policy"), "--prm-model", str(tiny_models / "prm"),
        "--out-dir", str(out), "--task-source", "none", "--steps", str(steps),
        "--trajectories-per-step", str(per_step), "--minibatch-size", "4", "--checkpoint-every", "2",
        "--max-staleness", "-1", "--lr", "1e-4", "--batch-timeout-s", "30", "--device", "cpu",
        "--torch-threads", "1",
    ]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    victim = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    pointer = out / "checkpoints" / "latest"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and victim.poll() is None:
        if pointer.is_file() and pointer.read_text().strip() >= "step-00000004":
            break
        time.sleep(0.01)
    assert victim.poll() is None, victim.stderr.read().decode() if victim.stderr else ""
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    killed_at = int(pointer.read_text().strip().removeprefix("step-"))
    assert 4 <= killed_at < steps
    logged = len(read_jsonl(out / "metrics.jsonl"))
    assert logged >= killed_at  # the logs may run ahead of the checkpoint: resume cuts them back

    done = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"resumed from {out / 'checkpoints' / f'step-{killed_at:08d}'}" in done.stderr
    assert f"ppo: step {steps}" in done.stdout
    check_exactly_once(r, run, out, steps=steps, per_step=per_step)


def test_sigterm_while_waiting_stops_cleanly(r, redis_server, tiny_models, tmp_path):
    run, out = "sigterm", tmp_path / "out"
    argv = [
        sys.executable, "-m", "trainer.ppo", "--redis-url", redis_server.url, "--run", run,
        "--policy", str(tiny_models / "policy"), "--reward", "rltf", "--out-dir", str(out),
        "--task-source", "builtin:tiny", "--steps", "5", "--batch-timeout-s", "60", "--device", "cpu",
    ]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    trainer = subprocess.Popen(
        argv, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    k = keys.run_keys(run)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and trainer.poll() is None and not r.exists(k.tasks):
        time.sleep(0.05)  # no rollout worker: the trainer enqueues tasks, then waits for trajectories
    time.sleep(2.5)  # a few 1 s reads: the top-up must not add tasks while enough are waiting
    assert trainer.poll() is None
    trainer.send_signal(signal.SIGTERM)
    stdout, stderr = trainer.communicate(timeout=30)
    assert trainer.returncode == 0, stderr[-3000:]
    assert "stopped while waiting for the trajectories of step 1" in stderr
    assert "ppo: step 0" in stdout and (out / "policy" / "config.json").is_file()
    assert r.xlen(k.tasks) == 16  # (32 samples for the step + 32 prefetched) / 4 samples per task
