"""`psgpo label [run|sample|select]`: binary-search prefix labelling (trainer/label.py,
trainer/label_job.py, trainer/label_sample.py).

Every field of `LabelArgs`, `SampleArgs` and `SelectArgs` is a `--kebab-case` flag whose help is the
field's docstring (the parser of trainer/cli_train.py). `psgpo label ARGS` is `psgpo label run ARGS`.
Nothing heavy is imported until a command runs.

Wiring (services/cli.py): `app.add_typer(label_app, name="label")`.
"""

from __future__ import annotations

from typing import Any

import click
import typer
from typer.core import TyperGroup

from trainer.cli_train import parse_dataclass

_PASS_THROUGH = {"allow_extra_args": True, "ignore_unknown_options": True}


class _RunByDefault(TyperGroup):
    """`psgpo label ARGS` means `psgpo label run ARGS` unless ARGS starts with a subcommand."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if args and args[0] not in self.commands and args[0] not in ("--help", "-h"):
            args = ["run", *args]
        return super().parse_args(ctx, args)


label_app = typer.Typer(
    cls=_RunByDefault,
    no_args_is_help=True,
    help="Binary-search prefix labelling for PRM training: run (default), sample, select.",
)


def _setup_logging() -> None:
    from services.common.logs import setup_logging

    setup_logging("INFO", "label")


@label_app.command("run", context_settings=_PASS_THROUGH, add_help_option=False)
def run_command(ctx: typer.Context) -> None:
    """Label responses by binary search over line prefixes (probes via run <run>-label) (--help)."""
    from trainer.label_job import LabelArgs, label

    args: Any = parse_dataclass(LabelArgs, ctx.args, "psgpo label run")
    _setup_logging()
    label(args)


@label_app.command("sample", context_settings=_PASS_THROUGH, add_help_option=False)
def sample_command(ctx: typer.Context) -> None:
    """Make the input: n samples per task from the workers of run <run>-sample (--help)."""
    from trainer.label_sample import SampleArgs, sample

    args: Any = parse_dataclass(SampleArgs, ctx.args, "psgpo label sample")
    _setup_logging()
    sample(args)


@label_app.command("select", context_settings=_PASS_THROUGH, add_help_option=False)
def select_command(ctx: typer.Context) -> None:
    """Write one data strategy's training set (full, revised-only, remove-hard, medium-only) (--help)."""
    from trainer.label_sample import SelectArgs, select

    args: Any = parse_dataclass(SelectArgs, ctx.args, "psgpo label select")
    select(args)
