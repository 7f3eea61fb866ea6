"""`psgpo train prm` and `psgpo eval prm`.

As in trainer/cli_train.py, the arguments dataclasses (`PrmTrainArgs`, `PrmEvalArgs`) are the one source
of truth: every field is a `--kebab-case` flag with its docstring as help, and the typer commands pass
their raw arguments to that parser. This module imports only typer at import time.

Wiring: trainer/cli_train.py mounts `prm_train_command` as `train prm`; services/cli.py mounts
`prm_eval_command` as `eval prm`, both with `PASS_THROUGH` context settings and `add_help_option=False`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import typer

PASS_THROUGH = {"allow_extra_args": True, "ignore_unknown_options": True}


def run_prm_train(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Parse PrmTrainArgs flags, train, print one summary line."""
    from services.common.logs import setup_logging
    from trainer.cli_train import parse_dataclass
    from trainer.prm_train import PrmTrainArgs, train_prm

    args = parse_dataclass(PrmTrainArgs, argv, "psgpo train prm")
    setup_logging("INFO", "trainer")
    s = train_prm(args)
    if s["best_val_loss"] is not None:
        result = (
            f"val loss {s['initial_val_loss']:.4f} -> {s['best_val_loss']:.4f} (best epoch {s['best_epoch']} "
            f"of {s['epochs_run']}{', stopped early' if s['stopped_early'] else ''})"
        )
    else:
        result = f"train loss {s['last_train_loss']:.4f} after {s['epochs_run']} epoch(s) (no validation)"
    print(f"prm: {result}; PRM in {s['out']}", flush=True)
    return s


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def run_prm_eval(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Parse PrmEvalArgs flags, evaluate, print the headline numbers."""
    from services.common.logs import setup_logging
    from trainer.cli_train import parse_dataclass
    from trainer.prm_eval import PrmEvalArgs, eval_prm

    args = parse_dataclass(PrmEvalArgs, argv, "psgpo eval prm")
    setup_logging("INFO", "trainer")
    s = eval_prm(args)
    if s["labelled"]:
        lines, responses = s["labelled"]["lines"], s["labelled"]["responses"]
        print(
            f"lines: {lines['count']} ({lines['positive']} +1 / {lines['negative']} -1), "
            f"AUC {_fmt(lines['auc'])}, "
            f"accuracy {_fmt(lines['accuracy'])} (> {lines['threshold']:g}), MSE {_fmt(lines['mse'])}; "
            f"responses: AUC vs passed {_fmt(responses['auc_passed'])}",
            flush=True,
        )
    if s["best_of_n"]:
        b = s["best_of_n"]
        logprob = (
            f", highest logprob {_fmt(b['logprob'])} ({b['logprob_groups']} groups)"
            if b["logprob_groups"]
            else ""
        )
        print(
            f"best-of-n over {b['groups']} groups: PRM ({b['aggregate']}) {_fmt(b['prm'])}, "
            f"random {_fmt(b['random'])}{logprob}, any passes {_fmt(b['oracle'])}",
            flush=True,
        )
    print(f"wrote {args.out / 'prm_eval.json'}", flush=True)
    return s


def prm_train_command(ctx: typer.Context) -> None:
    """Train a PRM on labelled JSONL: MSE at line ends, early stopping on validation loss (--help)."""
    run_prm_train(ctx.args)


def prm_eval_command(ctx: typer.Context) -> None:
    """Evaluate a PRM: line AUC / accuracy / calibration, best-of-N reranking (--help)."""
    run_prm_eval(ctx.args)
