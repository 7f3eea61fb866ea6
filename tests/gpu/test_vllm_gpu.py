"""The vllm backends against hf on one CUDA GPU (skipped with a reason elsewhere): the checks of
scripts/gpu_check.py as tests. (a) PRM line scores, (b) greedy tokens, (c) hot-swap, (d) logprobs."""

from __future__ import annotations

import importlib.util
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (vLLM runs on CUDA only)"),
    pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="needs vLLM: pip install .[vllm]"),
]

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def checks() -> Any:
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "scripts" / "gpu_check.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def vllm_backend(tiny_models: Path) -> Iterator[Any]:
    from services.rollout.backend_vllm import VllmBackend

    backend = VllmBackend(tiny_models / "policy", gpu_memory_utilization=0.3, enforce_eager=True)
    yield backend
    backend.close()


@pytest.fixture(scope="module")
def reference(checks: Any, tiny_models: Path) -> Any:
    return checks.load_reference(tiny_models)


def test_a_prm_line_scores_match_hf(checks: Any, tiny_models: Path):
    result = checks.check_prm(tiny_models)
    assert result["passed"], result


def test_b_greedy_same_tokens_as_hf(checks: Any, vllm_backend: Any, reference: Any, tiny_models: Path):
    from services.rollout.backend_hf import HfBackend

    hf = HfBackend(tiny_models / "policy", device="cuda", dtype="float32")
    try:
        result = checks.check_greedy(vllm_backend, hf, reference)
    finally:
        hf.close()
    assert result["passed"], result


def test_d_logprobs_equal_teacher_forced(checks: Any, vllm_backend: Any, reference: Any):
    result = checks.check_logprobs(vllm_backend, reference)
    assert result["passed"], result


def test_sample_fields_and_stop_strings(vllm_backend: Any):
    from services.rollout.backend import GenerationBackend, SamplingConfig

    assert isinstance(vllm_backend, GenerationBackend)
    params = SamplingConfig(temperature=1.0, top_k=20, max_new_tokens=40, seed=5, stop=("\n",))
    for row in vllm_backend.generate(["def f(x):\n", "import sys\n"], 3, params):
        for s in row:
            assert len(s.logprobs) == len(s.sampling_logprobs) == len(s.token_char_ends)
            assert "\n" not in s.text
            assert s.finish_reason == (
                "stop" if s.stop_string or len(s.response_token_ids) < 40 else "length"
            )
            assert s.token_char_ends == sorted(s.token_char_ends) and s.token_char_ends[-1] <= len(s.text)
            assert all(lp <= 1e-6 for lp in s.logprobs + s.sampling_logprobs)


def test_c_hot_swap_changes_outputs(checks: Any, vllm_backend: Any, tiny_models: Path):
    result = checks.check_hot_swap(vllm_backend, tiny_models)  # last: it changes then restores the weights
    assert result["passed"], result
