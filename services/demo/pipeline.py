"""`psgpo demo`: the paper's comparison in miniature, on top of the `psgpo up` stack.

  tasks + tiny models -> SFT -> RLTF runs -> samples from the RLTF checkpoints -> binary-search labels
  -> PRM training and evaluation -> PSGPO and its ablations (dense reward only, value init only) at the
  same steps and seeds -> held-out pass@1 of every policy -> results.json, results.md, plots/.

Every stage's outcome is kept in OUT/demo_state.json: rerunning the same command on the same OUT (after
Ctrl-C, a crash, a reboot) skips what is done and resumes the rest; PPO runs resume from their last
checkpoint. A different configuration refuses to reuse the dir.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rich.console import Console

from services.common.errors import UserError
from services.demo.config import VARIANTS, DemoConfig
from services.demo.runs import Endpoints, PpoRun, run_all

console = Console()
STATE_VERSION = 1


class Stages:
    """Named stages whose JSON results and durations persist in OUT/demo_state.json."""

    def __init__(self, out: Path, cfg: DemoConfig) -> None:
        self.path = out / "demo_state.json"
        state: dict[str, Any] = {}
        if self.path.is_file():
            try:
                state = json.loads(self.path.read_text())
            except ValueError as exc:
                raise UserError(
                    f"{self.path} is unreadable ({exc}); remove it or use another --out"
                ) from None
            if state.get("version") != STATE_VERSION or state.get("config_key") != cfg.key():
                raise UserError(
                    f"{out} holds a demo with another configuration or version; use another --out or --fresh"
                )
        self.state = state or {
            "version": STATE_VERSION,
            "config_key": cfg.key(),
            "config": cfg.to_dict(),
            "nonce": secrets.token_hex(3),
            "stages": {},
        }
        self.save()

    @property
    def nonce(self) -> str:
        return str(self.state["nonce"])

    def save(self) -> None:
        self.path.write_text(json.dumps(self.state, indent=2))

    def run(self, name: str, what: str, fn: Callable[[], Any]) -> Any:
        done = self.state["stages"].get(name)
        if done is not None:
            console.print(f"[dim]= {what}: done earlier ({done['seconds']:.0f} s), reusing[/dim]")
            return done["result"]
        console.rule(f"[bold]{what}")
        t0 = time.perf_counter()
        result = fn()
        seconds = time.perf_counter() - t0
        self.state["stages"][name] = {"seconds": seconds, "result": result}
        self.save()
        console.print(f"[green]✓ {what}[/green] ({seconds:.0f} s)")
        return result

    def seconds(self) -> dict[str, float]:
        return {name: s["seconds"] for name, s in self.state["stages"].items()}


def _lock(out: Path) -> Any:
    """An exclusive lock on OUT/demo.lock: two demos on one OUT would train over each other's runs."""
    import fcntl

    handle = open(out / "demo.lock", "a+")  # noqa: SIM115 - kept open (locked) for the whole run
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip() or "?"
        handle.close()
        raise UserError(
            f"another psgpo demo (pid {holder}) is running on {out}; wait for it or use another --out"
        ) from None
    handle.truncate(0)
    handle.write(f"{os.getpid()}\n")
    handle.flush()
    return handle


def check_disk(out: Path, cfg: DemoConfig) -> None:
    """UserError when OUT's disk cannot hold the run: ~60 MiB per PPO run (two checkpoints with optimizer
    state, the final policy, published weights) plus ~250 MiB for the rest (measured: 764 MiB in all for
    the full configuration)."""
    need = 64 * 2**20 * cfg.seeds * len(VARIANTS) + 256 * 2**20
    free = shutil.disk_usage(out).free
    if free < need:
        raise UserError(
            f"only {free // 2**20} MiB free on the disk of {out}: the demo needs about {need // 2**20} MiB"
        )


def _tasks(out: Path, cfg: DemoConfig) -> dict[str, Any]:
    from trainer.tasks.mini import write

    return write(out / "tasks", seed=0, n_sft=cfg.sft_pairs)


def _models(out: Path) -> dict[str, Any]:
    from trainer.models.tiny import TinyConfig, build_tiny
    from trainer.tasks.mini import corpus

    summary = build_tiny(out / "models", TinyConfig(vocab_size=1024), extra_corpus=corpus())
    return {"policy_parameters": summary["policy"]["parameters"]}


def _sft(out: Path, cfg: DemoConfig) -> dict[str, Any]:
    from trainer.sft import SFTArgs, train_sft

    return train_sft(
        SFTArgs(
            data=out / "tasks" / "sft.jsonl",
            policy=out / "models" / "policy",
            out=out / "sft",
            epochs=cfg.sft_epochs,
            lr=3e-3,
            batch_size=32,
            warmup_steps=20,
            device="cpu",
        )
    )


def _runs(out: Path, cfg: DemoConfig, nonce: str, variants: list[str]) -> list[PpoRun]:
    return [
        PpoRun(v, s, out / "ppo" / f"{v}-s{s}", f"demo-{nonce}-{v}-s{s}")
        for v in variants
        for s in range(cfg.seeds)
    ]


def _train_runs(runs: list[PpoRun], cfg: DemoConfig, out: Path, ends: Endpoints, prm: Path | None) -> dict:
    def done(run: PpoRun, seconds: float) -> None:
        rows = run.metrics()
        tail = sum(m["pass_rate"] for m in rows[-5:]) / max(1, len(rows[-5:]))
        console.print(
            f"  {run.name}: {len(rows)} steps in {seconds:.0f} s, train pass rate (last 5) {tail:.2f}"
        )

    console.print(
        f"{len(runs)} runs x {cfg.steps} steps, {cfg.parallel_runs} at a time; logs in {out / 'logs'}"
    )
    return run_all(
        runs,
        cfg,
        sft=out / "sft",
        prm=prm,
        tasks=out / "tasks" / "train.jsonl",
        ends=ends,
        logs=out / "logs",
        on_done=done,
    )


def _prm_stages(stages: Stages, out: Path, cfg: DemoConfig, ends: Endpoints, rltf: PpoRun) -> dict[str, Any]:
    """Samples from the RLTF run's checkpoints -> binary-search labels -> PRM training -> its evaluation
    on the held-out tasks' labels; returns the evaluation report."""
    from services.demo import prm_data

    base, data, prm_dir = f"demo-{stages.nonce}", out / "prm_data", out / "prm"
    mid = rltf.out_dir / "checkpoints" / f"step-{max(1, cfg.steps // 2):08d}" / "policy"
    checkpoints = {"rltf-mid": mid, "rltf-final": rltf.out_dir / "policy"}

    def sample() -> dict[str, int]:
        data.mkdir(parents=True, exist_ok=True)
        train = prm_data.subset(out / "tasks" / "train.jsonl", cfg.label_tasks, 0, data / "label_tasks.jsonl")
        splits = {
            "train": (train, data / "samples-train.jsonl"),
            "test": (out / "tasks" / "test.jsonl", data / "samples-test.jsonl"),
        }
        return prm_data.sample_checkpoints(
            checkpoints,
            splits,
            cfg.label_samples,
            cfg,
            ends,
            base,
            out / "logs",
            out / "weights" / "sample",
            cfg.parallel_runs,
        )

    def label() -> dict[str, Any]:
        return {
            split: prm_data.label(
                data / f"samples-{split}.jsonl",
                data / f"labels-{split}.jsonl",
                checkpoints["rltf-final"],
                f"{base}-rltf-final",
                cfg,
                ends,
                base,
                out / "logs",
                out / "weights" / "label",
                cfg.parallel_runs,
            )
            for split in ("train", "test")
        }

    def prm_eval() -> dict[str, Any]:
        groups = prm_data.groups(data / "samples-test.jsonl", data / "groups-test.jsonl")
        return prm_data.eval_prm(prm_dir, data / "labels-test.jsonl", groups, out / "prm_eval")

    stages.run("sample", "samples from the RLTF checkpoints", sample)
    stages.run("label", "binary-search labelling of the failed samples", label)
    stages.run(
        "prm_train",
        "PRM training (training tasks' labels)",
        lambda: prm_data.train_prm(data / "labels-train.jsonl", out / "sft", prm_dir, cfg),
    )
    return stages.run("prm_eval", "PRM evaluation (held-out tasks' labels)", prm_eval)


def _evaluate(policies: dict[str, Path], out: Path, cfg: DemoConfig, sandbox_http: str) -> dict[str, Any]:
    from services.demo import heldout

    results = {}
    for i, (name, policy) in enumerate(policies.items(), 1):
        results[name] = heldout.evaluate_policy(
            policy, out / "tasks" / "test.jsonl", sandbox_http, cfg.eval_samples, cfg.max_new_tokens
        )
        console.print(
            f"  [{i}/{len(policies)}] {name}: pass@1 {results[name]['pass_at_1']:.3f} "
            f"(long {results[name]['pass_at_1_long'] or 0:.3f})"
        )
    return results


def _prm_summary(prm_report: dict[str, Any], label_reports: dict[str, Any]) -> dict[str, Any]:
    lines, best = prm_report["labelled"]["lines"], prm_report.get("best_of_n") or {}
    return {
        "auc": lines["auc"],
        "accuracy": lines["accuracy"],
        "lines": lines["count"],
        "response_auc": prm_report["labelled"]["responses"].get("auc_passed"),
        "best_of_n": {
            "n": round(best["samples"] / best["groups"]) if best.get("groups") else None,
            **{k: best.get(k) for k in ("prm", "random", "logprob", "oracle")},
        },
        "labelling": {split: r.get("per_failed_response") for split, r in label_reports.items()},
    }


def run_demo(out: Path, cfg: DemoConfig) -> dict[str, Any]:
    """The whole pipeline; returns (and writes) results.json's content."""
    from services.demo import report, showcase
    from services.up import Stack, UpConfig

    out.mkdir(parents=True, exist_ok=True)
    lock = _lock(out)  # held until this process exits
    check_disk(out, cfg)
    t_start = time.perf_counter()
    stages = Stages(out, cfg)
    console.print(
        f"psgpo demo: {cfg.seeds} seed(s) x {len(VARIANTS)} variants x {cfg.steps} PPO steps in {out}"
    )
    stages.run("tasks", "miniature benchmark tasks", lambda: _tasks(out, cfg))
    stages.run("models", "tiny policy and PRM (tokenizer trained on this machine)", lambda: _models(out))
    stages.run("sft", "SFT of the tiny policy", lambda: _sft(out, cfg))

    stack = Stack(
        UpConfig(
            data_dir=out / "up",
            policy=out / "sft",
            prm=None,
            run=f"demo-{stages.nonce}",
            workers=0,
            redis_port=0,
            sandbox_ports=(0, 0),
            prm_ports=(0, 0),
        )
    )
    stack.prepare()
    t = time.perf_counter()
    stack.start()
    up_seconds = time.perf_counter() - t
    rltf = _runs(out, cfg, stages.nonce, ["rltf"])
    others = _runs(out, cfg, stages.nonce, [v for v in VARIANTS if v != "rltf"])
    try:
        sandbox = stack.services["sandbox"]
        ends = Endpoints(stack.redis_url, sandbox.grpc_target, sandbox.http_url)
        console.print(stack.status_table())
        programs = stages.run(
            "sandbox_checks",
            "hostile and buggy programs through the sandbox",
            lambda: showcase.sandbox_verdicts(sandbox.http_url),
        )
        stages.run("ppo_rltf", "RLTF baseline runs", lambda: _train_runs(rltf, cfg, out, ends, None))
        prm_report = _prm_stages(stages, out, cfg, ends, rltf[0])
        t = time.perf_counter()
        prm = stack.add_prm(out / "prm")
        up_seconds += time.perf_counter() - t
        ends = Endpoints(ends.redis_url, ends.sandbox_grpc, ends.sandbox_http, prm.grpc_target)
        lines = stages.run(
            "prm_lines",
            "the trained PRM on example programs",
            lambda: showcase.line_examples(out / "tasks" / "test.jsonl", prm.grpc_target),
        )
        stages.run(
            "ppo_prm", "PSGPO and the ablations", lambda: _train_runs(others, cfg, out, ends, out / "prm")
        )
        policies = {"sft": out / "sft", **{r.name: r.out_dir / "policy" for r in rltf + others}}
        evals = stages.run(
            "eval",
            "held-out evaluation of every policy",
            lambda: _evaluate(policies, out, cfg, sandbox.http_url),
        )
    finally:
        stack.stop()

    variants = report.aggregate(evals, rltf + others)
    results: dict[str, Any] = {
        "variants": variants,
        "sft": evals["sft"],
        "comparison": {key: report.compare(variants, key) for key in report.KEYS},
        "prm": _prm_summary(prm_report, stages.state["stages"]["label"]["result"]),
        "programs": programs,
        "config": cfg.to_dict(),
        "stages": {**stages.seconds(), "services_up": up_seconds},
    }
    results["plots"] = report.figures(out, rltf + others, out / "prm_eval", lines)
    results["seconds"] = time.perf_counter() - t_start  # this invocation (a resumed one reuses stages)
    table = report.markdown(results)
    (out / "results.md").write_text(table)
    (out / "results.json").write_text(json.dumps(results, indent=2))
    print(table, flush=True)  # plain: rich would wrap the Markdown
    console.print(f"wrote {out / 'results.json'}, {out / 'results.md'} and {out / 'plots'}")
    lock.close()
    return results
