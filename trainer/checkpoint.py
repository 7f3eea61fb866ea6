"""The trainer's state on disk: atomic checkpoints, resume, and the per-step logs cut back on resume."""

from __future__ import annotations

import json
import os
import random
import shutil
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from psgpo.v1.rollout_pb2 import Trajectory
from services.common.errors import UserError
from trainer.distributed import Dist, barrier, full_optimizer_state, full_state_dict, unwrap

if TYPE_CHECKING:
    from trainer.ppo import PPOArgs


# =====================================================================================================
# Checkpoints: <out_dir>/checkpoints/step-XXXXXXXX/ + a `latest` pointer (the commit point)
# =====================================================================================================


@dataclass
class TrainerState:
    step: int = 0
    """Last completed (and, when checkpointed, committed) step."""
    policy_version: int = 0
    """Newest policy version this trainer published (0: the workers' initial policy)."""
    task_cursor: int = 0
    """Tasks enqueued so far (position in the task source's seeded order)."""
    kl_coef: float = 0.0
    """β of the KL controller."""
    trajectories_trained: int = 0
    tokens_trained: int = 0
    committed: list[tuple[str, str]] = field(default_factory=list)
    """(entry id, trajectory id) of the deliveries this checkpoint covers and that may not be
    acknowledged yet: a restarted trainer acknowledges them before reading anything."""


def checkpoint_root(out_dir: Path) -> Path:
    return Path(out_dir) / "checkpoints"


def latest_checkpoint(out_dir: Path) -> Path | None:
    pointer = checkpoint_root(out_dir) / "latest"
    if not pointer.is_file():
        return None
    path = checkpoint_root(out_dir) / pointer.read_text().strip()
    if not (path / "trainer_state.pt").is_file():
        raise UserError(f"{pointer} names {path}, which is not a complete checkpoint")
    return path


def rng_state(generator: torch.Generator) -> dict[str, Any]:
    state = {"python": random.getstate(), "torch": torch.get_rng_state(), "minibatch": generator.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any], generator: torch.Generator) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    generator.set_state(state["minibatch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def save_final_policy(path: Path, model: nn.Module, weights: dict[str, Any], tokenizer: Any) -> None:
    """The trained policy as a `from_pretrained` dir, written aside and then renamed into place: a run
    stopped in the middle of the save (Ctrl-C, a kill) never leaves a policy with half its files, which a
    resumed caller would take for a finished run."""
    tmp = path.with_name(f".{path.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, state_dict=weights, safe_serialization=True)  # type: ignore[operator]
    tokenizer.save_pretrained(tmp)
    shutil.rmtree(path, ignore_errors=True)
    os.replace(tmp, path)


def save_checkpoint(
    out_dir: Path,
    state: TrainerState,
    policy: nn.Module,
    critic: nn.Module,
    tokenizer: Any,
    optimizers: dict[str, torch.optim.Optimizer],
    generator: torch.Generator,
    args: PPOArgs,
    dist: Dist,
) -> Path:
    """Write step-XXXXXXXX into a temp dir, then rename it and replace the `latest` pointer (the commit)."""
    root = checkpoint_root(out_dir)
    name = f"step-{state.step:08d}"
    tmp, final = root / f".{name}.tmp", root / name
    if dist.main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    barrier(dist)
    torch.save(rng_state(generator), tmp / f"rng-rank{dist.rank}.pt")  # each rank its own streams
    # Full (unsharded) weights and optimizer state: under FSDP gathered by every rank, kept by rank 0.
    models = {"policy": policy, "critic": critic}
    weights = {key: full_state_dict(model, dist, args) for key, model in models.items()}
    opt_states = {key: full_optimizer_state(models[key], opt, dist, args) for key, opt in optimizers.items()}
    if dist.main:
        for key, model in models.items():  # the critic reads the policy's tokens: same tokenizer
            unwrap(model).save_pretrained(tmp / key, state_dict=weights[key], safe_serialization=True)
            tokenizer.save_pretrained(tmp / key)
        torch.save(opt_states, tmp / "optimizers.pt")
        (tmp / "args.json").write_text(json.dumps(asdict(args), default=str, indent=2))
        torch.save({**asdict(state), "world_size": dist.world}, tmp / "trainer_state.pt")
    del weights, opt_states
    barrier(dist)
    if dist.main:
        shutil.rmtree(final, ignore_errors=True)  # a step redone after a crash before its commit
        os.replace(tmp, final)
        _write_text_atomic(root / "latest", name + "\n")  # <- the commit point
        kept = sorted(p for p in root.glob("step-*") if p.is_dir())
        for old in kept[: -args.keep_checkpoints]:
            shutil.rmtree(old, ignore_errors=True)
    barrier(dist)
    return final


def load_trainer_state(path: Path) -> TrainerState:
    raw = torch.load(path / "trainer_state.pt", weights_only=True)
    raw.pop("world_size", None)
    raw["committed"] = [tuple(pair) for pair in raw.get("committed", [])]
    return TrainerState(**raw)


def truncate_jsonl(path: Path, last_step: int) -> None:
    """Keep the lines of steps <= last_step (the ones the restored weights contain)."""
    if not path.is_file():
        return
    kept = [ln for ln in path.read_text().splitlines() if ln.strip() and json.loads(ln)["step"] <= last_step]
    _write_text_atomic(path, "".join(ln + "\n" for ln in kept))


# =====================================================================================================
# Metrics: JSONL per step, optional Prometheus gauges, the progress bar
# =====================================================================================================


class MetricsLog:
    def __init__(self, out_dir: Path, port: int) -> None:
        self.metrics_path = Path(out_dir) / "metrics.jsonl"
        self.ids_path = Path(out_dir) / "trained_ids.jsonl"
        self.gauges: dict[str, Any] = {}
        self.registry = None
        if port:
            from prometheus_client import CollectorRegistry, start_http_server

            self.registry = CollectorRegistry()
            start_http_server(port, registry=self.registry)

    def write(self, metrics: dict[str, Any], trained: Sequence[Trajectory]) -> None:
        step = metrics["step"]
        with open(self.ids_path, "a") as f:
            ids = [t.trajectory_id for t in trained]
            f.write(json.dumps({"step": step, "ids": ids, "versions": [t.policy_version for t in trained]}))
            f.write("\n")
        with open(self.metrics_path, "a") as f:
            f.write(json.dumps(metrics) + "\n")
        if self.registry is not None:
            from prometheus_client import Gauge

            for key, value in metrics.items():
                if isinstance(value, int | float) and value is not None:
                    name = "psgpo_trainer_" + "".join(c if c.isalnum() else "_" for c in key)
                    if name not in self.gauges:
                        self.gauges[name] = Gauge(name, key, registry=self.registry)
                    self.gauges[name].set(value)
