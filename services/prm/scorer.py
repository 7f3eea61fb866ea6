"""Core PRM scoring (no transport): load a token-classification PRM, tokenize responses line-aligned,
and read every line's score from ONE forward pass.

The causal PRM's output at the last token of line m depends only on tokens up to that line, so it is
the PRM's estimate for the prefix ending at line m (services/common/lines.py explains why scoring the
prefix alone gives the same number).
"""

from __future__ import annotations

import json
import math
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from services.common.errors import InvalidInput, TooLarge, UserError
from services.common.lines import Line, encode_responses, split_lines
from services.common.torch_device import resolve_device


@dataclass(slots=True)
class Prepared:
    """One (prompt, response) ready for the model."""

    input_ids: list[int]  # prompt tokens + line-aligned response tokens
    prompt_len: int
    lines: list[Line]
    token_index: list[int]  # per line, index into the response tokens (-1: none)

    @property
    def num_tokens(self) -> int:
        return len(self.input_ids)


@dataclass(slots=True)
class Scored:
    """Model outputs for one item: per line (None for neutral lines) and at the final token."""

    line_scores: list[float | None]
    last_token_score: float


def line_scores(item: Prepared, values: list[float]) -> Scored:
    """Per-token outputs (T,) of one item -> its line scores: the output at each non-neutral line's
    last token (prompt offset added); None for neutral lines."""
    scores: list[float | None] = []
    for line, tok in zip(item.lines, item.token_index, strict=True):
        if line.neutral or tok < 0:
            scores.append(None)
            continue
        value = values[item.prompt_len + tok]
        scores.append(value if math.isfinite(value) else None)
    return Scored(scores, values[item.num_tokens - 1])


def check_prm_dir(path: Path) -> dict:
    """Fail with one line unless `path` holds a Hugging Face token classifier with one label."""
    if not path.exists():
        raise UserError(f"model dir {path} does not exist")
    if not path.is_dir():
        raise UserError(f"model path {path} is not a directory")
    config_file = path / "config.json"
    if not config_file.is_file():
        raise UserError(f"{path} has no config.json: not a Hugging Face model dir")
    try:
        config = json.loads(config_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"{config_file} is not valid JSON: {exc}") from None
    archs = config.get("architectures") or []
    num_labels = len(config.get("id2label") or {}) or config.get("num_labels", 2)
    if archs and not any(a.endswith("ForTokenClassification") for a in archs):
        raise UserError(
            f"{path} is not a PRM: architectures {archs}; expected a *ForTokenClassification model "
            "with num_labels=1"
        )
    if num_labels != 1:
        raise UserError(f"{path} is not a PRM: num_labels={num_labels}, expected 1")
    return config


def aggregate(scores: list[float | None], how: str) -> float | None:
    values = [s for s in scores if s is not None]
    if not values:
        return None
    if how == "min":
        return min(values)
    if how == "mean":
        return sum(values) / len(values)
    if how == "last":
        return values[-1]
    raise InvalidInput(f"unknown aggregate {how!r}; use min, mean or last")


def _require_text(value: object, where: str) -> str:
    if not isinstance(value, str):
        raise InvalidInput(f"{where} must be a string")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidInput(f"{where} is not valid Unicode (lone surrogate)") from None
    return value


class PrmScorer:
    """Holds the model and tokenizer. Every torch call (load and forward) runs on ONE dedicated
    thread, `self.thread`: a second thread calling into torch starts a second OpenMP team, and on
    a small CPU the two teams fight for cores (measured: ~30% slower forwards). `prepare` only
    tokenizes and may run anywhere."""

    def __init__(
        self,
        model_dir: Path,
        device: str = "auto",
        dtype: str = "auto",
        threads: int = 0,
        max_length: int = 0,
    ) -> None:
        check_prm_dir(model_dir)
        self.thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="prm-model")
        self.thread.submit(self._load, model_dir, device, dtype, threads, max_length).result()

    def _load(self, model_dir: Path, device: str, dtype: str, threads: int, max_length: int) -> None:
        import torch
        from transformers import AutoModelForTokenClassification, AutoTokenizer
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()

        try:
            device, dtype = resolve_device(device, dtype, threads)
        except ValueError as exc:
            raise UserError(str(exc)) from None
        try:
            tokenizer = AutoTokenizer.from_pretrained(model_dir)
            model = AutoModelForTokenClassification.from_pretrained(model_dir, dtype=getattr(torch, dtype))
        except (OSError, ValueError, KeyError) as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise UserError(f"cannot load PRM from {model_dir}: {first}") from None
        if not getattr(tokenizer, "is_fast", False):
            raise UserError(f"{model_dir}: a fast (Rust) tokenizer is required (tokenizer.json)")
        if model.config.num_labels != 1:
            raise UserError(f"{model_dir} is not a PRM: num_labels={model.config.num_labels}, expected 1")
        self.torch = torch
        self.model = model.to(device).eval()
        self.tokenizer = tokenizer
        self.device = device
        self.name = model_dir.name if model_dir.name not in ("", ".") else str(model_dir)
        limit = getattr(model.config, "max_position_embeddings", None) or 1 << 20
        self.max_length = min(max_length, limit) if max_length else limit
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.pad_id = int(pad) if pad is not None else 0
        self.bos = [tokenizer.bos_token_id] if getattr(tokenizer, "add_bos_token", False) else []
        self.parameters = sum(p.numel() for p in model.parameters())
        # No token spans more characters than its longest vocabulary entry has bytes, so a text longer
        # than max_length * that is over the limit for sure: refused before spending time tokenizing it.
        longest = max((len(t) for t in tokenizer.get_vocab()), default=1)
        self.max_chars = self.max_length * max(longest, 1) + 2 * (self.max_length + 1)

    def _encode_batch(self, texts: list[str]) -> list[list[int]]:
        return self.tokenizer(texts, add_special_tokens=False)["input_ids"]

    def prepare(self, items: list[tuple[str, str]]) -> list[Prepared]:
        """Tokenize many items with two batched tokenizer calls; refuse (never truncate) long ones."""
        for i, (prompt, response) in enumerate(items):
            _require_text(prompt, f"items[{i}].prompt")
            _require_text(response, f"items[{i}].response")
            if len(prompt) + len(response) > self.max_chars:
                raise TooLarge(
                    f"items[{i}]: {len(prompt) + len(response)} characters cannot fit the model's limit of "
                    f"{self.max_length} tokens"
                )
        prompts = self._encode_batch([p for p, _ in items]) if items else []
        responses = encode_responses([r for _, r in items], self._encode_batch)
        out: list[Prepared] = []
        for i, ((_, response), p_ids, enc) in enumerate(zip(items, prompts, responses, strict=True)):
            ids = self.bos + p_ids + enc.token_ids
            if not ids:
                raise InvalidInput(f"items[{i}]: prompt and response are both empty")
            if len(ids) > self.max_length:
                raise TooLarge(
                    f"items[{i}]: {len(ids)} tokens (prompt + response) exceed the model's limit of "
                    f"{self.max_length}"
                )
            out.append(Prepared(ids, len(self.bos) + len(p_ids), split_lines(response), enc.token_index))
        return out

    def forward_on_model_thread(self, batch: list[Prepared]) -> list[Scored]:
        """`forward`, from any thread (blocks until the model thread has run it)."""
        return self.thread.submit(self.forward, batch).result()

    def forward(self, batch: list[Prepared]) -> list[Scored]:
        """One padded forward pass over the batch (right padding; causal outputs ignore the pads).
        Call it on `self.thread` (the batcher does)."""
        torch = self.torch
        width = max(item.num_tokens for item in batch)
        ids = torch.full((len(batch), width), self.pad_id, dtype=torch.long)  # (B, T)
        mask = torch.zeros((len(batch), width), dtype=torch.long)  # (B, T)
        for row, item in enumerate(batch):
            ids[row, : item.num_tokens] = torch.tensor(item.input_ids, dtype=torch.long)
            mask[row, : item.num_tokens] = 1
        with torch.inference_mode():
            logits = self.model(input_ids=ids.to(self.device), attention_mask=mask.to(self.device)).logits
        values = logits[..., 0].float().cpu().tolist()  # (B, T)
        return [line_scores(item, row) for item, row in zip(batch, values, strict=True)]
