"""VllmBackend's glue on the CPU, with a stand-in `vllm` module (the real one needs a GPU): prompt ids,
seeds per request, logprobs, text and char ends rebuilt from token ids, stop strings, EOS, and the
hot-swap path (checks first, then `collective_rpc` into the worker extension, then the prefix cache)."""

from __future__ import annotations

import sys
import types
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

from services.rollout.backend import IncompatibleWeights, SamplingConfig
from services.rollout.backend_hf import HfBackend, read_safetensors


@dataclass
class FakeLogprob:
    logprob: float


class FakeSamplingParams:
    def __init__(self, **kwargs: Any) -> None:
        self.__dict__.update(kwargs)


class FakeLLM:
    """Greedy or seeded generation with the hf backend's model, answered in vLLM's output shapes."""

    instances: list[FakeLLM] = []

    def __init__(self, model: str, **kwargs: Any) -> None:
        assert kwargs["logprobs_mode"] == "raw_logprobs"
        self.kwargs = kwargs
        self.hf = HfBackend(model)
        self.prefix_resets = 0
        self.llm_engine = types.SimpleNamespace(model_config=types.SimpleNamespace(max_model_len=512))
        worker_cls = kwargs["worker_extension_cls"].rsplit(".", 1)
        ext = getattr(sys.modules[worker_cls[0]], worker_cls[1])
        model_obj = types.SimpleNamespace(load_weights=self._load)
        self.worker = type("Worker", (ext,), {})()
        self.worker.model_runner = types.SimpleNamespace(model=model_obj)
        FakeLLM.instances.append(self)

    def _load(self, weights):
        state = dict(weights)
        self.hf.model.load_state_dict(state, strict=False)
        return set(state)

    def collective_rpc(self, method: str, args: tuple = ()) -> list[Any]:
        return [getattr(self.worker, method)(*args)]

    def reset_prefix_cache(self) -> bool:
        self.prefix_resets += 1
        return True

    def generate(self, requests, sampling_params, use_tqdm=True):
        outs = []
        for req, sp in zip(requests, sampling_params, strict=True):
            params = SamplingConfig(
                temperature=sp.temperature, top_p=sp.top_p, top_k=max(sp.top_k, 0),
                max_new_tokens=sp.max_tokens, seed=sp.seed, stop=tuple(sp.stop or ()),
            )  # fmt: skip
            # the request's seed IS the sequence's random stream, as hf seeds each sequence
            chunk = self.hf._generate_chunk
            s = self.hf.run_on_model_thread(chunk, [req["prompt_token_ids"]], [sp.seed or 0], params)[0]
            k = sp.logprobs
            logprobs = []
            for tok, lp in zip(s.response_token_ids, s.logprobs, strict=True):
                entry = {tok: FakeLogprob(lp)}
                if k:  # the top-k raw logprobs would come too; the sampled token's is enough here
                    entry[tok] = FakeLogprob(lp)
                logprobs.append(entry)
            completion = types.SimpleNamespace(
                token_ids=s.response_token_ids, logprobs=logprobs, finish_reason=s.finish_reason
            )
            outs.append(types.SimpleNamespace(outputs=[completion]))
        return outs


@pytest.fixture
def fake_vllm(monkeypatch: pytest.MonkeyPatch):
    module = types.ModuleType("vllm")
    module.LLM = FakeLLM  # type: ignore[attr-defined]
    module.SamplingParams = FakeSamplingParams  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "vllm", module)
    monkeypatch.setattr("services.rollout.backend_vllm.require_vllm", lambda: None)
    FakeLLM.instances.clear()
    return module


def assert_same(a: list[list[Any]], b: list[list[Any]]) -> None:
    """Same samples; logprobs up to float noise (hf pads batched prompts, the stand-in runs each alone)."""
    assert [len(row) for row in a] == [len(row) for row in b]
    for x, y in zip([s for row in a for s in row], [s for row in b for s in row], strict=True):
        for name in ("prompt_token_ids", "response_token_ids", "text", "token_char_ends", "finish_reason"):
            assert getattr(x, name) == getattr(y, name), name
        assert x.stop_string == y.stop_string
        assert x.logprobs == pytest.approx(y.logprobs, abs=1e-4)
        assert x.sampling_logprobs == pytest.approx(y.sampling_logprobs, abs=1e-4)


def test_refuses_in_one_line_without_vllm(tiny_models: Path):
    from services.common.errors import UserError
    from services.rollout.backend_vllm import NEEDS_VLLM, VllmBackend

    with pytest.raises(UserError, match="pip install"):
        VllmBackend(tiny_models / "policy")
    assert "\n" not in NEEDS_VLLM


def test_greedy_stop_and_fields_match_hf(fake_vllm, tiny_models: Path):
    from services.rollout.backend_vllm import VllmBackend

    backend = VllmBackend(tiny_models / "policy")
    hf = HfBackend(tiny_models / "policy")
    try:
        prompts = ["def f(x):\n", "import os\n", "class A:\n"]
        for params in (
            SamplingConfig(temperature=0.0, max_new_tokens=20),
            SamplingConfig(temperature=0.0, max_new_tokens=30, stop=("\n", "(")),
        ):
            assert_same(hf.generate(prompts, 2, params), backend.generate(prompts, 2, params))
        assert backend.prompt_problems(["", "x"], 10) == hf.prompt_problems(["", "x"], 10)
        seeded = SamplingConfig(temperature=1.0, max_new_tokens=16)
        a = hf.generate(prompts, 2, seeded, seeds=[1, 2, 3])
        b = backend.generate(prompts, 2, seeded, seeds=[1, 2, 3])
        assert_same(
            a, b
        )  # the same per-(prompt, sample) seeds reach the engine; sampling_logprobs = raw at T=1
    finally:
        backend.close()
        hf.close()


def test_hot_swap_checks_first_then_loads_and_resets_prefix_cache(fake_vllm, tiny_models: Path):
    from services.rollout.backend_vllm import VllmBackend

    backend = VllmBackend(tiny_models / "policy")
    try:
        llm = FakeLLM.instances[-1]
        greedy = SamplingConfig(temperature=0.0, max_new_tokens=12)
        before = backend.generate(["def f(x):\n"], 1, greedy)
        original = read_safetensors(tiny_models / "policy")
        bad = [
            {k: v for k, v in original.items() if "layers.0." not in k},
            {**original, "extra.weight": torch.zeros(1)},
            {**original, "model.norm.weight": torch.zeros(3)},
            {**original, "model.norm.weight": torch.full_like(original["model.norm.weight"], float("nan"))},
        ]
        for weights in bad:
            with pytest.raises(IncompatibleWeights, match="version 0 kept"):
                backend.load_weights(weights, 1)
        assert backend.version == 0 and llm.prefix_resets == 0
        changed = {k: v + 0.3 * torch.randn_like(v) for k, v in original.items()}
        backend.load_weights(changed, 1)
        assert backend.version == 1 and llm.prefix_resets == 1
        after = backend.generate(["def f(x):\n"], 1, greedy)
        assert after[0][0].response_token_ids != before[0][0].response_token_ids
        backend.load_weights(tiny_models / "policy", 2)
        assert_same(backend.generate(["def f(x):\n"], 1, greedy), before)
        assert llm.prefix_resets == 2
    finally:
        backend.close()
