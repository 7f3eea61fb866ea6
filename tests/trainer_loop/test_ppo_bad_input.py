"""Trajectories the trainer must not train on (counted by reason, acknowledged, never a made-up reward),
and critic checkpoints it must refuse with a clear error."""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import pytest
import torch

from psgpo.v1 import rollout_pb2
from services.common import keys
from services.common.errors import UserError
from services.common.streams import add_trajectory
from services.common.weights import WeightPublisher
from tests.trainer_loop.helpers import make_trajectories, ppo_args, read_jsonl, renumber, trained_ids


@pytest.fixture(scope="module")
def samples(tiny_models: Path) -> list[rollout_pb2.Trajectory]:
    return make_trajectories(tiny_models / "policy", 8)


def bad_batch(samples: list[rollout_pb2.Trajectory], good_version: int) -> dict[str, rollout_pb2.Trajectory]:
    """One trajectory per kind of bad input, keyed by the reason the trainer should count."""
    scored = next(t for t in samples if any(not ln.neutral for ln in t.lines))
    out = {}
    nan_logprob = renumber(scored, "nanlogp", policy_version=good_version)
    nan_logprob.logprobs[0] = math.nan
    out["skipped/nonfinite_logprobs"] = nan_logprob
    no_prm = renumber(scored, "noprm", policy_version=good_version, has_prm_scores=False)
    del no_prm.prm_scores[:]
    out["skipped/missing_prm_scores"] = no_prm
    nan_prm = renumber(scored, "nanprm", policy_version=good_version)
    nan_prm.prm_scores[next(i for i, ln in enumerate(scored.lines) if not ln.neutral)] = math.nan
    out["skipped/nonfinite_prm_score"] = nan_prm
    sandbox_down = renumber(scored, "nosandbox", policy_version=good_version)
    sandbox_down.ClearField("verdict")
    sandbox_down.failures.append(rollout_pb2.ScoringFailure(component="sandbox", reason="down", attempts=2))
    out["skipped/sandbox_failure"] = sandbox_down
    task_failure = rollout_pb2.Trajectory(
        schema_version=1, trajectory_id="badtask:0", task_id="badtask", policy_version=good_version,
        failures=[rollout_pb2.ScoringFailure(component="task", reason="task has no tests", attempts=1)],
    )  # fmt: skip
    out["skipped/task_failure"] = task_failure
    out["dropped/stale"] = renumber(scored, "stale", policy_version=good_version - 3)
    return out


def test_bad_trajectories_are_counted_skipped_and_acknowledged(
    samples, r, redis_server, tiny_models, tmp_path
):
    from trainer.ppo import train

    run = "bad"
    # Redis already announces version 5 (an earlier run): the trainer publishes its own weights as 6
    # and measures staleness from there (max_staleness 2: version 3 is dropped).
    WeightPublisher(r, run, tmp_path / "old-weights").publish(5, {"w": torch.zeros(1)})
    bad = bad_batch(samples, good_version=6)
    for traj in bad.values():
        assert add_trajectory(r, run, traj) is not None
    good = [renumber(samples[i], f"good{i}", policy_version=6) for i in range(4)]
    for traj in good:
        assert add_trajectory(r, run, traj) is not None
    out = tmp_path / "out"
    args = ppo_args(
        tiny_models, redis_server.url, run, out, reward="psgpo", steps=1, trajectories_per_step=4,
        task_source="none", max_staleness=2, batch_timeout_s=20,
    )  # fmt: skip
    result = train(args)
    (row,) = read_jsonl(out / "metrics.jsonl")
    for metric in bad:
        assert row[metric] == 1, (metric, row)
    assert row["skipped/total"] == 5 and row["policy_version"] == 6 and row["published_version"] == 7
    assert sorted(trained_ids(out)) == sorted(t.trajectory_id for t in good)
    assert result.state.policy_version == 7
    k = keys.run_keys(run)
    assert r.xpending(k.trajectories, keys.TRAJECTORIES_GROUP)["pending"] == 0  # all acknowledged
    acked = {m.decode() for m in r.smembers(k.trajectories_acked)}
    assert acked == {t.trajectory_id for t in [*bad.values(), *good]}


def test_the_baseline_trains_on_trajectories_without_prm_scores(
    samples, r, redis_server, tiny_models, tmp_path
):
    from trainer.ppo import train

    run = "bad-rltf"
    bad = bad_batch(samples, good_version=0)
    usable_without_prm = [bad["skipped/missing_prm_scores"], bad["skipped/nonfinite_prm_score"]]
    for traj in [*usable_without_prm, bad["skipped/sandbox_failure"], *samples[:2]]:
        assert add_trajectory(r, run, traj) is not None
    out = tmp_path / "out"
    args = ppo_args(
        tiny_models, redis_server.url, run, out, reward="rltf", steps=1, trajectories_per_step=4,
        task_source="none", batch_timeout_s=20,
    )  # fmt: skip
    train(args)
    (row,) = read_jsonl(out / "metrics.jsonl")
    assert row["skipped/total"] == 1 and row["skipped/sandbox_failure"] == 1 and row["reward/prm"] == 0
    assert {t.trajectory_id for t in usable_without_prm} <= set(trained_ids(out))


def test_critic_checkpoints_that_are_not_one_label_token_classifiers_are_refused(tiny_models, tmp_path):
    from transformers import AutoConfig, AutoModelForTokenClassification, AutoTokenizer

    from trainer.ppo import PPOArgs, build_critic

    cpu = torch.device("cpu")
    # a causal LM is not a value head
    with pytest.raises(UserError, match="Qwen2ForCausalLM.*not a token classifier"):
        build_critic(PPOArgs(policy=tiny_models / "policy", prm_model=tiny_models / "policy"), cpu)
    # a token classifier with two labels
    two = tmp_path / "two-labels"
    config = AutoConfig.from_pretrained(tiny_models / "prm", num_labels=2)
    AutoModelForTokenClassification.from_config(config).save_pretrained(two)
    with pytest.raises(UserError, match="num_labels=2"):
        build_critic(PPOArgs(policy=tiny_models / "policy", prm_model=two, value_init="prm"), cpu)
    # not a model dir at all
    with pytest.raises(UserError, match="no config.json"):
        build_critic(PPOArgs(policy=tiny_models / "policy", prm_model=tmp_path), cpu)
    # a PRM over another vocabulary cannot read the policy's tokens
    other = tmp_path / "other-vocab"
    shutil.copytree(tiny_models / "prm", other)
    tokenizer = AutoTokenizer.from_pretrained(other)
    tokenizer.add_tokens(["<only-in-the-prm>"])
    tokenizer.save_pretrained(other)
    with pytest.raises(UserError, match="different tokenizers"):
        build_critic(PPOArgs(policy=tiny_models / "policy", prm_model=other), cpu)


def test_train_refuses_a_bad_critic_before_touching_redis(tiny_models, tmp_path):
    from trainer.ppo import PPOArgs, train

    args = PPOArgs(
        redis_url="redis://127.0.0.1:9/0", policy=tiny_models / "policy", prm_model=tiny_models / "policy",
        out_dir=tmp_path / "out", device="cpu",
    )  # fmt: skip
    with pytest.raises(UserError, match="not a token classifier"):
        train(args)
    with pytest.raises(UserError, match="needs --prm-model"):
        train(PPOArgs(policy=tiny_models / "policy", out_dir=tmp_path / "out2", device="cpu"))
