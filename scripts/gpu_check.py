"""The prepared GPU check of issue 9: `hf` vs `vllm` backends on the tiny models, one GPU, < 10 minutes.

    python scripts/gpu_check.py --models runs/tiny --out runs/gpu_check.json

Checks (each prints PASS/FAIL and its numbers; the exit status is 1 if any fails):
  (a) PRM line scores: `VllmPrmScorer` vs `PrmScorer` on the same PRM, within tolerance.
  (b) greedy generation: every token vLLM picks is the argmax of a float32 teacher-forced `hf`
      forward (up to `--tie-tol` in logits: the tiny models are random, with near-ties that bfloat16
      kernels may break either way); the exact-match share of whole responses is reported too.
  (c) weight hot-swap: new weights change the greedy outputs; the old weights restore them exactly
      (the prefix cache is reset); a bad state dict is refused and changes nothing.
  (d) logprobs: vLLM's raw-policy `logprobs` vs a float32 teacher-forced `hf` recomputation.
  Throughput: generated tokens/s of both backends on the same prompts and sampling parameters.

The functions are imported by tests/gpu/test_vllm_gpu.py (pytest -m gpu).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

PRM_ITEMS = [
    ("def add(a, b):\n", "    return a + b\n"),
    ("# sort a list\n", "def f(xs):\n    ys = sorted(xs)\n\n    # done\n    return ys"),
    ("Write fizzbuzz.\n", "for i in range(1, 16):\n    if i % 15 == 0:\n        print('FizzBuzz')\n"
     "    else:\n        print(i)\n"),
    ("", "x = 1\ny = x * 2\nz = y - x\n"),
]  # fmt: skip
PROMPTS = [
    "def fibonacci(n):\n",
    "import os\n\n\ndef list_files(path):\n",
    "class Stack:\n    def __init__(self):\n",
    "# compute the mean of a list\n",
]


def check_prm(models: Path, atol: float = 0.05, engine_args: dict | None = None) -> dict[str, Any]:
    """(a) line scores of both PRM backends (hf float32 on the GPU vs vllm bfloat16)."""
    from services.prm.scorer import PrmScorer
    from services.prm.scorer_vllm import VllmPrmScorer

    hf = PrmScorer(models / "prm", device="cuda", dtype="float32")
    vllm = VllmPrmScorer(
        models / "prm", gpu_memory_utilization=0.2, enforce_eager=True, engine_args=engine_args
    )
    try:
        prepared_hf, prepared_vllm = hf.prepare(PRM_ITEMS), vllm.prepare(PRM_ITEMS)
        same_ids = [a.input_ids for a in prepared_hf] == [b.input_ids for b in prepared_vllm]
        a = hf.thread.submit(hf.forward, prepared_hf).result()
        b = vllm.thread.submit(vllm.forward, prepared_vllm).result()
        diffs: list[float] = []
        layout_ok = True
        for x, y in zip(a, b, strict=True):
            layout_ok &= [s is None for s in x.line_scores] == [s is None for s in y.line_scores]
            diffs += [abs(p - q) for p, q in zip(x.line_scores, y.line_scores, strict=True) if p is not None
                      and q is not None]  # fmt: skip
        scale = max(1.0, *(abs(s) for x in a for s in x.line_scores if s is not None))
        max_diff = max(diffs) if diffs else 0.0
        return {
            "passed": bool(same_ids and layout_ok and diffs and max_diff <= atol * scale),
            "lines_compared": len(diffs),
            "max_abs_diff": max_diff,
            "tolerance": atol * scale,
            "same_token_ids": same_ids,
            "hf_scores": [x.line_scores for x in a],
            "vllm_scores": [y.line_scores for y in b],
        }
    finally:
        vllm.close()
        hf.thread.shutdown(wait=True)


def teacher_forced_logits(model: Any, prompt: list[int], response: list[int]) -> Any:
    """float32 logits (R, V) predicting each response token, from one forward of prompt + response."""
    import torch

    ids = torch.tensor([prompt + response], device=model.device)  # (1, P + R)
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0].float()  # (P + R, V)
    start = len(prompt) - 1
    return logits[start : start + len(response)]  # (R, V)


def load_reference(models: Path) -> Any:
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(models / "policy", dtype=torch.float32).cuda().eval()


def check_greedy(vllm: Any, hf: Any, reference: Any, max_new_tokens: int = 48, tie_tol: float = 0.05) -> dict:
    """(b) greedy: vLLM's tokens are float32 argmaxes (up to near-ties); exact-match share reported."""
    from services.rollout.backend import SamplingConfig

    params = SamplingConfig(temperature=0.0, max_new_tokens=max_new_tokens)
    a, b = hf.generate(PROMPTS, 1, params), vllm.generate(PROMPTS, 1, params)
    worst_gap, tokens = 0.0, 0
    for row in b:
        s = row[0]
        logits = teacher_forced_logits(reference, s.prompt_token_ids, s.response_token_ids)  # (R, V)
        chosen = logits.gather(1, logits.new_tensor(s.response_token_ids).long()[:, None])[:, 0]  # (R,)
        worst_gap = max(worst_gap, float((logits.max(dim=-1).values - chosen).max()))
        tokens += len(s.response_token_ids)
    exact = sum(x[0].response_token_ids == y[0].response_token_ids for x, y in zip(a, b, strict=True))
    same_prompts = all(x[0].prompt_token_ids == y[0].prompt_token_ids for x, y in zip(a, b, strict=True))
    return {
        "passed": bool(same_prompts and worst_gap <= tie_tol),
        "tokens_checked": tokens,
        "worst_argmax_gap": worst_gap,
        "tie_tolerance": tie_tol,
        "exact_match_responses": f"{exact}/{len(PROMPTS)}",
        "same_prompt_ids": same_prompts,
    }


def check_hot_swap(vllm: Any, models: Path) -> dict[str, Any]:
    """(c) new weights change greedy outputs; the originals restore them; a bad dict is refused."""
    import torch

    from services.rollout.backend import IncompatibleWeights, SamplingConfig
    from services.rollout.backend_hf import read_safetensors

    params = SamplingConfig(temperature=0.0, max_new_tokens=32)
    ids = lambda: [r[0].response_token_ids for r in vllm.generate(PROMPTS, 1, params)]  # noqa: E731
    before = ids()
    original = read_safetensors(models / "policy")
    generator = torch.Generator().manual_seed(1)
    changed = {
        k: v + 0.5 * torch.randn(v.shape, generator=generator).to(v.dtype) if v.is_floating_point() else v
        for k, v in original.items()
    }
    start = time.perf_counter()
    vllm.load_weights(changed, 1)
    swap_s = time.perf_counter() - start
    after = ids()
    refused = False
    try:
        vllm.load_weights({k: v for k, v in original.items() if "layers.0." not in k}, 2)
    except IncompatibleWeights:
        refused = True
    after_refusal, version_kept = ids(), vllm.version == 1
    vllm.load_weights(models / "policy", 3)
    restored = ids()
    return {
        "passed": bool(after != before and refused and after_refusal == after and version_kept
                       and restored == before),
        "outputs_changed": after != before,
        "bad_weights_refused": refused,
        "refusal_kept_outputs_and_version": after_refusal == after and version_kept,
        "restore_gives_original_outputs": restored == before,
        "swap_seconds": round(swap_s, 3),
    }  # fmt: skip


def check_logprobs(vllm: Any, reference: Any, atol: float = 0.1) -> dict[str, Any]:
    """(d) raw-policy logprobs of sampled tokens vs float32 teacher forcing (and sampling_logprobs equal
    to them at T=1; seeded sampling reproducible)."""
    import torch

    from services.rollout.backend import SamplingConfig

    params = SamplingConfig(temperature=1.0, max_new_tokens=48, seed=7)
    worst, tokens, identity = 0.0, 0, True
    for row in vllm.generate(PROMPTS, 2, params):
        for s in row:
            logits = teacher_forced_logits(reference, s.prompt_token_ids, s.response_token_ids)
            expected = torch.log_softmax(logits, dim=-1).gather(
                1, logits.new_tensor(s.response_token_ids).long()[:, None]
            )[:, 0]  # (R,)
            got = torch.tensor(s.logprobs, device=expected.device)
            worst = max(worst, float((got - expected).abs().max()))
            tokens += len(s.logprobs)
            identity &= s.sampling_logprobs == s.logprobs
    again = vllm.generate(PROMPTS, 2, params)
    reproducible = [[s.response_token_ids for s in r] for r in again] == [
        [s.response_token_ids for s in r] for r in vllm.generate(PROMPTS, 2, params)
    ]
    return {
        "passed": bool(worst <= atol and identity and reproducible),
        "tokens_checked": tokens,
        "max_abs_diff": worst,
        "tolerance": atol,
        "sampling_logprobs_equal_raw_at_T1": identity,
        "seeded_reproducible": reproducible,
    }


def throughput(
    backend: Any, prompts: int, n: int, max_new_tokens: int, seed: int | None = 3
) -> dict[str, Any]:
    """Generated tokens/s; seed=None: an unseeded task (vLLM then samples all requests batched)."""
    from services.rollout.backend import SamplingConfig

    params = SamplingConfig(temperature=1.0, max_new_tokens=max_new_tokens, seed=seed)
    batch = [PROMPTS[i % len(PROMPTS)] + f"# variant {i}\n" for i in range(prompts)]
    backend.generate(batch[:2], 1, SamplingConfig(temperature=1.0, max_new_tokens=8))  # warm-up
    start = time.perf_counter()
    out = backend.generate(batch, n, params)
    seconds = time.perf_counter() - start
    tokens = sum(len(s.response_token_ids) for row in out for s in row)
    return {"sequences": prompts * n, "tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", type=Path, default=Path("runs/tiny"), help="psgpo models tiny --out DIR")
    parser.add_argument("--out", type=Path, default=Path("runs/gpu_check.json"))
    parser.add_argument("--prompts", type=int, default=64, help="throughput: prompts")
    parser.add_argument("--n", type=int, default=8, help="throughput: samples per prompt")
    parser.add_argument("--max-new-tokens", type=int, default=256, help="throughput: response length cap")
    parser.add_argument("--tie-tol", type=float, default=0.05, help="(b): logit gap counted as a tie")
    parser.add_argument("--eager", action="store_true", help="policy engine without CUDA graphs/compile")
    parser.add_argument(
        "--attention-backend", default=None, help="vLLM attention backend (e.g. TRITON_ATTN); default: vLLM's"
    )
    args = parser.parse_args()

    import torch

    if not torch.cuda.is_available():
        print("gpu_check: no CUDA GPU visible", file=sys.stderr)
        return 2
    import vllm as vllm_module

    from services.rollout.backend_hf import HfBackend
    from services.rollout.backend_vllm import VllmBackend

    report: dict[str, Any] = {
        "gpu": torch.cuda.get_device_name(0),
        "torch": torch.__version__,
        "vllm": vllm_module.__version__,
        "started": time.strftime("%F %T"),
    }
    print(f"gpu_check: {report}", flush=True)
    t0 = time.perf_counter()

    def record(name: str, fn: Any, *fn_args: Any) -> None:
        start = time.perf_counter()
        try:
            result = fn(*fn_args)
        except Exception as exc:  # a crash is a failed check, reported with the rest
            result = {"passed": False, "error": f"{type(exc).__name__}: {exc}"}
        result["check_seconds"] = round(time.perf_counter() - start, 1)
        report[name] = result
        summary = {k: v for k, v in result.items() if not k.endswith("_scores")}
        print(f"{'PASS' if result['passed'] else 'FAIL'} {name}: {json.dumps(summary)}", flush=True)

    engine_args = {"attention_backend": args.attention_backend} if args.attention_backend else {}
    report["vllm_engine"] = {"enforce_eager": args.eager, **engine_args}
    record("a_prm_line_scores", check_prm, args.models, 0.05, engine_args)
    vllm = VllmBackend(
        args.models / "policy", gpu_memory_utilization=0.3, enforce_eager=args.eager, engine_args=engine_args
    )
    hf = HfBackend(args.models / "policy", device="cuda", dtype="bfloat16", max_batch_sequences=256)
    reference = load_reference(args.models)
    record("b_greedy_same_tokens", check_greedy, vllm, hf, reference, 48, args.tie_tol)
    record("d_logprobs_vs_teacher_forced", check_logprobs, vllm, reference)
    rows = {}
    for name, backend in (("hf", hf), ("vllm", vllm)):
        for seed in (3, None):
            label = f"{name}, {'seeded' if seed is not None else 'unseeded'}"
            rows[label] = throughput(backend, args.prompts, args.n, args.max_new_tokens, seed)
    report["throughput"] = rows
    record("c_hot_swap", check_hot_swap, vllm, args.models)  # last: it changes the weights
    report["total_seconds"] = round(time.perf_counter() - t0, 1)

    print(f"\nthroughput ({report['gpu']}, {args.prompts} prompts x {args.n} samples, T=1, "
          f"max {args.max_new_tokens} new tokens):")  # fmt: skip
    print("| backend | sequences | tokens | seconds | tokens/s |")
    print("|---|---:|---:|---:|---:|")
    for name, row in rows.items():
        cells = [name, row["sequences"], row["tokens"], f"{row['seconds']:.2f}", f"{row['tokens_per_s']:.0f}"]
        print("| " + " | ".join(map(str, cells)) + " |")
    passed = all(v.get("passed") for k, v in report.items() if k[:2] in ("a_", "b_", "c_", "d_"))
    report["passed"] = passed
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(
        f"\n{'ALL PASSED' if passed else 'SOME CHECKS FAILED'} in {report['total_seconds']} s -> {args.out}"
    )
    vllm.close()
    hf.close()
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
