"""The demo's results: per-variant means over seeds, an honest comparison with RLTF, the Markdown table
(like the paper's Table 2, overall and by solution length) and the figures."""

from __future__ import annotations

import math
import shutil
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from services.demo.config import VARIANTS
from services.demo.runs import PpoRun

KEYS = ("pass_at_1", "pass_at_1_short", "pass_at_1_long")
LABELS = {
    "rltf": "RLTF (unit tests only)",
    "dense_only": "+ dense PRM reward",
    "value_init_only": "+ PRM value init",
    "psgpo": "PSGPO (dense + value init)",
}
CURVES = ("pass_rate", "reward/unit_test", "reward/prm", "kl", "response_length", "value/explained_variance")


def _stats(values: Sequence[float]) -> tuple[float | None, float | None]:
    if not values:
        return None, None
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else None)


def aggregate(evals: dict[str, dict[str, Any]], runs: Sequence[PpoRun]) -> dict[str, dict[str, Any]]:
    """{variant: {key, key_std for each of KEYS, "seeds", "per_seed", "train_pass_rate_last5"}}."""
    variants: dict[str, dict[str, Any]] = {}
    for variant, flags in VARIANTS.items():
        mine = [r for r in runs if r.variant == variant]
        per_seed = {f"s{r.seed}": evals[r.name] for r in mine if r.name in evals}
        row: dict[str, Any] = {
            "dense_prm": flags["reward"] == "psgpo",
            "value_init": flags["value_init"],
            "seeds": len(per_seed),
        }
        for key in KEYS:
            values = [e[key] for e in per_seed.values() if e.get(key) is not None]
            row[key], row[f"{key}_std"] = _stats(values)
        metrics = [rows for rows in (r.metrics() for r in mine) if rows]  # each run's file read once
        last = [statistics.fmean(m["pass_rate"] for m in rows[-5:]) for rows in metrics]
        row["train_pass_rate_last5"] = statistics.fmean(last) if last else None
        early = [m["value/explained_variance"] for rows in metrics for m in rows[:5]
                 if isinstance(m.get("value/explained_variance"), int | float)
                 and math.isfinite(m["value/explained_variance"])]  # fmt: skip
        row["critic_explained_variance_first5"] = statistics.fmean(early) if early else None
        row["per_seed"] = per_seed
        variants[variant] = row
    return variants


def compare(variants: dict[str, dict[str, Any]], key: str, name: str = "psgpo") -> dict[str, Any]:
    """`name` minus RLTF on `key`, with the standard error of the difference of the seed means; the
    difference counts as an effect only beyond two standard errors (and never with one seed)."""
    a, b = variants[name], variants["rltf"]
    if a[key] is None or b[key] is None:
        return {"difference": None, "verdict": "not measured"}
    diff = a[key] - b[key]
    if a["seeds"] < 2 or b["seeds"] < 2 or a[f"{key}_std"] is None or b[f"{key}_std"] is None:
        return {
            "difference": diff,
            "stderr": None,
            "verdict": "one seed: no error bar, no conclusion (the full run averages 3 seeds)",
        }
    se = math.sqrt(a[f"{key}_std"] ** 2 / a["seeds"] + b[f"{key}_std"] ** 2 / b["seeds"])
    if se == 0 or abs(diff) > 2 * se:
        verdict = f"{name} {'better' if diff > 0 else 'worse'} than RLTF (beyond 2 standard errors)"
    else:
        verdict = "no difference beyond seed noise (within 2 standard errors)"
    return {"difference": diff, "stderr": se, "verdict": verdict}


def _cell(value: float | None, std: float | None) -> str:
    if value is None:
        return "-"
    return f"{100 * value:.1f}" + (f" ± {100 * std:.1f}" if std is not None else "")


def markdown(results: dict[str, Any]) -> str:
    """The results table and the PRM's figures as Markdown (pass@1 in percent, mean ± std over seeds)."""
    cfg, variants, sft = results["config"], results["variants"], results["sft"]
    lines = [
        f"Held-out pass@1 (%) on {sft['problems']} miniature-benchmark tasks ({sft.get('problems_long', 0)} "
        f"long), {cfg['eval_samples']} samples each at T=1; mean ± std over {cfg['seeds']} seed(s) of "
        f"{cfg['steps']} PPO steps x {cfg['trajectories_per_step']} trajectories.",
        "",
        "| policy | dense PRM reward | PRM value init | pass@1 | short | long | train pass rate (last 5) |",
        "|---|:-:|:-:|---:|---:|---:|---:|",
        f"| SFT (start of every run) | | | {_cell(sft['pass_at_1'], None)} | "
        f"{_cell(sft['pass_at_1_short'], None)} | {_cell(sft['pass_at_1_long'], None)} | |",
    ]
    for variant, row in variants.items():
        cells = " | ".join(_cell(row[k], row[f"{k}_std"]) for k in KEYS)
        train = _cell(row["train_pass_rate_last5"], None)
        lines.append(
            f"| {LABELS[variant]} | {'✓' if row['dense_prm'] else ''} | "
            f"{'✓' if row['value_init'] == 'prm' else ''} | {cells} | {train} |"
        )
    lines.append("")
    for key, what in (("pass_at_1", "overall"), ("pass_at_1_long", "long programs")):
        c = results["comparison"][key]
        if c["difference"] is not None:
            se = f" ± {100 * c['stderr']:.1f} (standard error)" if c.get("stderr") is not None else ""
            lines.append(f"- PSGPO vs RLTF, {what}: {100 * c['difference']:+.1f} points{se}: {c['verdict']}.")
    early = {v: row.get("critic_explained_variance_first5") for v, row in variants.items()}
    if all(value is not None for value in early.values()):
        cells = ", ".join(f"{LABELS[v].split(' (')[0]} {value:+.2f}" for v, value in early.items())
        lines.append(f"- Critic explained variance over the first 5 steps (1 = perfect): {cells}.")
    prm = results.get("prm", {})
    if prm.get("auc") is not None:
        best = {k: (math.nan if v is None else v) for k, v in (prm.get("best_of_n") or {}).items()}
        lines.append(
            f"- PRM on held-out tasks' labels: line AUC {prm['auc']:.3f}, accuracy {prm['accuracy']:.3f}; "
            f"best-of-{best.get('n', '?')} pass rate: PRM {best.get('prm', math.nan):.3f}, random "
            f"{best.get('random', math.nan):.3f}, policy likelihood {best.get('logprob', math.nan):.3f}."
        )
    lines += ["", "| stage | seconds |", "|---|---:|"]
    lines += [f"| {name} | {seconds:.0f} |" for name, seconds in results["stages"].items()]
    lines.append(f"| total (all stages) | {sum(results['stages'].values()):.0f} |")
    return "\n".join(lines) + "\n"


def figures(
    out: Path, runs: Sequence[PpoRun], prm_eval_dir: Path | None, line_examples: list[dict[str, Any]]
) -> dict[str, str]:
    """plots/learning_curves.png, plots/prm_calibration.png, plots/prm_lines.png; {name: path relative to
    out}."""
    from trainer.figures import write_learning_curves, write_line_scores

    plots = out / "plots"
    plots.mkdir(parents=True, exist_ok=True)
    panels: dict[str, dict[str, list[tuple[list[float], list[float]]]]] = {}
    for key in CURVES:
        for run in runs:
            rows = [m for m in run.metrics() if isinstance(m.get(key), int | float)]
            if rows:
                series = ([float(m["step"]) for m in rows], [float(m[key]) for m in rows])
                panels.setdefault(key, {}).setdefault(run.variant, []).append(series)
    written = {}
    if panels:
        written["learning_curves"] = str(
            write_learning_curves(plots / "learning_curves.png", panels, smooth=3)
        )
    calibration = prm_eval_dir / "calibration.png" if prm_eval_dir is not None else None
    if calibration is not None and calibration.is_file():
        shutil.copyfile(calibration, plots / "prm_calibration.png")
        written["prm_calibration"] = "plots/prm_calibration.png"
    if line_examples:
        write_line_scores(plots / "prm_lines.png", line_examples)
        written["prm_lines"] = "plots/prm_lines.png"
    return written
