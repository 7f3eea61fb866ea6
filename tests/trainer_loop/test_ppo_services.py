"""PPO end to end: real Redis, a real rollout worker (hf backend), real PRM and sandbox servers over gRPC,
the tiny models; both reward presets. Also: the critic initialisations."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from psgpo.v1.rollout_pb2 import Trajectory
from services.common import keys
from services.common.runner import Running, start_in_thread
from services.common.weights import read_policy
from services.prm.config import PrmSettings
from services.prm.server import make_factory as prm_factory
from services.sandbox.config import SandboxSettings
from services.sandbox.server import make_factory as sandbox_factory
from tests.trainer_loop.helpers import ppo_args, read_jsonl, rollout_worker, trained_ids


@pytest.fixture(scope="module")
def services(tiny_models: Path) -> Iterator[tuple[Running, Running]]:
    prm = start_in_thread(prm_factory(PrmSettings(model=tiny_models / "prm", http_port=0, grpc_port=0)))
    sandbox = start_in_thread(sandbox_factory(SandboxSettings(http_port=0, grpc_port=0, workers=2)))
    yield prm, sandbox
    prm.stop()
    sandbox.stop()


def stream_trajectories(r, run: str) -> list[Trajectory]:
    rows = r.xrange(keys.run_keys(run).trajectories)
    return [Trajectory.FromString(fields[b"pb"]) for _, fields in rows]


@pytest.mark.parametrize("reward", ["rltf", "psgpo"])
def test_ppo_steps_through_the_services(reward, r, redis_server, services, tiny_models, tmp_path):
    from trainer.ppo import train

    prm, sandbox = services
    run, out = f"loop-{reward}", tmp_path / "out"
    args = ppo_args(tiny_models, redis_server.url, run, out, reward=reward, steps=3, max_staleness=4)
    before = load_file(str(tiny_models / "policy" / "model.safetensors"))
    with rollout_worker(redis_server.url, run, tiny_models / "policy", prm, sandbox, tmp_path / "cache"):
        result = train(args)

    # the policy (and its published weights) changed
    after = {k: v for k, v in result.policy.state_dict().items() if k in before}
    assert max(float((after[k] - before[k]).abs().max()) for k in before) > 1e-4
    published = read_policy(r, run)
    assert published is not None and published.version == 3 == result.state.policy_version
    blob = load_file(published.uri.removeprefix("file://"))
    assert torch.equal(blob["model.embed_tokens.weight"], after["model.embed_tokens.weight"])

    rows = read_jsonl(out / "metrics.jsonl")
    assert [row["step"] for row in rows] == [1, 2, 3]
    assert [row["published_version"] for row in rows] == [1, 2, 3]
    first = rows[0]
    # step 1 trains the sampling policy itself: the trainer's logprobs are the worker's (same tokens,
    # same layout), so the ratios start at 1 and the KL to the reference at 0
    assert first["policy_drift_kl"] < 1e-5 and abs(first["kl"]) < 1e-4
    for row in rows:
        assert row["trajectories"] == 8 and row["skipped/total"] == 0
        assert 0.0 <= row["pass_rate"] <= 1.0 and row["entropy"] > 0 and row["epochs_run"] == 2
        assert row["reward/unit_test"] == pytest.approx(row["pass_rate"])  # pass 1, fail 0

    # the worker picked the new versions up: trajectories from policy >= 1 reached the trainer
    versions = [v for row in read_jsonl(out / "trained_ids.jsonl") for v in row["versions"]]
    assert max(versions) >= 1
    ids = trained_ids(out)
    assert len(ids) == len(set(ids)) == 24
    assert set(ids) <= {m.decode() for m in r.smembers(keys.run_keys(run).trajectories_acked)}

    streamed = [t for t in stream_trajectories(r, run) if t.trajectory_id in set(ids)]
    if reward == "psgpo":  # dense PRM rewards: tasks asked for PRM scores and the rewards used them
        assert all(t.has_prm_scores for t in streamed)
        assert any(abs(row["reward/prm"]) > 0 for row in rows)
    else:  # the baseline: no PRM scoring, no PRM reward
        assert not any(t.has_prm_scores for t in streamed)
        assert all(row["reward/prm"] == 0 for row in rows)

    ckpt = out / "checkpoints" / (out / "checkpoints" / "latest").read_text().strip()
    assert ckpt.name == "step-00000003" and (out / "policy" / "config.json").is_file()
    # the checkpoint's critic is in the PRM format: it can start another run's critic
    from trainer.ppo import PPOArgs, build_critic

    again = build_critic(PPOArgs(policy=ckpt / "policy", prm_model=ckpt / "critic"), torch.device("cpu"))
    trained = result.critic.state_dict()
    assert all(torch.equal(v, trained[k]) for k, v in again.state_dict().items())


def test_prm_initialised_critic_is_exactly_the_prm(tiny_models):
    from trainer.ppo import PPOArgs, build_critic

    critic = build_critic(
        PPOArgs(policy=tiny_models / "policy", prm_model=tiny_models / "prm"), torch.device("cpu")
    )
    prm = load_file(str(tiny_models / "prm" / "model.safetensors"))
    state = critic.state_dict()
    assert set(state) == set(prm)
    for name, tensor in prm.items():
        assert torch.equal(state[name], tensor), name


def test_policy_initialised_critic_has_the_policy_backbone(tiny_models):
    from trainer.ppo import PPOArgs, build_critic

    args = PPOArgs(policy=tiny_models / "policy", reward="rltf")  # auto -> policy init
    critic = build_critic(args, torch.device("cpu"))
    policy = load_file(str(tiny_models / "policy" / "model.safetensors"))
    state = critic.state_dict()
    backbone = [k for k in policy if k.startswith("model.")]
    assert backbone and all(torch.equal(state[k], policy[k]) for k in backbone)
    assert state["score.weight"].shape == (1, policy["model.embed_tokens.weight"].shape[1])


def test_random_critic_is_seeded_and_fresh(tiny_models):
    from trainer.ppo import PPOArgs, build_critic

    args = PPOArgs(policy=tiny_models / "policy", value_init="random", seed=3)
    a, b = build_critic(args, torch.device("cpu")), build_critic(args, torch.device("cpu"))
    policy = load_file(str(tiny_models / "policy" / "model.safetensors"))
    assert all(torch.equal(v, b.state_dict()[k]) for k, v in a.state_dict().items())  # seeded
    assert not torch.equal(a.state_dict()["model.embed_tokens.weight"], policy["model.embed_tokens.weight"])
