"""Build tiny models in seconds, offline: a byte-level BPE tokenizer trained on Python source, a
Qwen2 causal LM (the policy) and a Qwen2 token classifier with one label (the PRM).

Both are saved in Hugging Face format (safetensors) and load through the same
`from_pretrained(dir)` path as a user's Qwen2.5-Coder policy or trained PRM checkpoint.
"""

from __future__ import annotations

import json
import sysconfig
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

SPECIAL_TOKENS = ["<|endoftext|>", "<|pad|>"]


@dataclass
class TinyConfig:
    vocab_size: int = 2048
    """BPE vocabulary size (including the byte alphabet and special tokens)."""
    hidden_size: int = 128
    """model width"""
    num_layers: int = 4
    """transformer blocks"""
    num_heads: int = 4
    """attention heads (key/value heads: half of these, as grouped-query attention)"""
    max_positions: int = 2048
    """longest sequence (prompt + response) the models accept, in tokens"""
    corpus_bytes: int = 3_000_000
    """how much Python source to train the tokenizer on"""
    seed: int = 0
    """seed for weight initialisation"""


def python_corpus(max_bytes: int, extra: list[str] | None = None) -> Iterator[str]:
    """Python source from this interpreter's standard library (always on disk, no network)."""
    for text in extra or []:
        yield text
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    total = 0
    for path in sorted(stdlib.glob("*.py")):
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        total += len(text)
        yield text
        if total >= max_bytes:
            return


def train_tokenizer(cfg: TinyConfig, extra_corpus: list[str] | None = None):  # -> PreTrainedTokenizerFast
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=cfg.vocab_size,
        min_frequency=2,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(python_corpus(cfg.corpus_bytes, extra_corpus), trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=SPECIAL_TOKENS[0],
        pad_token=SPECIAL_TOKENS[1],
        model_max_length=cfg.max_positions,
        clean_up_tokenization_spaces=False,
    )


def qwen2_config(cfg: TinyConfig, tokenizer, **extra):  # -> Qwen2Config
    from transformers import Qwen2Config

    return Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.hidden_size * 3,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=max(1, cfg.num_heads // 2),
        max_position_embeddings=cfg.max_positions,
        tie_word_embeddings=True,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=None,
        **extra,
    )


def build_tiny(out: Path, cfg: TinyConfig | None = None, extra_corpus: list[str] | None = None) -> dict:
    """Write out/policy and out/prm (each with the shared tokenizer). Returns a summary."""
    import torch
    from transformers import Qwen2ForCausalLM, Qwen2ForTokenClassification

    cfg = cfg or TinyConfig()
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = train_tokenizer(cfg, extra_corpus)
    torch.manual_seed(cfg.seed)
    policy = Qwen2ForCausalLM(qwen2_config(cfg, tokenizer))
    prm = Qwen2ForTokenClassification(qwen2_config(cfg, tokenizer, num_labels=1))
    # The paper initialises the PRM from the policy: copy the shared backbone, keep a fresh head.
    prm.model.load_state_dict(policy.model.state_dict())
    with torch.no_grad():
        prm.score.weight.normal_(0.0, 0.02)
    summary: dict = {"config": asdict(cfg)}
    for name, model in (("policy", policy), ("prm", prm)):
        path = out / name
        model.save_pretrained(path, safe_serialization=True)
        tokenizer.save_pretrained(path)
        summary[name] = {"path": str(path), "parameters": sum(p.numel() for p in model.parameters())}
    summary["vocab_size"] = len(tokenizer)
    (out / "tiny.json").write_text(json.dumps(summary, indent=2))
    return summary
