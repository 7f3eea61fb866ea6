"""The `hf` generation backend on the tiny policy: logprobs, greedy parity with transformers, seeds,
stops, character offsets, weight hot-swap, bad input."""

from __future__ import annotations

import json
import shutil
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from psgpo.v1.rollout_pb2 import SamplingParams
from services.common.lines import split_lines, token_index_for_lines
from services.rollout.backend import (
    REPLACEMENT_CHAR,
    GenerationBackend,
    IncompatibleWeights,
    IncrementalDetokenizer,
    Sample,
    SamplingConfig,
)
from services.rollout.backend_hf import HfBackend, read_safetensors, sample_tokens

PROMPTS = [
    "def add(a, b):\n",
    "# café → ✓ naïve\nimport os\n\n\ndef main():\n    ",
    "x",
    "class Stack:\n    def __init__(self):\n        self.items = []\n\n    def push(self, item):\n",
]
SAMPLED = SamplingConfig(temperature=0.9, top_p=0.95, top_k=50, max_new_tokens=24, seed=7)
GREEDY = SamplingConfig(temperature=0, max_new_tokens=24)
PROBS = [0.5, 0.25, 0.125, 0.0625, 0.0625]


@pytest.fixture(scope="module")
def backend(tiny_models: Path) -> Iterator[HfBackend]:
    b = HfBackend(tiny_models / "policy", max_batch_sequences=5)  # 4 prompts x n: chunks mix prompts
    yield b
    b.close()


@pytest.fixture(scope="module")
def reference(tiny_models: Path):
    return AutoModelForCausalLM.from_pretrained(tiny_models / "policy", dtype=torch.float32).eval()


def teacher_forced(model, sample: Sample) -> torch.Tensor:
    """Raw (temperature 1) logits at each response position, from ONE forward of prompt + response."""
    ids = torch.tensor([sample.prompt_token_ids + sample.response_token_ids])  # (1, P + R)
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0].float()  # (P + R, V)
    start = len(sample.prompt_token_ids) - 1
    return logits[start : start + len(sample.response_token_ids)]  # (R, V)


def token_logprobs(logits: torch.Tensor, tokens: list[int]) -> torch.Tensor:
    return torch.log_softmax(logits, dim=-1).gather(1, torch.tensor(tokens)[:, None])[:, 0]  # (R,)


def test_implements_the_interface_and_shapes(backend: HfBackend):
    assert isinstance(backend, GenerationBackend)
    out = backend.generate(PROMPTS, 3, SAMPLED)
    assert [len(row) for row in out] == [3] * len(PROMPTS)
    for prompt, row in zip(PROMPTS, out, strict=True):
        expected_prompt = backend.tokenizer(prompt, add_special_tokens=False)["input_ids"]
        for s in row:
            assert s.prompt_token_ids == expected_prompt
            assert 1 <= len(s.response_token_ids) <= SAMPLED.max_new_tokens
            assert len(s.logprobs) == len(s.sampling_logprobs) == len(s.token_char_ends)
            assert s.finish_reason == ("length" if len(s.response_token_ids) == 24 else "stop")
            assert all(lp <= 0 for lp in s.logprobs + s.sampling_logprobs)
            assert s.token_char_ends == sorted(s.token_char_ends) and s.token_char_ends[-1] <= len(s.text)
    assert backend.generate([], 2, SAMPLED) == []


def test_logprobs_equal_teacher_forced_recomputation(backend: HfBackend, reference):
    """What PPO relies on: the recorded logprobs are the raw policy's, position by position."""
    samples = [s for row in backend.generate(PROMPTS, 3, SAMPLED) for s in row]
    for s in samples:
        logits = teacher_forced(reference, s)  # (R, V)
        raw = token_logprobs(logits, s.response_token_ids)
        assert torch.allclose(torch.tensor(s.logprobs), raw, atol=1e-4)
        # processed: temperature, then top-k (top_p 0.95 hardly bites on a near-uniform tiny model)
        scaled = logits / SAMPLED.temperature
        kth = torch.topk(scaled, SAMPLED.top_k, dim=-1).values[:, -1:]
        processed = token_logprobs(scaled.masked_fill(scaled < kth, float("-inf")), s.response_token_ids)
        assert bool(torch.all(torch.tensor(s.sampling_logprobs) >= processed - 1e-4))
        assert bool(torch.all(torch.isfinite(processed)))  # every sampled token is inside the top-k set


@pytest.mark.parametrize(
    ("params", "expected"),
    [
        (SamplingConfig(temperature=1.0), PROBS),
        (SamplingConfig(temperature=0.5), [q * q / (43 / 128) for q in PROBS]),  # p^2, renormalised
        (SamplingConfig(top_k=2), [2 / 3, 1 / 3, 0, 0, 0]),
        (SamplingConfig(top_p=0.8), [4 / 7, 2 / 7, 1 / 7, 0, 0]),  # 0.5 + 0.25 < 0.8: a third token
    ],
)
def test_sampler_draws_the_processed_distribution(params: SamplingConfig, expected: list[float]):
    """Frequencies over 40k draws from one row's logits, and the logprob of each drawn token."""
    logits = torch.tensor(PROBS).log().repeat(40_000, 1) + 3.0  # (N, V), shifted: logits, not logprobs
    rng = torch.Generator().manual_seed(0)
    uniforms = torch.rand(40_000, generator=rng, dtype=torch.float64).tolist()
    tokens, logprobs = sample_tokens(logits, params, uniforms)  # (N,), (N,)
    freq = torch.bincount(tokens, minlength=5).double() / len(tokens)
    assert torch.allclose(freq, torch.tensor(expected, dtype=torch.float64), atol=0.01)
    drawn = torch.tensor(expected)[tokens].log()  # (N,)
    assert torch.allclose(logprobs, drawn, atol=1e-3)
    edge, _ = sample_tokens(logits[:2], params, [0.0, 1.0 - 2**-53])  # both ends of [0, 1)
    assert expected[edge[0]] > 0 and expected[edge[1]] > 0


def test_plain_sampling_logprobs_equal_raw(backend: HfBackend, reference):
    plain = SamplingConfig(temperature=1.0, max_new_tokens=16, seed=3)
    for row in backend.generate(PROMPTS[:2], 2, plain):
        for s in row:
            assert s.sampling_logprobs == pytest.approx(s.logprobs, abs=1e-5)


def test_greedy_equals_transformers_generate(backend: HfBackend, reference):
    out = backend.generate(PROMPTS, 2, GREEDY)  # batched with left padding
    for prompt, row in zip(PROMPTS, out, strict=True):
        ids = torch.tensor([row[0].prompt_token_ids])
        with torch.no_grad():
            hf = reference.generate(
                ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=24, pad_token_id=1
            )[0, ids.shape[1] :].tolist()
        for s in row:
            assert s.response_token_ids == hf[: len(s.response_token_ids)], prompt
            assert s.sampling_logprobs == [0.0] * len(s.response_token_ids)


def test_seed_reproducible_and_independent_of_batching(backend: HfBackend):
    first = backend.generate(PROMPTS, 3, SAMPLED)
    again = backend.generate(PROMPTS, 3, SAMPLED)
    other = backend.generate(PROMPTS, 3, SamplingConfig(**{**_fields(SAMPLED), "seed": 8}))
    ids = [[s.response_token_ids for s in row] for row in first]
    assert ids == [[s.response_token_ids for s in row] for row in again]
    assert ids != [[s.response_token_ids for s in row] for row in other]
    assert len({tuple(t) for t in ids[0]}) == 3  # the n samples of a prompt differ
    alone = backend.generate(PROMPTS[:1], 3, SAMPLED)  # other chunk composition, less padding
    assert [s.response_token_ids for s in alone[0]] == ids[0]


def test_per_prompt_seeds_batch_together_and_ignore_position(backend: HfBackend):
    """Tasks with different seeds share one call; a prompt's samples depend on its own seed only."""
    two = PROMPTS[:2]
    together = backend.generate(two, 2, SAMPLED, seeds=[11, 22])
    swapped = backend.generate(two[::-1], 2, SAMPLED, seeds=[22, 11])
    alone = backend.generate(PROMPTS[1:2], 2, SAMPLED, seeds=[22])
    ids = [[s.response_token_ids for s in row] for row in together]
    assert ids[1] == [s.response_token_ids for s in alone[0]]
    assert ids[::-1] == [[s.response_token_ids for s in row] for row in swapped]
    other = backend.generate(PROMPTS[1:2], 2, SAMPLED, seeds=[23])
    assert [s.response_token_ids for s in other[0]] != ids[1]
    with pytest.raises(ValueError, match="seeds"):
        backend.generate(two, 2, SAMPLED, seeds=[1])


def test_stop_strings_cut_text_and_end_sample(backend: HfBackend):
    ref = backend.generate(PROMPTS, 1, GREEDY)
    decode = backend.decode
    for row in ref:
        full = row[0]
        stop_a, stop_b = full.text[12:15], full.text[5:8]
        out = backend.generate(
            [PROMPTS[ref.index(row)]],
            1,
            SamplingConfig(temperature=0, max_new_tokens=24, stop=(stop_a, stop_b)),
        )[0][0]
        cut = min(full.text.find(stop_a), full.text.find(stop_b))
        k = next(
            k
            for k in range(1, 25)
            if stop_a in decode(full.response_token_ids[:k]) or stop_b in decode(full.response_token_ids[:k])
        )
        assert out.text == full.text[:cut]
        assert out.response_token_ids == full.response_token_ids[:k]  # stop tokens kept, none after
        assert out.finish_reason == "stop" and out.stop_string in (stop_a, stop_b)
        assert full.text.find(out.stop_string) == cut
        assert max(out.token_char_ends) == len(out.text)
    never = backend.generate(PROMPTS[:1], 1, SamplingConfig(temperature=0, max_new_tokens=8, stop=("§§",)))
    assert never[0][0].finish_reason == "length" and never[0][0].stop_string is None


def test_eos_ends_sample(backend: HfBackend, tiny_models: Path, tmp_path: Path, reference):
    """A second EOS id in generation_config.json (as instruct models list <|im_end|>) ends samples; the
    per-sequence seeds make every sample the reference sample cut after its first EOS, while the
    sequences that end early leave the batch and the KV cache."""
    plain = SamplingConfig(temperature=1.0, max_new_tokens=24, seed=11)
    refs = backend.generate(PROMPTS, 3, plain)
    eos = refs[0][0].response_token_ids[6]
    model_dir = shutil.copytree(tiny_models / "policy", tmp_path / "policy")
    config = json.loads((model_dir / "generation_config.json").read_text())
    config["eos_token_id"] = [config["eos_token_id"], eos]
    (model_dir / "generation_config.json").write_text(json.dumps(config))
    with_eos = HfBackend(model_dir, max_batch_sequences=12)
    try:
        out = with_eos.generate(PROMPTS, 3, plain)
    finally:
        with_eos.close()
    lengths = set()
    for ref_row, row in zip(refs, out, strict=True):
        for ref, s in zip(ref_row, row, strict=True):
            ids = ref.response_token_ids
            cut = ids.index(eos) + 1 if eos in ids else len(ids)
            assert s.response_token_ids == ids[:cut]  # EOS kept (PPO trains the decision to stop)
            if cut < len(ids) or ids[-1] == eos:
                assert s.finish_reason == "stop" and s.stop_string is None
                assert s.text == backend.decode(ids[: cut - 1]).rstrip(REPLACEMENT_CHAR)
                assert s.token_char_ends[-1] == len(s.text)
            raw = token_logprobs(teacher_forced(reference, s), s.response_token_ids)
            assert torch.allclose(torch.tensor(s.logprobs), raw, atol=1e-4)
            lengths.add(len(s.response_token_ids))
    assert len(out[0][0].response_token_ids) <= 7 and max(lengths) == 24


def test_token_char_ends_match_prefix_decoding(backend: HfBackend):
    """text[:ends[t]] is the decoding of tokens 0..t minus a trailing incomplete character (U+FFFD)."""
    samples = [
        s for row in backend.generate(PROMPTS, 4, SamplingConfig(max_new_tokens=32, seed=5)) for s in row
    ]
    assert any(REPLACEMENT_CHAR in backend.decode(s.response_token_ids) for s in samples)  # split bytes seen
    for s in samples:
        ended_by_eos = s.finish_reason == "stop" and s.stop_string is None
        ids = s.response_token_ids[:-1] if ended_by_eos else s.response_token_ids  # EOS adds no text
        if ended_by_eos:
            assert s.response_token_ids[-1] in backend.eos_token_ids and s.token_char_ends[-1] == len(s.text)
        for t, end in enumerate(s.token_char_ends[: len(ids)]):
            decoded = backend.decode(ids[: t + 1])
            assert decoded.startswith(s.text[:end])
            assert set(decoded[end:]) <= {REPLACEMENT_CHAR}
        full = backend.decode(ids)
        assert full.startswith(s.text) and set(full[len(s.text) :]) <= {REPLACEMENT_CHAR}
        lines = split_lines(s.text)
        placed = token_index_for_lines(lines, s.token_char_ends)
        assert all(-1 <= i < len(s.response_token_ids) for i in placed)


def test_detokenizer_multibyte_characters_split_across_byte_tokens(backend: HfBackend):
    """'a✓é' as one byte-level token per byte: a character counts for the token that completes it."""
    byte_token = _bytes_to_unicode()
    ids = backend.tokenizer.convert_tokens_to_ids([byte_token[b] for b in "a✓é".encode()])
    assert len(ids) == 6 and backend.tokenizer.unk_token_id not in ids
    detok = IncrementalDetokenizer(backend.decode)
    pieces = [detok.add(i) for i in ids]
    assert pieces == ["a", "", "", "✓", "", "é"]
    assert detok.text == "a✓é" and detok.ends == [1, 1, 1, 2, 2, 3]


def test_load_weights_hot_swap_and_refusals(tiny_models: Path, tmp_path: Path):
    b = HfBackend(tiny_models / "policy")
    try:
        base = _greedy(b)
        original = read_safetensors(tiny_models / "policy")  # as saved: tied lm_head.weight absent
        gen = torch.Generator().manual_seed(0)
        perturbed = {k: v + 0.05 * torch.randn(v.shape, generator=gen) for k, v in original.items()}
        b.load_weights(perturbed, 1)
        assert b.version == 1
        swapped = _greedy(b)
        assert swapped != base

        bad_cases = {
            "missing keys model.norm.weight": {
                k: v for k, v in perturbed.items() if k != "model.norm.weight"
            },
            "shape mismatch model.norm.weight": {**perturbed, "model.norm.weight": torch.ones(3)},
            "unexpected keys extra.weight": {**perturbed, "extra.weight": torch.ones(3)},
            "non-finite": {**perturbed, "model.norm.weight": perturbed["model.norm.weight"] * float("nan")},
            "tied": {**perturbed, "lm_head.weight": torch.zeros_like(perturbed["model.embed_tokens.weight"])},
        }
        for message, state in bad_cases.items():
            with pytest.raises(IncompatibleWeights, match=message):
                b.load_weights(state, 2)
        garbage = tmp_path / "garbage.safetensors"
        garbage.write_bytes(b"not a safetensors file")
        with pytest.raises(IncompatibleWeights, match="cannot read"):
            b.load_weights(garbage, 2)
        with pytest.raises(IncompatibleWeights, match="does not exist"):
            b.load_weights(tmp_path / "nowhere", 2)
        assert b.version == 1 and _greedy(b) == swapped  # the old weights keep working

        b.load_weights(tiny_models / "policy" / "model.safetensors", 2)  # a file
        assert b.version == 2 and _greedy(b) == base
        b.load_weights({**perturbed, "lm_head.weight": perturbed["model.embed_tokens.weight"]}, 3)
        assert _greedy(b) == swapped
        b.load_weights(tiny_models / "policy", 4)  # a model dir
        assert b.version == 4 and _greedy(b) == base
    finally:
        b.close()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"temperature": -0.1}, "temperature must be >= 0"),
        ({"temperature": float("nan")}, "temperature must be >= 0"),
        ({"top_p": 0.0}, r"top_p must be in \(0, 1\]"),
        ({"top_p": 1.5}, r"top_p must be in \(0, 1\]"),
        ({"top_k": -1}, "top_k must be an integer >= 0"),
        ({"max_new_tokens": 0}, "max_new_tokens must be an integer > 0"),
        ({"max_new_tokens": 2.5}, "max_new_tokens must be an integer > 0"),
        ({"seed": "1"}, "seed must be an integer"),
        ({"stop": "\n"}, "stop must be a sequence of strings"),
        ({"stop": ("",)}, "stop strings must be non-empty"),
    ],
)
def test_bad_sampling_params(kwargs: dict, message: str):
    with pytest.raises(ValueError, match=message):
        SamplingConfig(**kwargs)


def test_bad_generate_input(backend: HfBackend):
    params = SamplingConfig(max_new_tokens=8)
    with pytest.raises(ValueError, match="n must be an integer >= 1"):
        backend.generate(PROMPTS, 0, params)
    with pytest.raises(ValueError, match="prompts must be a list"):
        backend.generate("def f():", 1, params)
    long_prompt = "x = 1  # é\n" * 200
    with pytest.raises(ValueError, match=r"prompts\[1\]: the prompt is empty"):
        backend.generate(["x", ""], 1, params)
    with pytest.raises(ValueError, match=r"prompts\[0\]: \d+ prompt tokens \+ max_new_tokens 8 exceed"):
        backend.generate([long_prompt], 1, params)
    problems = backend.prompt_problems(["x", "", long_prompt], 8)
    assert problems[0] is None and "empty" in problems[1] and "exceed" in problems[2]
    assert backend.prompt_problems([], 8) == []


def test_from_proto_reads_unset_fields_as_off():
    cfg = SamplingConfig.from_proto(SamplingParams(temperature=0.5, max_new_tokens=9, stop=["\n\n"]))
    assert cfg == SamplingConfig(
        temperature=0.5, top_p=1.0, top_k=0, max_new_tokens=9, seed=None, stop=("\n\n",)
    )
    with pytest.raises(ValueError, match="max_new_tokens"):
        SamplingConfig.from_proto(SamplingParams(temperature=1.0))


def test_calls_from_many_threads_and_from_the_model_thread(backend: HfBackend):
    params = SamplingConfig(max_new_tokens=8, seed=2)
    expected = [s.response_token_ids for s in backend.generate(PROMPTS[:1], 2, params)[0]]
    results: list[list[list[int]]] = []

    def call() -> None:
        results.append([s.response_token_ids for s in backend.generate(PROMPTS[:1], 2, params)[0]])

    threads = [threading.Thread(target=call) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [expected] * 3
    nested = backend.submit(backend.generate, PROMPTS[:1], 2, params).result(timeout=60)  # no deadlock
    assert [s.response_token_ids for s in nested[0]] == expected


def _greedy(b: HfBackend) -> list[list[int]]:
    return [row[0].response_token_ids for row in b.generate(PROMPTS, 1, SamplingConfig(0, max_new_tokens=12))]


def _fields(cfg: SamplingConfig) -> dict:
    return {name: getattr(cfg, name) for name in cfg.__dataclass_fields__}


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table, which byte-level BPE vocabularies are written in."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    table, extra = {}, 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_on_gpu_logprobs_greedy_and_seeds(tiny_models: Path):
    """The same contract on CUDA (float32 weights so the tolerance stays tight)."""
    gpu = HfBackend(tiny_models / "policy", device="cuda", dtype="float32", max_batch_sequences=5)
    try:
        model = (
            AutoModelForCausalLM.from_pretrained(tiny_models / "policy", dtype=torch.float32).cuda().eval()
        )
        samples = gpu.generate(PROMPTS, 3, SAMPLED)
        again = gpu.generate(PROMPTS, 3, SAMPLED)
        assert [[s.response_token_ids for s in row] for row in samples] == [
            [s.response_token_ids for s in row] for row in again
        ]
        for s in (s for row in samples for s in row):
            ids = torch.tensor([s.prompt_token_ids + s.response_token_ids], device="cuda")
            with torch.no_grad():
                logits = model(input_ids=ids).logits[0, len(s.prompt_token_ids) - 1 : -1].float().cpu()
            assert torch.allclose(
                torch.tensor(s.logprobs), token_logprobs(logits, s.response_token_ids), atol=1e-3
            )
        for row in gpu.generate(PROMPTS, 1, GREEDY):
            ids = torch.tensor([row[0].prompt_token_ids], device="cuda")
            with torch.no_grad():
                hf = model.generate(
                    ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=24
                )
            assert (
                row[0].response_token_ids == hf[0, ids.shape[1] :].tolist()[: len(row[0].response_token_ids)]
            )
    finally:
        gpu.close()
