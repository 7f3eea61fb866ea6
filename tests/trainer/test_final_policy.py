"""The trained policy is written aside and renamed into place: a save stopped half way never leaves a
policy dir that a resumed demo (which takes `policy/config.json` for a finished run) would load."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from trainer.checkpoint import save_final_policy
from trainer.modeling import load_policy


def test_the_policy_is_replaced_whole(tiny_models: Path, tmp_path: Path):
    model, tokenizer = load_policy(tiny_models / "policy", torch.device("cpu"))
    target = tmp_path / "run" / "policy"
    target.mkdir(parents=True)
    (target / "stale.txt").write_text("from an earlier run")
    (tmp_path / "run" / ".policy.tmp").mkdir()  # left by a save that was killed
    save_final_policy(target, model, model.state_dict(), tokenizer)
    assert not (target / "stale.txt").exists() and not (tmp_path / "run" / ".policy.tmp").exists()
    loaded, loaded_tokenizer = load_policy(target, torch.device("cpu"))
    assert loaded_tokenizer("def f(x):").input_ids == tokenizer("def f(x):").input_ids
    for name, tensor in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name


def test_a_save_stopped_half_way_leaves_no_policy(tiny_models: Path, tmp_path: Path):
    model, tokenizer = load_policy(tiny_models / "policy", torch.device("cpu"))

    class Interrupted(Exception):
        pass

    class StoppedTokenizer:
        def save_pretrained(self, path: Path) -> None:
            raise Interrupted  # as a Ctrl-C between the weights and the tokenizer files

    target = tmp_path / "policy"
    with pytest.raises(Interrupted):
        save_final_policy(target, model, model.state_dict(), StoppedTokenizer())
    assert not target.exists()  # the weights and config.json went to the side dir only
    assert not (target / "config.json").is_file()
    save_final_policy(target, model, model.state_dict(), tokenizer)  # the resumed run writes it whole
    assert (target / "config.json").is_file() and (target / "tokenizer.json").is_file()
