"""What `psgpo demo` runs: the two presets (`--quick`, full) and the four PPO variants."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, replace
from typing import Any

# The variants of the paper's Table 2 (dense PRM reward x PRM value init), as `psgpo train ppo` flags.
VARIANTS: dict[str, dict[str, str]] = {
    "rltf": {"reward": "rltf", "value_init": "policy"},  # unit tests only: the baseline
    "dense_only": {"reward": "psgpo", "value_init": "policy"},  # ablation: dense rewards, plain critic
    "value_init_only": {"reward": "rltf", "value_init": "prm"},  # ablation: unit tests, PRM critic
    "psgpo": {"reward": "psgpo", "value_init": "prm"},  # dense PRM line rewards + PRM-initialised critic
}


@dataclass(frozen=True)
class DemoConfig:
    """The knobs of one demo run. Every PPO variant runs with the same steps, seeds and hyperparameters."""

    seeds: int = 3
    """PPO seeds per variant (results are averaged over them)."""
    steps: int = 24
    """PPO steps per run."""
    trajectories_per_step: int = 32
    """Trajectories per PPO step (tasks x samples_per_task)."""
    samples_per_task: int = 4
    """Samples per enqueued training task."""
    lr: float = 1e-4
    """Policy learning rate (at 3e-4 the tiny policy drifted away from the SFT policy and collapsed)."""
    critic_lr: float = 3e-4
    """Critic learning rate."""
    kl_coef: float = 0.05
    """β of the KL penalty to the SFT policy."""
    max_new_tokens: int = 160
    """Longest response in tokens (the longest miniature solution needs about 120)."""
    parallel_runs: int = 2
    """PPO runs (trainer + rollout worker each) at once."""
    sft_epochs: int = 2
    """SFT passes over the (prompt, solution) pairs."""
    sft_pairs: int = 4000
    """SFT pairs drawn from the training tasks."""
    label_tasks: int = 160
    """Training tasks sampled from the RLTF checkpoints for the PRM's data."""
    label_samples: int = 2
    """Samples per task from each sampled RLTF checkpoint."""
    label_k: int = 4
    """Completions per binary-search probe (a prefix is correct when one of K passes)."""
    prm_epochs: int = 8
    """Most PRM training epochs (early stopping on a task-split validation set)."""
    eval_samples: int = 8
    """Samples per held-out task at T=1 for pass@1 (unbiased estimate from n samples)."""

    def key(self) -> str:
        """A short hash: a demo dir is resumed only by the same configuration."""
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:12]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


FULL = DemoConfig()
QUICK = DemoConfig(
    seeds=1,
    steps=10,
    label_tasks=60,
    label_samples=2,
    label_k=2,
    prm_epochs=4,
    eval_samples=4,
)


def preset(quick: bool, **overrides: Any) -> DemoConfig:
    """The preset with the given fields replaced (None values are ignored)."""
    base = QUICK if quick else FULL
    return replace(base, **{k: v for k, v in overrides.items() if v is not None})
