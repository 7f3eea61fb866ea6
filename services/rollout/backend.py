"""The generation interface of the rollout workers, shared by the `hf` and `vllm` backends.

A backend turns prompts into `Sample`s with the current policy and swaps policy weights between
batches. Nothing here imports torch; the helpers below (seeds, incremental detokenization, stop
strings) are what every backend needs to give the same answers.

What a `Sample` holds, precisely:

- `response_token_ids`: every token the policy sampled, in order, including the token that
  completed a stop string and a terminal EOS token. PPO trains on exactly these tokens (stopping
  is an action too). Nothing is generated after EOS or after the token that completes a stop string.
- `logprobs[t]`: log p(token_t | prompt, tokens_<t) under the RAW policy: log-softmax of the model's
  logits at temperature 1, over the full vocabulary, no top-k/top-p truncation, computed in float32
  from the logits of the KV-cached forward. This is what a teacher-forced forward of prompt + response
  gives (the same number up to float noise), the "old" logprob of PPO importance ratios.
- `sampling_logprobs[t]`: log q(token_t) under the distribution actually sampled from: logits / T,
  then top-k, then top-p (tokens outside renormalised away), log-softmax. Equal to `logprobs` when
  T = 1, top_k = 0 and top_p = 1. Greedy decoding (T = 0, or below 1e-5) samples from a point mass:
  0.0. On a GPU the model runs in bfloat16 by default; both logprobs are still computed in float32
  from its logits, and a trainer recomputing them in another dtype sees that dtype's noise.
- `text`: the decoded response. A terminal EOS adds no text. A stop string is cut from the text,
  with whatever the completing token decoded to after it; its tokens stay in `response_token_ids`.
  Special tokens other than the terminal EOS decode to their literal text. A sample cut by
  `max_new_tokens` inside a multi-byte character (or ending in bytes that never form one) leaves those
  bytes out of the text; they stay in the token ids.
- `token_char_ends[t]`: number of characters of `text` fully decoded once tokens 0..t are known, i.e.
  `text[:ends[t]]` equals the decoding of tokens 0..t, minus a trailing incomplete character (a
  byte-level token may end inside a multi-byte UTF-8 character; that character counts for the token
  that completes it). Non-decreasing, clipped to len(text) (stop-string and EOS tokens end at
  len(text)). `services.common.lines.token_index_for_lines(lines, token_char_ends)` places line
  rewards on these tokens.
- `finish_reason`: "stop" (EOS or a stop string) or "length" (`max_new_tokens` reached).
"""

from __future__ import annotations

import hashlib
import math
import threading
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Protocol, runtime_checkable

if TYPE_CHECKING:
    import torch

FinishReason = Literal["stop", "length"]
# Temperatures below this decode greedily, as vLLM's _SAMPLING_EPS: logits / T would overflow.
GREEDY_BELOW = 1e-5
REPLACEMENT_CHAR = "\ufffd"  # what a byte-level decoder yields for an incomplete UTF-8 sequence


class IncompatibleWeights(ValueError):
    """A state dict that does not fit the loaded model (keys, shapes, values); the old weights stay."""


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True, slots=True)
class SamplingConfig:
    """Sampling parameters of one `generate` call (the task's `SamplingParams`)."""

    temperature: float = 1.0
    """0 = greedy (as in vLLM, anything below 1e-5 is greedy); otherwise logits are divided by it"""
    top_p: float = 1.0
    """nucleus sampling: keep the smallest set of tokens whose probability reaches top_p (1 = off)"""
    top_k: int = 0
    """keep the k most likely tokens (0 = off)"""
    max_new_tokens: int = 256
    """response length limit in tokens; reaching it gives finish_reason "length\""""
    seed: int | None = None
    """sample j of prompt i is a function of (seed, i, j, prompt, weights); None = fresh randomness"""
    stop: tuple[str, ...] = field(default=())
    """strings that end a sample (cut from the text); EOS always ends a sample"""

    def __post_init__(self) -> None:
        if isinstance(self.temperature, bool) or not isinstance(self.temperature, int | float):
            raise ValueError(f"temperature must be a number, got {self.temperature!r}")
        if not (math.isfinite(self.temperature) and self.temperature >= 0):
            raise ValueError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if isinstance(self.top_p, bool) or not isinstance(self.top_p, int | float):
            raise ValueError(f"top_p must be a number, got {self.top_p!r}")
        if not (0 < self.top_p <= 1):
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if not _is_int(self.top_k) or self.top_k < 0:
            raise ValueError(f"top_k must be an integer >= 0 (0 = off), got {self.top_k!r}")
        if not _is_int(self.max_new_tokens) or self.max_new_tokens <= 0:
            raise ValueError(f"max_new_tokens must be an integer > 0, got {self.max_new_tokens!r}")
        if self.seed is not None and not _is_int(self.seed):
            raise ValueError(f"seed must be an integer or None, got {self.seed!r}")
        if isinstance(self.stop, str) or not isinstance(self.stop, Sequence):
            raise ValueError(f"stop must be a sequence of strings, got {self.stop!r}")
        stop = tuple(self.stop)
        for s in stop:
            if not isinstance(s, str) or not s:
                raise ValueError(f"stop strings must be non-empty strings, got {s!r}")
        object.__setattr__(self, "stop", stop)

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW

    @classmethod
    def from_proto(cls, params: Any) -> SamplingConfig:
        """From a `psgpo.v1.SamplingParams`. Proto3 cannot tell an unset field from zero, so
        top_p 0 means 1 (off) and seed 0 means None (fresh randomness: a worker that wants
        reproducible tasks sets a non-zero seed per task). max_new_tokens 0 is refused."""
        return cls(
            temperature=float(params.temperature),
            top_p=float(params.top_p) or 1.0,
            top_k=int(params.top_k),
            max_new_tokens=int(params.max_new_tokens),
            seed=int(params.seed) or None,
            stop=tuple(params.stop),
        )


@dataclass(slots=True)
class Sample:
    """One generated response (see the module docstring for the exact meaning of each field)."""

    prompt_token_ids: list[int]
    response_token_ids: list[int]
    logprobs: list[float]  # raw policy, temperature 1, per response token
    sampling_logprobs: list[float]  # the processed distribution actually sampled from
    text: str
    token_char_ends: list[int]  # per response token: end offset in `text`
    finish_reason: FinishReason
    stop_string: str | None = None  # the stop string that ended the sample, if one did

    def __post_init__(self) -> None:
        n = len(self.response_token_ids)
        if not (len(self.logprobs) == len(self.sampling_logprobs) == len(self.token_char_ends) == n):
            raise ValueError(
                f"sample fields disagree: {n} tokens, {len(self.logprobs)} logprobs, "
                f"{len(self.sampling_logprobs)} sampling logprobs, {len(self.token_char_ends)} char ends"
            )


WeightsSource = Mapping[str, "torch.Tensor"] | str | Path


@runtime_checkable
class GenerationBackend(Protocol):
    """What a rollout worker needs from a generator. Calls may come from any thread; a backend
    serialises them onto its own model thread (see `submit`)."""

    @property
    def version(self) -> int:
        """Policy version of the weights in use (the `load_weights` argument; the initial one at start)."""
        ...

    @property
    def tokenizer(self) -> Any:
        """The policy's (fast) Hugging Face tokenizer."""
        ...

    @property
    def max_model_len(self) -> int:
        """Longest prompt + response in tokens."""
        ...

    def generate(
        self,
        prompts: Sequence[str],
        n: int,
        params: SamplingConfig,
        seeds: Sequence[int | None] | None = None,
    ) -> list[list[Sample]]:
        """n samples for each prompt: result[i][j] is sample j of prompts[i]. Raises ValueError for
        bad input (empty prompt, prompt + max_new_tokens over `max_model_len`, n < 1). `seeds`, one
        per prompt, overrides `params.seed`: then sample j of prompt i depends on (seeds[i], j, prompt,
        weights) only, so tasks with different seeds batch together and a redelivered task samples
        the same responses."""
        ...

    def prompt_problems(self, prompts: Sequence[str], max_new_tokens: int) -> list[str | None]:
        """Per prompt: None, or why `generate` would refuse it (empty, too long). `generate` raises
        ValueError for the first such prompt, so a worker batching many tasks checks here first and
        refuses only the bad ones."""
        ...

    def load_weights(self, weights: WeightsSource, version: int) -> None:
        """Swap in a full state dict (a mapping, a .safetensors file or a Hugging Face model dir)
        between generate calls. Raises IncompatibleWeights, keeping the old weights and version,
        when keys, shapes or values do not fit."""
        ...

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future[Any]:
        """Run fn on the backend's model thread (for asyncio: `await asyncio.wrap_future(...)`)."""
        ...

    def close(self) -> None: ...


class ModelThread:
    """The one thread a backend runs all its model work on (a second thread calling torch starts a
    second OpenMP team, slowing forwards on small CPUs). Calls from that thread itself run inline."""

    def __init__(self, name: str) -> None:
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=name)
        self._thread_id = self._executor.submit(threading.get_ident).result()

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future[Any]:
        """Run fn on the model thread; called from the model thread itself, fn runs at once."""
        if threading.get_ident() == self._thread_id:
            future: Future[Any] = Future()
            try:
                future.set_result(fn(*args, **kwargs))
            except BaseException as exc:  # handed to the caller through the future
                future.set_exception(exc)
            return future
        return self._executor.submit(fn, *args, **kwargs)

    def run_on_model_thread(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Any:
        return self.submit(fn, *args, **kwargs).result()

    def shutdown_thread(self, wait: bool = True) -> None:
        self._executor.shutdown(wait=wait)


def sequence_seed(seed: int, prompt_index: int, sample_index: int) -> int:
    """A 63-bit seed for one sequence, so that a sample does not depend on batching or on the
    other prompts of the call."""
    digest = hashlib.blake2b(f"{seed}/{prompt_index}/{sample_index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def check_generate_args(prompts: Sequence[str], n: int, params: SamplingConfig) -> None:
    if isinstance(prompts, str) or not isinstance(prompts, Sequence):
        raise ValueError("prompts must be a list of strings")
    for i, prompt in enumerate(prompts):
        if not isinstance(prompt, str):
            raise ValueError(f"prompts[{i}] must be a string, got {type(prompt).__name__}")
    if not _is_int(n) or n < 1:
        raise ValueError(f"n must be an integer >= 1, got {n!r}")
    if not isinstance(params, SamplingConfig):
        raise ValueError(f"params must be a SamplingConfig, got {type(params).__name__}")


def find_stop(text: str, searched_up_to: int, stops: Sequence[str]) -> tuple[int, str] | None:
    """Earliest stop string in `text` that ends after offset `searched_up_to` (text before it was
    searched already): (its start offset, the string), or None."""
    best: tuple[int, str] | None = None
    for stop in stops:
        pos = text.find(stop, max(0, searched_up_to - len(stop) + 1))
        if pos >= 0 and (best is None or pos < best[0]):
            best = (pos, stop)
    return best


class IncrementalDetokenizer:
    """Decodes a growing token sequence into text, one token at a time, emitting a character only
    once all its bytes are known; records each token's end offset in the text.

    The algorithm is vLLM's `detokenize_incrementally` (after Hugging Face's TextStreamer): decode a
    small window that starts at a character boundary, once without and once with the new tokens; the
    difference is new text unless it ends in U+FFFD (an incomplete character), in which case it is held
    back until a later token completes it. `context` (the last prompt tokens) makes tokenizers that
    drop a leading space at the start of a decode (SentencePiece) decode the response as a continuation.
    Cost per token: two decodes of a few tokens.
    """

    def __init__(self, decode: Callable[[list[int]], str], context: Sequence[int] = ()) -> None:
        self._decode = decode
        self._ids: list[int] = list(context)
        self._prefix = 0  # window start: a character boundary
        self._read = len(self._ids)  # tokens before this are in `text`
        self._prefix_text = decode(self._ids) if self._ids else ""
        self.text = ""
        self.ends: list[int] = []

    def add(self, token_id: int) -> str:
        """Append one token; returns the newly completed text (possibly empty)."""
        self._ids.append(token_id)
        window = self._decode(self._ids[self._prefix :])
        piece = ""
        if len(window) > len(self._prefix_text) and not window.endswith(REPLACEMENT_CHAR):
            piece = window[len(self._prefix_text) :]
            self.text += piece
            self._prefix, self._read = self._read, len(self._ids)
            self._prefix_text = self._decode(self._ids[self._prefix : self._read])
        self.ends.append(len(self.text))
        return piece
