"""The PRM served by vLLM as a pooling model (GPU): per-token scores from `LLM.encode(...,
pooling_task="token_classify")`, read at the same line-end tokens as `PrmScorer`.

It IS a `PrmScorer` for everything but the model: `prepare` (line-aligned tokenization, limits) is
inherited unchanged, so both backends score the same token ids; only `_load` and `forward` differ.

vLLM API facts (github.com/vllm-project/vllm, vllm/entrypoints/llm.py and vllm/pooling_params.py):
`LLM(model=..., runner="pooling")` serves a `*ForTokenClassification` checkpoint as a pooling model
(older releases: `task="reward"`); `LLM.encode(prompts, pooling_params, use_tqdm=..., pooling_task=
"token_classify")` returns one `PoolingRequestOutput` per prompt whose `.outputs.data` is a (T,
num_labels) tensor, one row per prompt token. `PoolingParams(use_activation=False)` (older:
`activation=False`) returns the head's raw outputs: with num_labels=1 the default activation would
be a sigmoid, and the `hf` scorer returns raw logits.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from services.common.errors import UserError
from services.prm.scorer import Prepared, PrmScorer, Scored, line_scores


class VllmPrmScorer(PrmScorer):
    """`PrmScorer` with the forward pass in vLLM. `forward` runs on `self.thread`, as the batcher expects."""

    def __init__(
        self,
        model_dir: Path,
        dtype: str = "auto",
        max_length: int = 0,
        gpu_memory_utilization: float = 0.3,
        tensor_parallel_size: int = 1,
        enforce_eager: bool = False,
        engine_args: dict[str, Any] | None = None,
    ) -> None:
        """engine_args: more `vllm.EngineArgs` keywords, as `VllmBackend`'s."""
        from services.rollout.backend_vllm import require_vllm

        require_vllm()
        self._engine_options = dict(
            gpu_memory_utilization=gpu_memory_utilization,
            tensor_parallel_size=tensor_parallel_size,
            enforce_eager=enforce_eager,
            **dict(engine_args or {}),
        )
        super().__init__(model_dir, device="cuda", dtype=dtype, threads=0, max_length=max_length)

    def _load(self, model_dir: Path, device: str, dtype: str, threads: int, max_length: int) -> None:
        from transformers import AutoConfig, AutoTokenizer
        from vllm import LLM

        from services.rollout.backend_vllm import checkpoint_shapes

        try:
            tokenizer = AutoTokenizer.from_pretrained(model_dir)
            config = AutoConfig.from_pretrained(model_dir)
            shapes = checkpoint_shapes(model_dir)
        except (OSError, ValueError, KeyError) as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise UserError(f"cannot load PRM from {model_dir}: {first}") from None
        if not getattr(tokenizer, "is_fast", False):
            raise UserError(f"{model_dir}: a fast (Rust) tokenizer is required (tokenizer.json)")
        limit = getattr(config, "max_position_embeddings", None) or 1 << 20
        self.max_length = min(max_length, limit) if max_length else limit
        options: dict[str, Any] = dict(
            model=str(model_dir),
            tokenizer=str(model_dir),
            dtype="bfloat16" if dtype == "auto" else dtype,
            max_model_len=self.max_length,
            **self._engine_options,
        )
        try:
            self.llm = LLM(runner="pooling", **options)
        except TypeError:  # a release before `runner`
            self.llm = LLM(task="reward", **options)
        self.tokenizer = tokenizer
        self.device = "cuda (vllm)"
        self.name = model_dir.name if model_dir.name not in ("", ".") else str(model_dir)
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.pad_id = int(pad) if pad is not None else 0
        self.bos = [tokenizer.bos_token_id] if getattr(tokenizer, "add_bos_token", False) else []
        self.parameters = sum(math.prod(shape) for shape in shapes.values())
        longest = max((len(t) for t in tokenizer.get_vocab()), default=1)
        self.max_chars = self.max_length * max(longest, 1) + 2 * (self.max_length + 1)
        self._pooling_params = raw_pooling_params()

    def forward(self, batch: list[Prepared]) -> list[Scored]:
        """One `encode` call for the batch (vLLM batches and schedules inside). Call it on `self.thread`."""
        outputs = self.llm.encode(
            [{"prompt_token_ids": item.input_ids} for item in batch],
            self._pooling_params,
            use_tqdm=False,
            pooling_task="token_classify",
        )
        results: list[Scored] = []
        for item, output in zip(batch, outputs, strict=True):
            data = output.outputs.data  # (T, 1) or (T,)
            values = (data[:, 0] if data.dim() == 2 else data).float().cpu().tolist()  # (T,)
            if len(values) != item.num_tokens:
                raise RuntimeError(f"vLLM returned {len(values)} token scores for {item.num_tokens} tokens")
            results.append(line_scores(item, values))
        return results

    def close(self) -> None:
        from services.rollout.backend_vllm import shutdown_llm

        self.thread.submit(shutdown_llm, getattr(self, "llm", None)).result()
        self.llm = None
        self.thread.shutdown(wait=True)


def raw_pooling_params() -> Any:
    from vllm import PoolingParams

    try:
        return PoolingParams(use_activation=False)
    except TypeError:  # releases before `use_activation`
        return PoolingParams(activation=False)
