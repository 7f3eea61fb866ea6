"""The `vllm` generation backend (GPU): `vllm.LLM` generating from token ids, same `Sample`s as `hf`.

vLLM API facts this relies on (read in github.com/vllm-project/vllm; the stored snapshots are named):

- `LLM(model=..., tokenizer=..., dtype=..., seed=..., gpu_memory_utilization=...,
  tensor_parallel_size=..., max_model_len=..., logprobs_mode=..., max_logprobs=...,
  worker_extension_cls=...)`: keyword arguments of `EngineArgs` (vllm/entrypoints/llm.py).
- `logprobs_mode` (vllm/config/model.py, commit 0052a5b8; `LogprobsMode = Literal["raw_logits",
  "raw_logprobs", "processed_logits", "processed_logprobs"]`, default "raw_logprobs"): "Raw means the
  values before applying any logit processors ... Processed means the values after applying all
  processors, including temperature and top_k/top_p". We set "raw_logprobs" explicitly (older
  releases returned processed values with no switch): `SamplingParams(logprobs=k)` then returns, per
  output token, a dict {token id: Logprob} holding the sampled token and the k most likely ones, with
  log-softmax values of the raw logits over the full vocabulary: the raw-policy `Sample.logprobs`.
- `worker_extension_cls` (vllm/config/parallel.py): "dynamically inherited by the worker class ...
  to inject new attributes and methods to the worker class for use in collective_rpc calls". The
  hot-swap calls `llm.collective_rpc("psgpo_load_weights", args=(files,))` on every (tensor-parallel)
  worker, which feeds the files to `model_runner.model.load_weights(weights=iterable of (name,
  tensor))`, the loader vLLM's own checkpoint loading uses (it shards, fuses qkv / gate-up and skips
  a tied lm_head). Only file names cross the process boundary. `llm.reset_prefix_cache()` then drops
  KV blocks computed with the old weights.

What differs from `hf`, by construction:

- Random streams: vLLM samples with its own per-request generator (`SamplingParams.seed`), so a
  seeded sample is reproducible on vLLM but not the same tokens as `hf`. Greedy decoding gives the
  same tokens (up to float noise from bfloat16 kernels). Each (prompt i, sample j) is one request
  with n=1 and the seed `hf` derives for it (`HfBackend._sequence_seed`): results do not depend on
  how vLLM fans out n>1 requests in a given release; prefix caching shares the prompt's KV.
- `sampling_logprobs`: vLLM returns one kind of logprob. Greedy gives 0.0 and temperature 1 without
  top-k/top-p gives the raw logprob (both exact, as `hf`). Otherwise we request the top
  `MAX_LOGPROBS` raw logprobs and apply temperature -> top-k -> top-p on them: exact when
  0 < top_k <= MAX_LOGPROBS (the kept set is inside what vLLM returns); otherwise an approximation
  that ignores the probability mass outside the top MAX_LOGPROBS tokens. PPO uses `logprobs`.
- Text, `token_char_ends` and stop strings are recomputed from the token ids with the same
  `IncrementalDetokenizer` and `find_stop` as `hf`; vLLM's stop strings only make it stop early.

Threading: every call into the engine runs on ONE thread (`submit`), as in `hf`.
"""

from __future__ import annotations

import importlib.util
import logging
import math
import secrets
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from services.common.errors import UserError
from services.rollout.backend import (
    IncompatibleWeights,
    ModelThread,
    Sample,
    SamplingConfig,
    WeightsSource,
    check_generate_args,
)
from services.rollout.backend_hf import HfBackend, _listed, _SequenceState, read_safetensors

log = logging.getLogger(__name__)

NEEDS_VLLM = "the vllm backend needs `pip install .[vllm]` and a CUDA GPU"
MAX_LOGPROBS = 64  # raw logprobs per token requested when sampling_logprobs need more than the sampled one


def require_vllm() -> None:
    """One line (UserError) unless vLLM is installed and a CUDA GPU is visible; imports nothing heavy
    when vLLM is missing."""
    if importlib.util.find_spec("vllm") is None:
        raise UserError(f"{NEEDS_VLLM} (vllm is not installed)")
    try:
        import torch
    except ImportError:
        raise UserError(f"{NEEDS_VLLM} (torch is not installed)") from None
    if not torch.cuda.is_available():
        raise UserError(f"{NEEDS_VLLM} (no CUDA GPU is visible)")


def shutdown_llm(llm: Any) -> None:
    """Stop a `vllm.LLM`'s engine core (a separate process in vLLM V1) so its GPU memory is freed now."""
    engine = getattr(llm, "llm_engine", None)
    core = getattr(engine, "engine_core", None)
    if core is not None and hasattr(core, "shutdown"):
        core.shutdown()


class WeightSwapExtension:
    """Mixed into vLLM's GPU worker class (`worker_extension_cls`); runs inside each worker process."""

    def psgpo_load_weights(self, files: list[str]) -> int:
        from safetensors.torch import load_file

        def weights():
            for file in files:
                yield from load_file(file).items()

        runner = self.model_runner  # type: ignore[attr-defined]
        # get_model() unwraps the CUDA-graph wrapper (vllm/v1/worker/gpu_model_runner.py)
        model = runner.get_model() if hasattr(runner, "get_model") else runner.model
        loaded = model.load_weights(weights=weights())
        return len(loaded) if loaded is not None else -1


def checkpoint_shapes(model_dir: Path) -> dict[str, tuple[int, ...]]:
    """{name: shape} of a Hugging Face model dir's safetensors, from the headers only."""
    import json

    from safetensors import safe_open

    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        files = sorted({model_dir / f for f in json.loads(index.read_text())["weight_map"].values()})
    else:
        files = [model_dir / "model.safetensors"]
    shapes: dict[str, tuple[int, ...]] = {}
    for file in files:
        with safe_open(str(file), framework="pt") as f:
            for name in f.keys():  # safe_open is not a mapping
                shapes[name] = tuple(f.get_slice(name).get_shape())
    return shapes


class VllmBackend(ModelThread):
    """A Hugging Face causal LM dir served by `vllm.LLM` as a generation backend (one CUDA GPU or
    `tensor_parallel_size` of them)."""

    def __init__(
        self,
        model_dir: Path | str,
        *,
        gpu_memory_utilization: float = 0.85,
        tensor_parallel_size: int = 1,
        max_model_len: int = 0,
        dtype: str = "auto",
        seed: int = 0,
        enforce_eager: bool = False,
        version: int = 0,
        engine_args: Mapping[str, Any] | None = None,
    ) -> None:
        """dtype: "auto" = bfloat16 (as `hf` on a GPU) or a vLLM dtype name; max_model_len: cap on
        prompt + response tokens (0 = the model's own); enforce_eager: no CUDA graphs (faster start);
        engine_args: more `vllm.EngineArgs` keywords (e.g. {"attention_backend": "TRITON_ATTN"})."""
        require_vllm()
        if not 0 < gpu_memory_utilization <= 1:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {gpu_memory_utilization}")
        if tensor_parallel_size < 1:
            raise ValueError(f"tensor_parallel_size must be >= 1, got {tensor_parallel_size}")
        self._version = version
        super().__init__("rollout-vllm")
        options = dict(
            gpu_memory_utilization=gpu_memory_utilization,
            tensor_parallel_size=tensor_parallel_size,
            max_model_len=max_model_len,
            dtype=dtype,
            seed=seed,
            enforce_eager=enforce_eager,
            **dict(engine_args or {}),
        )
        try:
            self.run_on_model_thread(self._load, Path(model_dir), options)
        except BaseException:
            self.shutdown_thread(wait=False)
            raise

    # -- closing ------------------------------------------------------------------------------------

    def close(self) -> None:
        def shutdown() -> None:
            shutdown_llm(getattr(self, "llm", None))
            self.llm = None

        try:
            self.run_on_model_thread(shutdown)
        finally:
            self.shutdown_thread(wait=True)

    # -- loading -------------------------------------------------------------------------------

    def _load(self, model_dir: Path, options: dict[str, Any]) -> None:
        import torch
        from tokenizers import Tokenizer
        from transformers import AutoConfig, AutoTokenizer, GenerationConfig
        from vllm import LLM

        if not (model_dir / "config.json").is_file():
            raise ValueError(f"{model_dir} has no config.json: not a Hugging Face model dir")
        try:
            tokenizer = AutoTokenizer.from_pretrained(model_dir)
            config = AutoConfig.from_pretrained(model_dir)
            self._shapes = checkpoint_shapes(model_dir)
        except (OSError, ValueError, KeyError) as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ValueError(f"cannot load a causal LM from {model_dir}: {first}") from None
        if not getattr(tokenizer, "is_fast", False):
            raise ValueError(f"{model_dir}: a fast (Rust) tokenizer is required (tokenizer.json)")
        self.torch = torch
        self._tokenizer = tokenizer
        self._rust = Tokenizer.from_str(tokenizer.backend_tokenizer.to_str())
        self._rust.no_truncation()
        self._rust.no_padding()
        self.bos = [tokenizer.bos_token_id] if getattr(tokenizer, "add_bos_token", False) else []
        eos_ids: set[int] = set()
        try:
            eos = GenerationConfig.from_pretrained(model_dir).eos_token_id
            eos_ids.update(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        except OSError:  # no generation_config.json
            pass
        if tokenizer.eos_token_id is not None:
            eos_ids.add(tokenizer.eos_token_id)
        self.eos_token_ids = frozenset(int(i) for i in eos_ids)
        self.tied = bool(getattr(config, "tie_word_embeddings", False))
        max_model_len = options.pop("max_model_len")
        dtype = options.pop("dtype")
        self.llm = LLM(
            model=str(model_dir),
            tokenizer=str(model_dir),
            dtype="bfloat16" if dtype == "auto" else dtype,
            max_model_len=max_model_len or None,
            logprobs_mode="raw_logprobs",
            max_logprobs=MAX_LOGPROBS,
            worker_extension_cls=f"{__name__}.WeightSwapExtension",
            **options,
        )
        limit = int(getattr(config, "max_position_embeddings", 0) or 1 << 30)
        engine_limit = getattr(getattr(self.llm.llm_engine, "model_config", None), "max_model_len", None)
        self._max_model_len = int(engine_limit or (min(max_model_len, limit) if max_model_len else limit))

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
        return self._rust.decode(ids, skip_special_tokens=False)

    # -- weights -------------------------------------------------------------------------------

    def load_weights(self, weights: WeightsSource, version: int) -> None:
        self.run_on_model_thread(self._load_weights, weights, version)

    def _load_weights(self, weights: WeightsSource, version: int) -> None:
        if isinstance(version, bool) or not isinstance(version, int) or version < 0:
            raise ValueError(f"version must be an integer >= 0, got {version!r}")
        files: list[str] | None = None
        if isinstance(weights, str | Path):
            path = Path(weights)
            state = read_safetensors(path)  # refuses what is not safetensors, as hf
            if path.is_file():
                files = [str(path)]
            elif not (path / "model.safetensors.index.json").is_file():
                files = [str(path / "model.safetensors")]
            weights = state
        elif not isinstance(weights, Mapping):
            raise IncompatibleWeights(f"weights must be a state dict or a path, got {type(weights).__name__}")
        self._check(weights)  # before the engine is touched: a refusal keeps the old weights
        with tempfile.TemporaryDirectory(prefix="psgpo-weights-") as tmp:
            if files is None:  # a mapping or sharded dir: one file the workers can read
                from safetensors.torch import save_file

                files = [str(Path(tmp) / "model.safetensors")]
                save_file({k: v.detach().cpu().contiguous() for k, v in weights.items()}, files[0])
            self.llm.collective_rpc("psgpo_load_weights", args=(files,))
        self.llm.reset_prefix_cache()  # cached KV blocks were computed with the old weights
        self._version = version

    def _check(self, weights: Mapping[str, Any]) -> None:
        """Keys and shapes against the initial checkpoint, finite values; a tied lm_head is optional."""
        torch = self.torch
        optional = {"lm_head.weight"} if self.tied else set()
        expected = set(self._shapes) | optional
        problems: list[str] = []
        unexpected = sorted(set(weights) - expected)
        if unexpected:
            problems.append(f"unexpected keys {_listed(unexpected)}")
        missing = sorted(set(self._shapes) - set(weights) - optional)
        if missing:
            problems.append(f"missing keys {_listed(missing)}")
        bad_shape: list[str] = []
        bad_value: list[str] = []
        for name in sorted(set(weights) & expected):
            value = weights[name]
            want = self._shapes.get(name) or self._shapes.get("model.embed_tokens.weight")
            if not isinstance(value, torch.Tensor):
                bad_value.append(f"{name} (a {type(value).__name__}, not a tensor)")
            elif want is not None and tuple(value.shape) != tuple(want):
                bad_shape.append(f"{name} {tuple(value.shape)} != {tuple(want)}")
            elif value.is_floating_point() and not bool(torch.isfinite(value).all()):
                bad_value.append(f"{name} (non-finite values)")
        if not bad_value and not bad_shape and self.tied and optional <= set(weights):
            embed = weights.get("model.embed_tokens.weight")
            if embed is not None and not torch.equal(weights["lm_head.weight"].to(embed.device), embed):
                bad_value.append("tied ['model.embed_tokens.weight', 'lm_head.weight'] differ")
        if bad_shape:
            problems.append(f"shape mismatch {_listed(bad_shape)}")
        if bad_value:
            problems.append(f"bad values {_listed(bad_value)}")
        if problems:
            raise IncompatibleWeights(
                f"weights refused ({'; '.join(problems)}); version {self._version} kept"
            )

    # -- generation ----------------------------------------------------------------------------

    def prompt_problems(self, prompts: Sequence[str], max_new_tokens: int) -> list[str | None]:
        return [problem for _, problem in self._encode_prompts(prompts, max_new_tokens)]

    def _encode_prompts(
        self, prompts: Sequence[str], max_new_tokens: int
    ) -> list[tuple[list[int], str | None]]:
        # The same tokenization, BOS rule and limits as hf (it reads only _rust, bos and _max_model_len),
        # so both backends see the same prompt ids.
        return HfBackend._encode_prompts(self, prompts, max_new_tokens)  # type: ignore[arg-type]

    def generate(
        self,
        prompts: Sequence[str],
        n: int,
        params: SamplingConfig,
        seeds: Sequence[int | None] | None = None,
    ) -> list[list[Sample]]:
        return self.run_on_model_thread(self._generate, prompts, n, params, seeds)

    def _sampling_params(self, params: SamplingConfig, seed: int | None) -> Any:
        from vllm import SamplingParams

        identity = params.temperature == 1 and params.top_k == 0 and params.top_p == 1
        return SamplingParams(
            n=1,
            temperature=0.0 if params.greedy else params.temperature,
            top_p=params.top_p,
            top_k=params.top_k if params.top_k > 0 else -1,  # -1: off (0 is also off in recent releases)
            max_tokens=params.max_new_tokens,
            seed=None if params.greedy else seed,  # None: vLLM's batched sampling (not reproducible)
            stop=list(params.stop) or None,
            stop_token_ids=sorted(self.eos_token_ids),
            skip_special_tokens=False,  # as hf: special tokens decode to their text (stop strings too)
            spaces_between_special_tokens=False,
            logprobs=0 if params.greedy or identity else MAX_LOGPROBS,  # 0: the sampled token only
        )

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
        requests = [{"prompt_token_ids": prompt_ids[i]} for i, _ in jobs]
        # A request with a seed gets its own generator in vLLM's sampler (sampled one request at a time);
        # one that nobody asked to be reproducible (no task seed, no prompt seed) is sampled batched.
        sampling = [
            self._sampling_params(
                params,
                HfBackend._sequence_seed(base_seed, seeds, i, j)
                if params.seed is not None or (seeds is not None and seeds[i] is not None)
                else None,
            )
            for i, j in jobs
        ]
        outputs = self.llm.generate(requests, sampling_params=sampling, use_tqdm=False)
        results: list[list[Sample]] = [[] for _ in prompt_ids]
        for (i, _), output in zip(jobs, outputs, strict=True):
            results[i].append(self._sample(prompt_ids[i], output.outputs[0], params))
        return results

    def _sample(self, prompt: list[int], completion: Any, params: SamplingConfig) -> Sample:
        state = _SequenceState(prompt, 0, self.decode)  # detokenizer context: the last prompt tokens, as hf
        tokens = list(completion.token_ids)
        per_token = completion.logprobs or []
        if len(per_token) != len(tokens):
            raise RuntimeError(f"vLLM returned {len(per_token)} logprobs for {len(tokens)} tokens")
        for t, token in enumerate(tokens):
            candidates = {int(k): float(v.logprob) for k, v in per_token[t].items()}
            raw = candidates[token]
            processed = sampling_logprob(raw, token, candidates, params)
            state.add(token, raw, processed, token in self.eos_token_ids, params.stop)
            if state.finish_reason is not None:
                if t + 1 < len(tokens):
                    log.debug("vLLM generated %d tokens past the stop point", len(tokens) - t - 1)
                break
        if state.finish_reason is None:  # vLLM stopped (length or one of its own stop conditions)
            state.finish_reason = "length" if completion.finish_reason == "length" else "stop"
        return state.sample()


def sampling_logprob(
    raw: float, token: int, candidates: Mapping[int, float], params: SamplingConfig
) -> float:
    """log q(token) under temperature -> top-k -> top-p, from the raw logprobs of the most likely
    tokens (`candidates`, which hold `token`); see the module docstring for when this is exact."""
    if params.greedy:
        return 0.0
    if params.temperature == 1 and params.top_k == 0 and params.top_p == 1:
        return raw
    scaled = sorted(((lp / params.temperature, tok) for tok, lp in candidates.items()), reverse=True)
    if params.top_k > 0:
        scaled = scaled[: params.top_k]
    top = scaled[0][0]
    weights = [math.exp(s - top) for s, _ in scaled]
    total = sum(weights)
    kept: list[tuple[float, int]] = []
    before = 0.0
    for (s, tok), w in zip(scaled, weights, strict=True):
        if params.top_p < 1 and before >= params.top_p:
            break
        kept.append((s, tok))
        before += w / total
    mine = next((s for s, tok in kept if tok == token), None)
    if mine is None:  # vLLM sampled a token our reconstruction drops (ties, float noise)
        return raw / params.temperature - top
    norm = top + math.log(sum(math.exp(s - top) for s, _ in kept))
    return mine - norm
