"""The miniature benchmark: procedurally generated, seeded Python function-writing tasks with real unit
tests, sized for a ~1M-parameter policy trained on 2 CPU cores.

Why this family (DESIGN.md, "Measured on a 2-core ... machine"): a tiny model learns templates and
single-token copies fast, and long copy chains slowly. So every task is a template whose function
name carries its parameters (`count_above_7`, `clamp_2_8`, `apply_add3_mul2_sub1`): the body is fixed
by the family, and each parameter is one digit the model must copy from the name into the right line.
Solutions run from 2 to 10 lines; the `pipeline` and `stats` families are the long ones (their
length grows with `steps`), and mistakes happen mid-program (a wrong digit on line 4 of 7), which is
what line-level credit is for. Held-out tasks use parameter combinations never seen in training, so
passing them needs the copy, not memorisation.

    python -m trainer.tasks.mini --out runs/mini       (or `psgpo tasks mini --out DIR`)

writes train.jsonl / test.jsonl (task format of trainer/data.py: prompt, assert tests, stop strings,
metadata {family, lines, length}) and sft.jsonl ({"prompt", "solution"} for `psgpo train sft`).
"""

from __future__ import annotations

import argparse
import json
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

STOP = ["\ndef ", "\nclass ", "\nif __name__", "\nprint("]
LONG_LINES = 6  # a solution with at least this many lines is "long" (the paper's long-response split)


@dataclass(frozen=True)
class MiniTask:
    id: str
    family: str
    name: str
    prompt: str  # "def NAME(ARGS):\n": the policy writes the body
    solution: str  # the canonical body
    inputs: list[Any] = field(default_factory=list)  # one argument per test

    @property
    def lines(self) -> int:
        return sum(1 for line in self.solution.splitlines() if line.strip())

    def expected(self) -> list[Any]:
        """Expected outputs, from running the canonical solution (generated here, trusted)."""
        namespace: dict[str, Any] = {}
        exec(self.prompt + self.solution, namespace)  # noqa: S102 - our own template, not model output
        return [namespace[self.name](arg) for arg in self.inputs]

    def to_json(self) -> dict[str, Any]:
        pairs = zip(self.inputs, self.expected(), strict=True)
        asserts = "".join(f"assert {self.name}({a!r}) == {e!r}\n" for a, e in pairs)
        return {
            "id": self.id,
            "prompt": self.prompt,
            "tests": {"kind": "assert", "code": asserts},
            "stop": STOP,
            "metadata": {
                "family": self.family,
                "lines": str(self.lines),
                "length": "long" if self.lines >= LONG_LINES else "short",
                "solution": self.solution,
            },
        }


# Each family: params -> (name, argument name, body). Parameters are digits 1..9.
Family = Callable[[tuple[int, ...]], tuple[str, str, str]]


def _scale(p: tuple[int, ...]) -> tuple[str, str, str]:
    (k,) = p
    body = f"    out = []\n    for x in xs:\n        out.append(x * {k})\n    return out\n"
    return f"scale_by_{k}", "xs", body


def _count_above(p: tuple[int, ...]) -> tuple[str, str, str]:
    (k,) = p
    body = f"    count = 0\n    for x in xs:\n        if x > {k}:\n            count += 1\n    return count\n"
    return f"count_above_{k}", "xs", body


def _sum_multiples(p: tuple[int, ...]) -> tuple[str, str, str]:
    (k,) = p
    body = f"    total = 0\n    for x in xs:\n        if x % {k} == 0:\n            total += x\n"
    body += "    return total\n"
    return f"sum_multiples_of_{k}", "xs", body


def _clamp(p: tuple[int, ...]) -> tuple[str, str, str]:
    lo, hi = p
    body = f"    if x < {lo}:\n        return {lo}\n    if x > {hi}:\n        return {hi}\n    return x\n"
    return f"clamp_{lo}_{hi}", "x", body


def _poly(p: tuple[int, ...]) -> tuple[str, str, str]:
    a, b, c = p
    body = f"    y = {a} * x * x\n    y = y + {b} * x\n    y = y + {c}\n    return y\n"
    return f"poly_{a}_{b}_{c}", "x", body


def _stats(p: tuple[int, ...]) -> tuple[str, str, str]:
    (k,) = p
    body = (
        "    count = 0\n    total = 0\n    largest = None\n    for x in xs:\n"
        f"        if x > {k}:\n            count += 1\n            total += x\n"
        "            if largest is None or x > largest:\n                largest = x\n"
        "    return count, total, largest\n"
    )
    return f"stats_above_{k}", "xs", body


OPS = {"add": "+", "sub": "-", "mul": "*"}


def _pipeline(p: tuple[int, ...]) -> tuple[str, str, str]:
    """p = (op index, digit, op index, digit, ...): one `x = x op k` line per step."""
    names = list(OPS)
    steps = [(names[p[i] % 3], p[i + 1]) for i in range(0, len(p), 2)]
    name = "apply_" + "_".join(f"{op}{k}" for op, k in steps)
    body = "".join(f"    x = x {OPS[op]} {k}\n" for op, k in steps) + "    return x\n"
    return name, "x", body


FAMILIES: dict[str, tuple[Family, int]] = {  # name -> (builder, number of digit parameters)
    "scale": (_scale, 1),
    "count_above": (_count_above, 1),
    "sum_multiples": (_sum_multiples, 1),
    "clamp": (_clamp, 2),
    "poly": (_poly, 3),
    "stats": (_stats, 1),
}


def _inputs(arg: str, rng: random.Random, params: tuple[int, ...]) -> list[Any]:
    """Test arguments: random ones plus, for each digit parameter, its neighbours (boundaries are where a
    wrong digit shows: `clamp_8_9` returning 8 above 9 must fail)."""
    if arg == "xs":
        lists = [[rng.randint(-3, 12) for _ in range(rng.randint(1, 6))] for _ in range(3)]
        near = [v for p in params for v in (p - 1, p, p + 1)]
        return [*lists, rng.sample(near, min(len(near), 6)), []]
    near = sorted({v for p in params for v in (p - 1, p + 1)})
    return [rng.randint(-5, 12), rng.randint(-5, 12), *near][:8]


def _params(family: str, arity: int, rng: random.Random) -> tuple[int, ...]:
    if family == "clamp":
        lo = rng.randint(1, 7)
        return lo, rng.randint(lo + 1, 9)
    if family == "sum_multiples":
        return (rng.randint(2, 9),)
    return tuple(rng.randint(1, 9) for _ in range(arity))


def _pool(family: str, rng: random.Random, size: int, max_steps: int) -> list[MiniTask]:
    """Unique tasks of one family: every parameter combination, or `size` sampled ones if there are more."""
    if family == "pipeline":
        combos = {
            tuple(v for _ in range(steps) for v in (rng.randint(0, 2), rng.randint(1, 9)))
            for steps in [rng.randint(1, max_steps) for _ in range(size * 3)]
        }
        builder: Family = _pipeline
    else:
        builder, arity = FAMILIES[family]
        if family == "clamp":
            combos = {(lo, hi) for lo in range(1, 9) for hi in range(lo + 1, 10)}
        elif family == "sum_multiples":
            combos = {(k,) for k in range(2, 10)}
        elif arity == 1:
            combos = {(k,) for k in range(1, 10)}
        else:
            combos = {tuple(rng.randint(1, 9) for _ in range(arity)) for _ in range(size * 3)}
    tasks = {}
    for params in sorted(combos):
        name, arg, body = builder(params)
        inputs = _inputs(arg, rng, params[1::2] if family == "pipeline" else params)
        tasks[name] = MiniTask(f"mini-{name}", family, name, f"def {name}({arg}):\n", body, inputs)
    chosen = sorted(tasks.values(), key=lambda t: t.name)
    rng.shuffle(chosen)
    return chosen[:size]


def generate(
    seed: int = 0, test_per_family: int = 24, pool: int = 400, max_steps: int = 8
) -> tuple[list[MiniTask], list[MiniTask]]:
    """(train, test) tasks. In every family a fifth of the names (at most `test_per_family`, at least
    one) is held out, so a test task's parameter combination never appears in training. `max_steps`:
    the longest `pipeline` (its solution has steps + 1 lines)."""
    rng = random.Random(seed)
    train: list[MiniTask] = []
    test: list[MiniTask] = []
    for family in [*FAMILIES, "pipeline"]:
        tasks = _pool(family, rng, pool, max_steps)
        held = min(test_per_family, max(1, len(tasks) // 5))
        test += tasks[:held]
        train += tasks[held:]
    return train, test


def sft_pairs(train: list[MiniTask], n: int, seed: int) -> list[dict[str, str]]:
    """`n` (prompt, solution) pairs, families equally often (single-digit families have few names)."""
    rng = random.Random(seed)
    by_family: dict[str, list[MiniTask]] = {}
    for task in train:
        by_family.setdefault(task.family, []).append(task)
    families = sorted(by_family)
    return [
        {"prompt": t.prompt, "solution": t.solution}
        for t in (rng.choice(by_family[families[i % len(families)]]) for i in range(n))
    ]


def write(out: Path, seed: int = 0, test_per_family: int = 24, n_sft: int = 4000, max_steps: int = 8) -> dict:
    train, test = generate(seed, test_per_family, max_steps=max_steps)
    out.mkdir(parents=True, exist_ok=True)
    for split, tasks in (("train", train), ("test", test)):
        with open(out / f"{split}.jsonl", "w") as f:
            for task in tasks:
                f.write(json.dumps(task.to_json()) + "\n")
    with open(out / "sft.jsonl", "w") as f:
        for pair in sft_pairs(train, n_sft, seed):
            f.write(json.dumps(pair) + "\n")
    summary = {
        "seed": seed,
        "train": len(train),
        "test": len(test),
        "test_long": sum(t.lines >= LONG_LINES for t in test),
        "sft_pairs": n_sft,
        "test_families": {f: sum(t.family == f for t in test) for f in [*FAMILIES, "pipeline"]},
    }
    (out / "mini.json").write_text(json.dumps(summary, indent=2))
    return summary


def corpus(n: int = 400, seed: int = 1) -> list[str]:
    """Text of this family for the tiny tokenizer (so names and bodies tokenize compactly)."""
    train, _ = generate(seed)
    return [t.prompt + t.solution for t in random.Random(seed).sample(train, min(n, len(train)))]


def main() -> None:
    parser = argparse.ArgumentParser(description="Write the miniature benchmark (tasks and SFT pairs).")
    parser.add_argument("--out", type=Path, default=Path("runs/mini"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--test-per-family", type=int, default=24)
    parser.add_argument("--n-sft", type=int, default=4000)
    parser.add_argument("--max-steps", type=int, default=8)
    args = parser.parse_args()
    print(json.dumps(write(args.out, args.seed, args.test_per_family, args.n_sft, args.max_steps), indent=2))


if __name__ == "__main__":
    main()
