"""What the vllm backends do on a machine without vLLM or a GPU (the CPU suite never needs vLLM):
`--backend vllm` refuses in one line, and the pure parts of the vllm backend agree with `hf`."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from services.rollout.backend import SamplingConfig
from services.rollout.backend_hf import sample_tokens
from services.rollout.backend_vllm import NEEDS_VLLM, sampling_logprob

PSGPO = [sys.executable, "-m", "services.cli"]
HAS_VLLM_AND_GPU = importlib.util.find_spec("vllm") is not None and torch.cuda.is_available()
no_vllm_here = pytest.mark.skipif(
    HAS_VLLM_AND_GPU, reason="vLLM and a GPU are present: the backend would start"
)


def run(args: list[str], env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*PSGPO, *args], capture_output=True, text=True, timeout=120, env={**os.environ, **(env or {})}
    )


def assert_one_line_refusal(proc: subprocess.CompletedProcess[str]) -> None:
    assert proc.returncode == 2, proc.stderr
    lines = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("psgpo: error:"), proc.stderr
    assert NEEDS_VLLM in lines[0] and "Traceback" not in proc.stderr


@no_vllm_here
def test_serve_rollout_backend_vllm_refuses_in_one_line(tiny_models: Path):
    # an unreachable Redis: the refusal must come first (before Redis and before any model load)
    proc = run(
        ["serve", "rollout", "--backend", "vllm", "--policy", str(tiny_models / "policy"),
         "--redis", "redis://127.0.0.1:1/0"]
    )  # fmt: skip
    assert_one_line_refusal(proc)


@no_vllm_here
def test_serve_prm_backend_vllm_refuses_in_one_line(tiny_models: Path):
    args = ["serve", "prm", "--model", str(tiny_models / "prm"), "--http-port", "0", "--grpc-port", "0"]
    assert_one_line_refusal(run(args, env={"PRM_BACKEND": "vllm"}))


@no_vllm_here
def test_serve_prm_backend_flag(tiny_models: Path):
    if "--backend" not in run(["serve", "prm", "--help"]).stdout:
        pytest.skip("services/cli.py has no `psgpo serve prm --backend` option yet (PRM_BACKEND works)")
    args = ["serve", "prm", "--backend", "vllm", "--model", str(tiny_models / "prm"), "--http-port", "0"]
    assert_one_line_refusal(run(args))


@pytest.mark.parametrize(
    "params",
    [
        SamplingConfig(temperature=0.7),
        SamplingConfig(temperature=1.3, top_k=7),
        SamplingConfig(temperature=0.8, top_p=0.6),
        SamplingConfig(temperature=1.0, top_k=20, top_p=0.9),
        SamplingConfig(temperature=1.0),
        SamplingConfig(temperature=0.0),
    ],
    ids=str,
)
def test_sampling_logprob_from_raw_logprobs_matches_hf_sampler(params: SamplingConfig):
    """With every token's raw logprob available, the reconstruction equals hf's processed logprob."""
    torch.manual_seed(0)
    logits = torch.randn(6, 50) * 3  # (A, V)
    uniforms = None if params.greedy else [0.05, 0.2, 0.4, 0.6, 0.8, 0.95]
    tokens, expected = sample_tokens(logits, params, uniforms)  # (A,), (A,)
    raw = torch.log_softmax(logits, dim=-1)  # (A, V)
    for row, token in enumerate(tokens.tolist()):
        candidates = dict(enumerate(raw[row].tolist()))
        got = sampling_logprob(candidates[token], token, candidates, params)
        assert got == pytest.approx(float(expected[row]), abs=1e-5)


def test_sampling_logprob_exact_with_top_k_candidates_only():
    """vLLM returns the top-k raw logprobs: enough for top-k sampling, whatever the vocabulary."""
    torch.manual_seed(1)
    params = SamplingConfig(temperature=0.9, top_k=5, top_p=0.8)
    logits = torch.randn(4, 300) * 2
    tokens, expected = sample_tokens(logits, params, [0.1, 0.3, 0.5, 0.7])
    raw = torch.log_softmax(logits, dim=-1)
    for row, token in enumerate(tokens.tolist()):
        values, ids = torch.topk(raw[row], 5)
        candidates = dict(zip(ids.tolist(), values.tolist(), strict=True))
        assert sampling_logprob(candidates[token], token, candidates, params) == pytest.approx(
            float(expected[row]), abs=1e-5
        )
