"""The trainer's flags come from the arguments dataclasses: every field a flag with its docstring."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
from typer.testing import CliRunner

from trainer.cli_train import dataclass_parser, field_docs, parse_dataclass, train_app


def test_every_field_is_documented_and_parsed():
    from trainer.ppo import PPOArgs
    from trainer.sft import SFTArgs

    for cls in (PPOArgs, SFTArgs):
        docs = field_docs(cls)
        missing = [f.name for f in dataclasses.fields(cls) if not docs.get(f.name)]
        assert not missing, f"{cls.__name__} fields without a docstring: {missing}"
        defaults = parse_dataclass(cls, [], "x")
        assert defaults == cls()  # no flag: the dataclass defaults


def test_flag_kinds():
    from trainer.ppo import PPOArgs

    args = parse_dataclass(PPOArgs, [
        "--policy", "/p", "--reward", "rltf", "--dense-prm", "--no-whiten-advantages", "--prm-clip", "1.5",
        "--value-clip", "none", "--kl-estimator", "k3", "--steps", "7", "--run-name", "r1", "--lr", "2e-6",
    ], "x")  # fmt: skip
    assert args.policy == Path("/p") and args.reward == "rltf" and args.dense_prm is True
    assert args.whiten_advantages is False and args.prm_clip == 1.5 and args.value_clip is None
    assert args.kl_estimator == "k3" and args.steps == 7 and args.run == "r1" and args.lr == 2e-6
    cfg = args.reward_config()  # rltf preset with the dense reward switched back on: an ablation
    assert cfg.use_prm_dense and cfg.prm_clip == 1.5 and cfg.kl_estimator == "k3"
    assert args.critic_init() == "policy" and PPOArgs(reward="psgpo").critic_init() == "prm"
    assert parse_dataclass(PPOArgs, ["--run", "r2"], "x").run == "r2"
    assert parse_dataclass(PPOArgs, [], "x").dense_prm is None  # unset: the preset decides
    with pytest.raises(SystemExit):
        parse_dataclass(PPOArgs, ["--reward", "dense"], "x")
    with pytest.raises(SystemExit):
        parse_dataclass(PPOArgs, ["--steps", "many"], "x")
    assert "Dense PRM line rewards on/off" in dataclass_parser(PPOArgs, "x").format_help()


def test_typer_sub_app_passes_flags_through():
    runner = CliRunner()
    result = runner.invoke(train_app, ["ppo", "--help"])
    assert result.exit_code == 0 and "--value-init" in result.output and "--lambda-failed" in result.output
    result = runner.invoke(train_app, ["sft", "--help"])
    assert result.exit_code == 0 and "--max-length" in result.output


def test_docs_list_every_flag():
    from trainer.ppo import PPOArgs
    from trainer.sft import SFTArgs

    text = (Path(__file__).resolve().parents[2] / "docs" / "trainer.md").read_text()
    for cls in (PPOArgs, SFTArgs):
        for f in dataclasses.fields(cls):
            assert f"`--{f.name.replace('_', '-')}" in text, f"docs/trainer.md does not list --{f.name}"
