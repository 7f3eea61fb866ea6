"""The `hf` generation backend: a transformers causal LM, our own batched sampling loop with a KV cache.

All prompts x n samples are sorted by prompt length and generated in chunks of at most
`max_batch_sequences` sequences (left padding, explicit position ids); a sequence leaves the batch
(and the KV cache) as soon as it ends. Owning the loop gives exact per-token logprobs of both the raw
and the processed distribution, and per-sequence random streams: sample j of prompt i depends on
(seed, i, j, prompt, weights) only, not on the chunking, the other prompts or the device (up to float
noise from different padding or kernels). Each step draws one uniform per sequence from a Python
`random.Random` seeded for that sequence and samples by inverse CDF (float64 cumulative sum), which
costs one batched cumsum instead of a per-row random tensor of vocabulary size.

Threading: every torch call runs on ONE dedicated thread. A second thread calling into torch starts
a second OpenMP team that fights the first for cores (measured on the PRM service: ~30% slower
forwards on a small CPU). `generate` and `load_weights` may be called from any thread: they run on the
model thread and block until done; `submit` returns a Future instead.
"""

from __future__ import annotations

import json
import random
import secrets
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from services.common.torch_device import resolve_device
from services.rollout.backend import (
    FinishReason,
    IncompatibleWeights,
    IncrementalDetokenizer,
    ModelThread,
    Sample,
    SamplingConfig,
    WeightsSource,
    check_generate_args,
    find_stop,
    sequence_seed,
)

if TYPE_CHECKING:
    import torch

DETOKENIZER_CONTEXT = 5  # prompt tokens the detokenizer sees before the response (as vLLM)
MAX_LISTED = 5  # names listed in a weights error


class HfBackend(ModelThread):
    """A Hugging Face causal LM dir (config.json, safetensors, fast tokenizer) as a generation backend."""

    def __init__(
        self,
        model_dir: Path | str,
        *,
        device: str = "auto",
        dtype: str = "auto",
        threads: int = 0,
        max_batch_sequences: int = 64,
        max_model_len: int = 0,
        version: int = 0,
    ) -> None:
        """device: "auto" (cuda if present), "cpu", "cuda[:i]"; dtype: "auto" (bfloat16 on GPU,
        float32 on CPU) or a torch dtype name; threads: torch intra-op threads (0 = torch default);
        max_batch_sequences: sequences per forward batch (memory bound); max_model_len: cap on
        prompt + response tokens (0 = the model's max_position_embeddings)."""
        if max_batch_sequences < 1:
            raise ValueError(f"max_batch_sequences must be >= 1, got {max_batch_sequences}")
        self.max_batch_sequences = max_batch_sequences
        self._version = version
        super().__init__("rollout-model")
        try:
            self.run_on_model_thread(self._load, Path(model_dir), device, dtype, threads, max_model_len)
        except BaseException:
            self.shutdown_thread(wait=False)
            raise

    # -- closing ------------------------------------------------------------------------------------

    def close(self) -> None:
        self.shutdown_thread(wait=True)

    # -- loading -------------------------------------------------------------------------------

    def _load(self, model_dir: Path, device: str, dtype: str, threads: int, max_model_len: int) -> None:
        import torch
        from tokenizers import Tokenizer
        from transformers import AutoModelForCausalLM, AutoTokenizer
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        device, dtype = resolve_device(device, dtype, threads)
        if not (model_dir / "config.json").is_file():
            raise ValueError(f"{model_dir} has no config.json: not a Hugging Face model dir")
        try:
            tokenizer = AutoTokenizer.from_pretrained(model_dir)
            model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, dtype))
        except (OSError, ValueError, KeyError, AttributeError) as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ValueError(f"cannot load a causal LM from {model_dir}: {first}") from None
        if not getattr(tokenizer, "is_fast", False):
            raise ValueError(f"{model_dir}: a fast (Rust) tokenizer is required (tokenizer.json)")
        self.torch = torch
        self.model = model.to(device).eval()
        self.device = torch.device(device)
        self._tokenizer = tokenizer
        # A private copy of the Rust tokenizer: nobody reconfigures it (the Python wrapper toggles padding
        # and truncation per call), so encoding and decoding are safe from any thread.
        self._rust = Tokenizer.from_str(tokenizer.backend_tokenizer.to_str())
        self._rust.no_truncation()
        self._rust.no_padding()
        limit = int(getattr(model.config, "max_position_embeddings", 0) or 1 << 30)
        self._max_model_len = min(max_model_len, limit) if max_model_len else limit
        self.bos = [tokenizer.bos_token_id] if getattr(tokenizer, "add_bos_token", False) else []
        eos = model.generation_config.eos_token_id
        eos_ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        if tokenizer.eos_token_id is not None:
            eos_ids.add(tokenizer.eos_token_id)
        self.eos_token_ids = frozenset(int(i) for i in eos_ids)
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.pad_id = int(pad) if pad is not None else 0

    @property
    def version(self) -> int:
        return self._version

    @property
    def tokenizer(self) -> Any:
        return self._tokenizer

    @property
    def max_model_len(self) -> int:
        return self._max_model_len

    def decode(self, ids: list[int]) -> str:
        """Token ids to text as the model wrote it: special tokens kept, no clean-up of spaces."""
        return self._rust.decode(ids, skip_special_tokens=False)

    # -- weights -------------------------------------------------------------------------------

    def load_weights(self, weights: WeightsSource, version: int) -> None:
        self.run_on_model_thread(self._load_weights, weights, version)

    def _load_weights(self, weights: WeightsSource, version: int) -> None:
        if isinstance(version, bool) or not isinstance(version, int) or version < 0:
            raise ValueError(f"version must be an integer >= 0, got {version!r}")
        if isinstance(weights, str | Path):
            weights = read_safetensors(Path(weights))
        elif not isinstance(weights, Mapping):
            raise IncompatibleWeights(f"weights must be a state dict or a path, got {type(weights).__name__}")
        plan = self._plan_copy(weights)
        with self.torch.no_grad():
            for target, source in plan:
                target.copy_(source)
        self._version = version

    def _plan_copy(self, weights: Mapping[str, Any]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Check the whole state dict before touching the model: (model tensor, new tensor) pairs.

        Tied parameters (one storage under several names, e.g. lm_head.weight and
        model.embed_tokens.weight) need one of their names; save_pretrained writes only one."""
        torch = self.torch
        current = self.model.state_dict()
        groups: dict[int, list[str]] = {}
        for name, tensor in current.items():
            groups.setdefault(tensor.data_ptr(), []).append(name)
        problems: list[str] = []
        unexpected = sorted(set(weights) - set(current))
        if unexpected:
            problems.append(f"unexpected keys {_listed(unexpected)}")
        missing: list[str] = []
        bad_shape: list[str] = []
        bad_value: list[str] = []
        plan: list[tuple[torch.Tensor, torch.Tensor]] = []
        for names in groups.values():
            given = [name for name in names if name in weights]
            if not given:
                missing.append(names[0])
                continue
            fitting: list[str] = []
            for name in given:
                value = weights[name]
                if not isinstance(value, torch.Tensor):
                    bad_value.append(f"{name} (a {type(value).__name__}, not a tensor)")
                elif tuple(value.shape) != tuple(current[name].shape):
                    bad_shape.append(f"{name} {tuple(value.shape)} != {tuple(current[name].shape)}")
                elif value.is_floating_point() and not bool(torch.isfinite(value).all()):
                    bad_value.append(f"{name} (non-finite values)")
                else:
                    fitting.append(name)
            if len(fitting) < len(given):
                continue
            first = weights[given[0]]
            if any(not torch.equal(weights[name].to(first.device), first) for name in given[1:]):
                bad_value.append(f"tied {given} differ")
            plan.append((current[names[0]], first))
        if missing:
            problems.append(f"missing keys {_listed(missing)}")
        if bad_shape:
            problems.append(f"shape mismatch {_listed(bad_shape)}")
        if bad_value:
            problems.append(f"bad values {_listed(bad_value)}")
        if problems:
            raise IncompatibleWeights(
                f"weights refused ({'; '.join(problems)}); version {self._version} kept"
            )
        return plan

    # -- generation ----------------------------------------------------------------------------

    def generate(
        self,
        prompts: Sequence[str],
        n: int,
        params: SamplingConfig,
        seeds: Sequence[int | None] | None = None,
    ) -> list[list[Sample]]:
        return self.run_on_model_thread(self._generate, prompts, n, params, seeds)

    def prompt_problems(self, prompts: Sequence[str], max_new_tokens: int) -> list[str | None]:
        """Per prompt, None or why `generate` would refuse it (tokenizes; any thread)."""
        return [problem for _, problem in self._encode_prompts(prompts, max_new_tokens)]

    def _encode_prompts(
        self, prompts: Sequence[str], max_new_tokens: int
    ) -> list[tuple[list[int], str | None]]:
        encoded = [e.ids for e in self._rust.encode_batch(list(prompts), add_special_tokens=False)]
        out: list[tuple[list[int], str | None]] = []
        for ids in encoded:
            ids = self.bos + ids
            problem = None
            if not ids:
                problem = "the prompt is empty (the model needs at least one token)"
            elif len(ids) + max_new_tokens > self._max_model_len:
                problem = (
                    f"{len(ids)} prompt tokens + max_new_tokens {max_new_tokens} exceed the model's limit "
                    f"of {self._max_model_len} tokens"
                )
            out.append((ids, problem))
        return out

    def _generate(
        self,
        prompts: Sequence[str],
        n: int,
        params: SamplingConfig,
        seeds: Sequence[int | None] | None = None,
    ) -> list[list[Sample]]:
        check_generate_args(prompts, n, params)
        if seeds is not None and len(seeds) != len(prompts):
            raise ValueError(f"seeds has {len(seeds)} entries for {len(prompts)} prompts")
        if not prompts:
            return []
        prompt_ids: list[list[int]] = []
        for i, (ids, problem) in enumerate(self._encode_prompts(prompts, params.max_new_tokens)):
            if problem is not None:
                raise ValueError(f"prompts[{i}]: {problem}")
            prompt_ids.append(ids)
        base_seed = params.seed if params.seed is not None else secrets.randbits(63)
        jobs = [(i, j) for i in range(len(prompt_ids)) for j in range(n)]
        jobs.sort(key=lambda job: -len(prompt_ids[job[0]]))  # similar lengths share a chunk: less padding
        results: list[list[Sample | None]] = [[None] * n for _ in prompt_ids]
        for start in range(0, len(jobs), self.max_batch_sequences):
            chunk = jobs[start : start + self.max_batch_sequences]
            chunk_seeds = [self._sequence_seed(base_seed, seeds, i, j) for i, j in chunk]
            samples = self._generate_chunk([prompt_ids[i] for i, _ in chunk], chunk_seeds, params)
            for (i, j), sample in zip(chunk, samples, strict=True):
                results[i][j] = sample
        return [[s for s in row if s is not None] for row in results]

    @staticmethod
    def _sequence_seed(base_seed: int, seeds: Sequence[int | None] | None, i: int, j: int) -> int:
        """Per-prompt seeds make a prompt's samples independent of its position in the call."""
        if seeds is None:
            return sequence_seed(base_seed, i, j)
        seed = seeds[i]
        return sequence_seed(seed if seed is not None else secrets.randbits(63), 0, j)

    def _generate_chunk(
        self, prompts: list[list[int]], seeds: list[int], params: SamplingConfig
    ) -> list[Sample]:
        from transformers import DynamicCache

        torch = self.torch
        batch, width = len(prompts), max(len(p) for p in prompts)
        ids = torch.full((batch, width), self.pad_id, dtype=torch.long)  # (B, P)
        mask = torch.zeros((batch, width), dtype=torch.long)  # (B, P)
        for row, prompt in enumerate(prompts):
            ids[row, width - len(prompt) :] = torch.tensor(prompt, dtype=torch.long)
            mask[row, width - len(prompt) :] = 1
        ids, mask = ids.to(self.device), mask.to(self.device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)  # (B, P): left padding shifts no position
        next_position = positions[:, -1] + 1  # (B,)
        states = [_SequenceState(p, seed, self.decode) for p, seed in zip(prompts, seeds, strict=True)]
        rows = list(range(batch))  # batch row -> index into `states`, for the sequences still running
        cache = DynamicCache(config=self.model.config)
        step_ids, step_positions = ids, positions
        with torch.inference_mode():
            for step in range(params.max_new_tokens):
                logits = (
                    self.model(
                        input_ids=step_ids,
                        attention_mask=mask,
                        position_ids=step_positions,
                        past_key_values=cache,
                        use_cache=True,
                        logits_to_keep=1,
                    )
                    .logits[:, -1]
                    .float()
                )  # (A, V)
                uniforms = None if params.greedy else [states[r].rng.random() for r in rows]
                tokens, sampling_logprobs = sample_tokens(logits, params, uniforms)  # (A,), (A,)
                logprobs = torch.log_softmax(logits, dim=-1).gather(1, tokens[:, None])[:, 0]  # (A,)
                last = step == params.max_new_tokens - 1
                keep: list[int] = []
                for a, (token, lp, slp) in enumerate(
                    zip(tokens.tolist(), logprobs.tolist(), sampling_logprobs.tolist(), strict=True)
                ):
                    state = states[rows[a]]
                    state.add(token, lp, slp, token in self.eos_token_ids, params.stop)
                    if state.finish_reason is None and last:
                        state.finish_reason = "length"
                    if state.finish_reason is None:
                        keep.append(a)
                if not keep:
                    break
                if len(keep) < len(rows):  # drop finished sequences from the batch and the cache
                    index = torch.tensor(keep, device=self.device)
                    cache.batch_select_indices(index)
                    mask, tokens, next_position = mask[index], tokens[index], next_position[index]
                    rows = [rows[a] for a in keep]
                mask = torch.cat([mask, mask.new_ones((len(rows), 1))], dim=1)  # (A, P + step + 1)
                step_ids = tokens[:, None]  # (A, 1)
                step_positions = next_position[:, None]  # (A, 1)
                next_position = next_position + 1
        return [state.sample() for state in states]


class _SequenceState:
    """One sequence being generated: its tokens, logprobs and incremental text."""

    def __init__(self, prompt: list[int], seed: int, decode: Callable[[list[int]], str]) -> None:
        self.prompt = list(prompt)  # each sample owns its lists
        self.rng = random.Random(seed)  # this sequence's own stream: independent of the batch
        self.tokens: list[int] = []
        self.logprobs: list[float] = []
        self.sampling_logprobs: list[float] = []
        self.detok = IncrementalDetokenizer(decode, prompt[-DETOKENIZER_CONTEXT:])
        self.cut: int | None = None  # text length when a stop string ended the sample
        self.stop_string: str | None = None
        self.finish_reason: FinishReason | None = None

    def add(
        self, token: int, logprob: float, sampling_logprob: float, eos: bool, stops: Sequence[str]
    ) -> None:
        self.tokens.append(token)
        self.logprobs.append(logprob)
        self.sampling_logprobs.append(sampling_logprob)
        if eos:  # EOS adds no text; it ends at the end of the text
            self.detok.ends.append(len(self.detok.text))
            self.finish_reason = "stop"
            return
        searched = len(self.detok.text)
        if self.detok.add(token) and stops:
            found = find_stop(self.detok.text, searched, stops)
            if found is not None:
                self.cut, self.stop_string = found
                self.finish_reason = "stop"

    def sample(self) -> Sample:
        text = self.detok.text if self.cut is None else self.detok.text[: self.cut]
        assert self.finish_reason is not None, "sample() before the sequence ended"
        return Sample(
            prompt_token_ids=self.prompt,
            response_token_ids=self.tokens,
            logprobs=self.logprobs,
            sampling_logprobs=self.sampling_logprobs,
            text=text,
            token_char_ends=[min(end, len(text)) for end in self.detok.ends],
            finish_reason=self.finish_reason,
            stop_string=self.stop_string,
        )


def sample_tokens(
    logits: torch.Tensor, params: SamplingConfig, uniforms: list[float] | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Next tokens (A,) and their logprobs under the processed distribution (A,), from logits (A, V)
    in float32: greedy argmax (logprob 0), or temperature -> top-k -> top-p -> inverse-CDF sampling
    with one uniform in [0, 1) per row (drawn from that sequence's own random stream)."""
    import torch

    if params.greedy:
        return logits.argmax(dim=-1), torch.zeros(logits.shape[0], device=logits.device)
    scaled = logits / params.temperature  # (A, V)
    if 0 < params.top_k < scaled.shape[-1]:
        kth = torch.topk(scaled, params.top_k, dim=-1).values[:, -1:]  # (A, 1)
        scaled = scaled.masked_fill(scaled < kth, float("-inf"))
    if params.top_p < 1:
        sorted_logits, order = torch.sort(scaled, dim=-1, descending=True)  # (A, V)
        sorted_probs = sorted_logits.softmax(dim=-1)
        before = sorted_probs.cumsum(dim=-1) - sorted_probs  # (A, V): mass of the more likely tokens
        drop_sorted = before >= params.top_p  # (A, V); the most likely token is always kept
        drop = torch.zeros_like(drop_sorted).scatter(1, order, drop_sorted)  # (A, V), vocab order
        scaled = scaled.masked_fill(drop, float("-inf"))
    logprobs = torch.log_softmax(scaled, dim=-1)  # (A, V)
    assert uniforms is not None and len(uniforms) == logprobs.shape[0]
    cdf = logprobs.double().exp().cumsum(dim=-1)  # (A, V)
    total = cdf[:, -1:]  # (A, 1), 1 up to rounding
    u = torch.tensor(uniforms, dtype=torch.float64, device=cdf.device)[:, None]  # (A, 1)
    target = torch.minimum(u * total, torch.nextafter(total, torch.zeros_like(total)))  # (A, 1) < total
    # the first token whose cumulative mass exceeds the target: never a zero-probability token
    tokens = torch.searchsorted(cdf, target, right=True)[:, 0]  # (A,)
    return tokens, logprobs.gather(1, tokens[:, None])[:, 0]


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """A state dict from a .safetensors file or a Hugging Face model dir (single or sharded)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if path.is_dir():
        index = path / "model.safetensors.index.json"
        if index.is_file():
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            files = [path / shard for shard in shards]
        elif (path / "model.safetensors").is_file():
            files = [path / "model.safetensors"]
        else:
            raise IncompatibleWeights(f"{path} holds no model.safetensors (or sharded index)")
    elif path.is_file():
        files = [path]
    else:
        raise IncompatibleWeights(f"weights path {path} does not exist")
    state: dict[str, torch.Tensor] = {}
    for file in files:
        try:
            state.update(load_file(str(file)))
        except (SafetensorError, OSError) as exc:
            raise IncompatibleWeights(f"cannot read {file} as safetensors: {exc}") from None
    return state


def _listed(names: list[str]) -> str:
    more = f" and {len(names) - MAX_LISTED} more" if len(names) > MAX_LISTED else ""
    return ", ".join(names[:MAX_LISTED]) + more
