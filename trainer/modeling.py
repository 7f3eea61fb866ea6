"""Loading the policy, the frozen reference and the critic (PRM, policy backbone or random init)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from services.common.errors import UserError

if TYPE_CHECKING:
    from trainer.ppo import PPOArgs


# =====================================================================================================
# Models: policy, frozen reference, critic
# =====================================================================================================


def quiet_transformers() -> None:
    """No progress bars or load reports: the critic checks below inspect the loading info themselves."""
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def load_policy(path: Path, device: torch.device) -> tuple[nn.Module, Any]:
    """(causal LM, tokenizer) from a Hugging Face dir, float32, in eval mode.

    Eval mode throughout (also while training) disables dropout: PPO's ratios and values must come
    from the same deterministic network that computed them (TRL's `disable_dropout_in_model`)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not (Path(path) / "config.json").is_file():
        raise UserError(f"{path} is not a Hugging Face model dir (no config.json)")
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    return model.to(device).eval(), tokenizer


def check_critic_checkpoint(path: Path) -> None:
    """Refuse, with one clear line, a critic/PRM dir that is not a token classifier with one label."""
    from transformers import AutoConfig

    if not (Path(path) / "config.json").is_file():
        raise UserError(f"critic checkpoint {path} is not a Hugging Face model dir (no config.json)")
    config = AutoConfig.from_pretrained(path)
    architectures = list(getattr(config, "architectures", None) or [])
    if not any(a.endswith("ForTokenClassification") for a in architectures):
        raise UserError(
            f"critic checkpoint {path} is {architectures or 'of unknown architecture'}, not a token "
            "classifier (AutoModelForTokenClassification with num_labels=1, the PRM format)"
        )
    if config.num_labels != 1:
        raise UserError(
            f"critic checkpoint {path} has num_labels={config.num_labels}; a value head needs exactly 1"
        )


def load_token_classifier(path: Path, device: torch.device) -> nn.Module:
    """A one-label token classifier whose every weight, head included, comes from `path`."""
    from transformers import AutoModelForTokenClassification

    check_critic_checkpoint(path)
    model, info = AutoModelForTokenClassification.from_pretrained(
        path, dtype=torch.float32, output_loading_info=True
    )
    if info["missing_keys"] or info["mismatched_keys"]:
        missing = sorted(info["missing_keys"]) + sorted(str(k) for k in info["mismatched_keys"])
        raise UserError(f"critic checkpoint {path} lacks weights {missing[:5]}: not a trained value head")
    return model.to(device).eval()


def same_vocabulary(policy_dir: Path, other_dir: Path) -> bool:
    from transformers import AutoTokenizer

    try:
        other = AutoTokenizer.from_pretrained(other_dir)
    except (OSError, ValueError):
        return False
    return AutoTokenizer.from_pretrained(policy_dir).get_vocab() == other.get_vocab()


def build_critic(args: PPOArgs, device: torch.device) -> nn.Module:
    """The value network V(s_t): a token classifier with one output per token.

    prm: the PRM checkpoint as is (the paper initialises the value function from the PRM: same
    architecture, same one-output head). policy: the policy's backbone with a fresh linear head.
    random: the policy's architecture, fresh weights (seeded).
    The critic reads the policy's token ids, so a PRM init needs the policy's tokenizer."""
    from transformers import AutoConfig, AutoModelForTokenClassification

    assert args.policy is not None
    init = args.critic_init()
    if init == "prm":
        assert args.prm_model is not None
        check_critic_checkpoint(args.prm_model)
        if not same_vocabulary(args.policy, args.prm_model):
            raise UserError(
                f"the PRM {args.prm_model} and the policy {args.policy} have different tokenizers: the "
                "critic reads the policy's tokens, so --value-init prm needs the same vocabulary "
                "(use --value-init policy; the dense PRM rewards work with any tokenizer)"
            )
        return load_token_classifier(args.prm_model, device)
    if init == "policy":
        model, info = AutoModelForTokenClassification.from_pretrained(
            args.policy, num_labels=1, dtype=torch.float32, output_loading_info=True
        )
        unexpected_missing = [k for k in info["missing_keys"] if not k.startswith(("score.", "classifier."))]
        if unexpected_missing:
            raise UserError(
                f"cannot build a critic on the backbone of {args.policy}: {unexpected_missing[:5]}"
            )
        return model.to(device).eval()
    if init == "random":
        config = AutoConfig.from_pretrained(args.policy, num_labels=1)
        torch.manual_seed(args.seed)
        return AutoModelForTokenClassification.from_config(config).to(device).eval()
    raise UserError(f"unknown --value-init {init!r} (prm, policy or random)")
