"""SFT: loss on solution tokens only, lower after training, a loadable Hugging Face dir out."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from services.common.errors import UserError
from trainer.data import SftPair

PAIRS = [SftPair(f"def f{i}(x):\n", f"    return x + {i}\n") for i in range(6)] + [
    SftPair("# add two numbers\ndef add(a, b):\n", "    return a + b\n")
]


def write_pairs(path: Path, pairs: list[SftPair]) -> Path:
    path.write_text("".join(json.dumps({"prompt": p.prompt, "solution": p.solution}) + "\n" for p in pairs))
    return path


def test_prompt_tokens_carry_no_loss(tiny_tokenizer):
    from trainer.sft import IGNORE, encode_pairs

    (example,) = encode_pairs(PAIRS[:1], tiny_tokenizer, 1024, add_eos=True)
    prompt = tiny_tokenizer(PAIRS[0].prompt, add_special_tokens=False)["input_ids"]
    solution = tiny_tokenizer(PAIRS[0].solution, add_special_tokens=False)["input_ids"]
    assert example.input_ids == prompt + solution + [tiny_tokenizer.eos_token_id]
    assert example.labels == [IGNORE] * len(prompt) + solution + [tiny_tokenizer.eos_token_id]


def test_sft_lowers_the_loss_and_saves_a_model(tiny_models, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from trainer.cli_train import run_sft
    from trainer.plot import plot_run
    from trainer.sft import evaluate_loss

    data = write_pairs(tmp_path / "pairs.jsonl", PAIRS)
    tokenizer = AutoTokenizer.from_pretrained(tiny_models / "policy")
    before = evaluate_loss(AutoModelForCausalLM.from_pretrained(tiny_models / "policy"), tokenizer, PAIRS)
    out = tmp_path / "sft"
    run_sft(["--data", str(data), "--policy", str(tiny_models / "policy"), "--out", str(out), "--epochs", "8",
             "--batch-size", "4", "--lr", "3e-3", "--device", "cpu"])  # fmt: skip
    after = evaluate_loss(
        AutoModelForCausalLM.from_pretrained(out), AutoTokenizer.from_pretrained(out), PAIRS
    )
    assert after < 0.6 * before, (before, after)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows] == list(range(1, 17))  # 2 batches x 8 epochs
    assert plot_run(out).stat().st_size > 0  # the SFT log plots too


def test_sft_refuses_bad_data(tiny_models, tmp_path):
    from trainer.sft import SFTArgs, train_sft

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "x = ", "solution": ""}\n')
    with pytest.raises(UserError, match="bad.jsonl:1"):
        train_sft(SFTArgs(data=bad, policy=tiny_models / "policy", out=tmp_path / "o", device="cpu"))
    long = write_pairs(tmp_path / "long.jsonl", [SftPair("x = 1\n" * 50, "y = 2\n")])
    with pytest.raises(UserError, match="max-length 16"):
        train_sft(
            SFTArgs(data=long, policy=tiny_models / "policy", out=tmp_path / "o", max_length=16, device="cpu")
        )
