"""Every command of the GPU-cluster walkthrough (README.md) parses against the real CLI: the typer
commands through click's own parser, the dataclass-flag commands (train ppo|sft|prm, eval prm, label)
through `parse_dataclass` plus the arguments' own checks. Nothing is run (no GPU, no model here)."""

from __future__ import annotations

import os
import re
import shlex
from pathlib import Path
from typing import Any

import pytest
import typer

from services.cli import app
from trainer.cli_train import parse_dataclass

DOC = Path(__file__).resolve().parents[2] / "README.md"
ENV = {"REDIS": "redis://10.0.0.1:6379/0", "SANDBOX_GRPC": "10.0.0.2:50052", "SANDBOX_HTTP": "http://10.0.0.2:8002",
       "PRM_GRPC": "10.0.0.3:50051"}  # fmt: skip


def _commands() -> list[list[str]]:
    text = DOC.read_text()
    section = text[text.index("### On a GPU cluster with a real model") :]
    block = re.search(r"```bash\n(.*?)```", section, re.S)
    assert block is not None, "the walkthrough's bash block is missing"
    commands = []
    for line in block.group(1).splitlines():
        line = line.split(" #", 1)[0].strip()
        if not line or line.startswith(("#", "pip ")):
            continue
        for name, value in ENV.items():
            line = line.replace(f"${name}", value)
        assert "$" not in line, f"unknown variable in {line!r}"
        commands.append(shlex.split(line))
    return commands


def _dataclass_for(words: list[str]):
    from trainer.label_job import LabelArgs
    from trainer.label_sample import SampleArgs
    from trainer.ppo import PPOArgs
    from trainer.prm_eval import PrmEvalArgs
    from trainer.prm_train import PrmTrainArgs
    from trainer.sft import SFTArgs

    table = {
        ("train", "ppo"): PPOArgs,
        ("train", "sft"): SFTArgs,
        ("train", "prm"): PrmTrainArgs,
        ("eval", "prm"): PrmEvalArgs,
        ("label", "run"): LabelArgs,
        ("label", "sample"): SampleArgs,
    }
    return table.get(tuple(words[:2]))


def test_walkthrough_has_every_stage():
    commands = [" ".join(c[:3]) for c in _commands()]
    stages = ("psgpo train sft", "psgpo serve sandbox", "psgpo serve rollout", "torchrun --nproc-per-node",
              "psgpo label sample", "psgpo label run", "psgpo train prm", "psgpo eval prm", "psgpo serve prm",
              "psgpo eval humaneval")  # fmt: skip
    for needed in stages:
        assert any(c.startswith(needed) for c in commands), needed


@pytest.mark.parametrize("argv", _commands(), ids=lambda a: " ".join(a[:3]))
def test_walkthrough_command_parses(argv: list[str], monkeypatch: pytest.MonkeyPatch):
    for key in list(os.environ):  # the commands must parse on their own, not thanks to this shell's env
        if key.startswith(("ROLLOUT_", "PRM_", "SANDBOX_", "REDIS_")):
            monkeypatch.delenv(key)
    if argv[0] == "torchrun":
        from trainer.ppo import PPOArgs

        rest = argv[argv.index("-m") + 2 :]
        assert argv[argv.index("-m") + 1] == "trainer.ppo"
        parse_dataclass(PPOArgs, rest, "trainer.ppo").check()
        return
    assert argv[0] == "psgpo"
    words = argv[1:]
    cls = _dataclass_for(words)
    if cls is not None:
        args = parse_dataclass(cls, words[2:], f"psgpo {words[0]} {words[1]}")
        if hasattr(args, "check"):
            args.check()
        return
    command: Any = typer.main.get_command(app)
    root = command.make_context("psgpo", list(words), resilient_parsing=False)
    name = "psgpo"
    while hasattr(command, "get_command"):  # a group (typer ships its own click)
        name, *words = words
        command = command.get_command(root, name)
        assert command is not None, f"no command {name!r} in {argv}"
    ctx = command.make_context(name, list(words), parent=root, resilient_parsing=False)
    assert not ctx.args, f"unparsed arguments {ctx.args} in {argv}"
