"""`psgpo train ppo|sft|prm` and `psgpo plot`: the trainer's commands.

The arguments dataclasses (`PPOArgs`, `SFTArgs`) are the one source of truth: every field becomes a
`--kebab-case` flag whose help is the field's docstring (what CleanRL gets from tyro). The typer
commands below hand their raw arguments to that parser, so `psgpo train ppo --help` lists them all.
Nothing heavy is imported until a command runs.

Wiring (services/cli.py):  `app.add_typer(train_app, name="train")` and `app.command("plot")(plot)`.
Under torchrun: `torchrun --nproc-per-node 2 -m trainer.ppo --policy ...` (the same flags).
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import logging
import signal
import textwrap
import types
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

import typer

from trainer.cli_prm import prm_train_command

D = TypeVar("D")

_NONE = ("none", "None", "null")


def field_docs(cls: type) -> dict[str, str]:
    """Attribute docstrings of a dataclass (the string literal right after each field), by field name."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body  # type: ignore[attr-defined]
    docs: dict[str, str] = {}
    for node, following in zip(body, body[1:], strict=False):
        if (
            isinstance(node, ast.AnnAssign)
            and isinstance(node.target, ast.Name)
            and isinstance(following, ast.Expr)
            and isinstance(following.value, ast.Constant)
            and isinstance(following.value.value, str)
        ):
            docs[node.target.id] = " ".join(following.value.value.split())
    return docs


def _converter(kind: Any) -> Any:
    """A str -> value function for one (non-optional) field type."""
    if kind is Path:
        return Path
    if kind in (int, float, str):
        return kind
    raise TypeError(f"unsupported argument type {kind!r}")


def dataclass_parser(cls: type, prog: str) -> argparse.ArgumentParser:
    """An argparse parser with one `--kebab-case` flag per dataclass field (bools: --x / --no-x;
    Literal: choices; `X | None`: also accepts `none`)."""
    hints = typing.get_type_hints(cls)
    docs = field_docs(cls)
    parser = argparse.ArgumentParser(
        prog=prog,
        description=(cls.__doc__ or "").strip(),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    for f in dataclasses.fields(cls):
        kind = hints[f.name]
        flags = ["--" + f.name.replace("_", "-"), *f.metadata.get("aliases", [])]
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        help_text = docs.get(f.name, "")
        optional = False
        if isinstance(kind, types.UnionType) or typing.get_origin(kind) is typing.Union:
            members = [a for a in typing.get_args(kind) if a is not type(None)]
            optional = len(members) < len(typing.get_args(kind))
            if len(members) != 1:
                raise TypeError(f"{cls.__name__}.{f.name}: unsupported union {kind!r}")
            kind = members[0]
        if kind is bool:
            if optional:  # tri-state: --x / --no-x, unset = None (a preset decides)
                parser.add_argument(
                    *flags, action=argparse.BooleanOptionalAction, default=None, help=help_text
                )
            else:
                parser.add_argument(
                    *flags, action=argparse.BooleanOptionalAction, default=default, help=help_text
                )
            continue
        if typing.get_origin(kind) is Literal:
            choices = list(typing.get_args(kind))
            parser.add_argument(*flags, choices=choices, default=default, help=help_text)
            continue
        convert = _converter(kind)

        def parse(text: str, convert: Any = convert, optional: bool = optional) -> Any:
            return None if optional and text in _NONE else convert(text)

        parse.__name__ = getattr(kind, "__name__", "value")  # argparse names the type in its errors
        parser.add_argument(
            *flags, type=parse, default=default, help=help_text, metavar=parse.__name__.upper()
        )
    return parser


def parse_dataclass(cls: type[D], argv: Sequence[str] | None, prog: str) -> D:
    namespace = dataclass_parser(cls, prog).parse_args(argv)
    return cls(**vars(namespace))


def _stop_on_signals() -> Any:
    """SIGTERM/SIGINT ask the trainer to finish its step, checkpoint and stop (a second one kills)."""
    requested = {"stop": False}

    def handler(signum: int, frame: Any) -> None:
        if requested["stop"]:
            raise KeyboardInterrupt
        requested["stop"] = True
        logging.getLogger("trainer").warning("signal %d: finishing this step, then stopping", signum)

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)
    return lambda: requested["stop"]


def run_ppo(argv: Sequence[str] | None = None) -> None:
    """Parse PPOArgs flags and train (also the entry point under torchrun: `-m trainer.ppo`)."""
    from services.common.logs import setup_logging
    from trainer.ppo import PPOArgs, train

    args = parse_dataclass(PPOArgs, argv, "psgpo train ppo")
    setup_logging("INFO", "trainer")
    result = train(args, stop=_stop_on_signals())
    print(
        f"ppo: step {result.state.step}, policy version {result.state.policy_version}, "
        f"{result.state.trajectories_trained} trajectories; final policy in {result.out_dir / 'policy'}",
        flush=True,
    )


def run_sft(argv: Sequence[str] | None = None) -> None:
    """Parse SFTArgs flags and fine-tune."""
    from services.common.logs import setup_logging
    from trainer.sft import SFTArgs, train_sft

    args = parse_dataclass(SFTArgs, argv, "psgpo train sft")
    setup_logging("INFO", "trainer")
    summary = train_sft(args)
    print(
        f"sft: loss {summary['first_loss']:.4f} -> {summary['last_loss']:.4f}; model in {args.out}",
        flush=True,
    )


# ---- typer wiring ------------------------------------------------------------------------------------

train_app = typer.Typer(no_args_is_help=True, help="Train: PPO (RLTF / PSGPO), SFT and the PRM.")
_PASS_THROUGH = {"allow_extra_args": True, "ignore_unknown_options": True}


@train_app.command("ppo", context_settings=_PASS_THROUGH, add_help_option=False)
def ppo_command(ctx: typer.Context) -> None:
    """PPO from Redis trajectories: --reward rltf|psgpo, --value-init prm|policy|random, ... (--help)."""
    run_ppo(ctx.args)


@train_app.command("sft", context_settings=_PASS_THROUGH, add_help_option=False)
def sft_command(ctx: typer.Context) -> None:
    """Supervised fine-tuning on (prompt, solution) JSONL, loss on solution tokens (--help)."""
    run_sft(ctx.args)


# trainer/cli_prm.py: PRM training on labelled JSONL (flags from PrmTrainArgs)
train_app.command("prm", context_settings=_PASS_THROUGH, add_help_option=False)(prm_train_command)


def plot(
    run_dir: Annotated[Path, typer.Argument(help="run dir holding metrics.jsonl (PPO or SFT)")],
    out: Annotated[Path | None, typer.Option(help="PNG path (default RUN_DIR/curves.png)")] = None,
    keys: Annotated[
        str | None, typer.Option(help="comma-separated metric names (default: all numeric)")
    ] = None,
    columns: Annotated[int, typer.Option(min=1, max=8, help="panels per row")] = 3,
) -> None:
    """Write PNG learning curves from RUN_DIR/metrics.jsonl (no plotting library needed)."""
    from trainer.plot import plot_run

    path = plot_run(run_dir, out=out, keys=keys.split(",") if keys else None, columns=columns)
    typer.echo(f"wrote {path}")
