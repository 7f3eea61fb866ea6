"""PPO for code generation with the PSGPO reward (arXiv 2410.17621), in the spirit of CleanRL's ppo.py:
one file, read it top to bottom. The pure math lives in small tested modules: `trainer.rewards` (where
each reward lands), `trainer.kl` (KL penalty and its coefficient), `trainer.gae` (advantages,
whitening), `trainer.losses` (clipped surrogate, value loss, entropy).

One step:
  1. rank 0 tops up the tasks stream and reads scored trajectories from `psgpo:{run}:trajectories`
     (group `trainer`); drops those more than `max_staleness` policy versions old and skips those whose
     reward cannot be computed honestly (counted by reason, never trained on as a made-up zero);
  2. per-token rewards: the unit-test reward on the last token, λ·R_PRM/T at each line's end token
     (`--reward psgpo`), minus β·KL to the frozen reference policy;
  3. values from the critic (initialised from the PRM with `--value-init prm`), GAE, whitening;
  4. `update_epochs` PPO epochs over minibatches; importance ratios against the logprobs recorded at
     sampling time, so stale trajectories are weighted against the policy that made them;
  5. commit: checkpoint (when due), then acknowledge the step's trajectories; publish the weights every
     `sync_every` steps.

Exactly once. A trajectory influences the weights exactly once, whatever moment the trainer dies:
  - Deliveries are acknowledged only after the checkpoint that contains the update that used them (a
    step that does not checkpoint holds its deliveries, pending, until the next checkpoint).
  - The checkpoint lists the deliveries it covers (`committed`). It is written to a temporary directory
    and made current by replacing the `latest` pointer: that rename is the commit point.
  - Killed before the commit: the restarted trainer loads the previous checkpoint, and the stream
    hands it the still-pending entries again (its own pending ones first, or reclaimed by XAUTOCLAIM):
    the lost update is redone from the same data.
  - Killed after the commit, before the acknowledgement: the restarted trainer acknowledges the
    checkpoint's `committed` entries before it reads anything, and the acked-id set
    (`psgpo:{run}:trajectories:acked`) makes any later redelivery of those ids a skipped duplicate.
  - The per-step logs (`metrics.jsonl`, `trained_ids.jsonl`) are written before the commit and cut back
    to the checkpoint's step on resume, so they describe exactly the updates in the weights.
  With `--checkpoint-every 0` nothing is checkpointed and each step is acknowledged right after its
  update: at most once (a crash loses the steps since start), no resume.

Data parallel (torchrun). Rank 0 alone talks to Redis (one consumer, so the exactly-once argument
above is unchanged); it broadcasts the step's trajectories and every rank trains on its shard of
`trajectories_per_step / world_size` under DistributedDataParallel (gloo on CPU, nccl on GPU).
Advantage whitening and the KL controller use statistics all-reduced over the whole batch; gradients
are averaged by DDP, so every rank applies the same update (checked at each checkpoint).
With `--parallel fsdp` the policy, the critic and the frozen reference are sharded instead (FSDP2
`fully_shard`, each decoder layer then the root): each rank keeps 1/W of the weights, gradients and
optimizer state. Checkpoints and published weights are still the full (unsharded) state dicts, gathered
from all ranks and written by rank 0 in the same format as under DDP, so either mode resumes the other.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import secrets
import shutil
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
import torch.distributed as torch_dist
from torch import nn

from psgpo.v1.rollout_pb2 import Trajectory
from services.common.errors import UserError
from trainer.gae import compute_gae, masked_mean, masked_sum, masked_whiten
from trainer.kl import kl_penalized_rewards, make_kl_controller
from trainer.losses import logprobs_from_logits, masked_entropy, ppo_policy_loss, value_loss
from trainer.rewards import (
    RewardConfig,
    RewardError,
    batch_token_rewards,
    trajectory_token_rewards,
    unit_test_reward,
)

log = logging.getLogger(__name__)


@dataclass
class PPOArgs:
    """Arguments of `psgpo train ppo` (each field is a flag: `--kebab-case`)."""

    # --- where things are ---------------------------------------------------------------------------
    redis_url: str = "redis://127.0.0.1:6379/0"
    """Redis holding the run's streams and policy hash (redis://, rediss:// or unix://)."""
    run: str = field(default="default", metadata={"aliases": ["--run-name"]})
    """Run name: the keys are psgpo:{run}:... (must match the rollout workers' --run). Under torchrun
    write --run-name: torchrun's own parser takes --run for a prefix of its --run-path."""
    consumer: str = ""
    """Consumer name in group `trainer`; empty: trainer-{run}. Keep it stable across restarts, so a
    restarted trainer reads its own pending entries first."""
    policy: Path | None = None
    """Initial policy: a Hugging Face causal LM dir (the SFT model). Required."""
    ref_policy: Path | None = None
    """Frozen reference policy of the KL penalty; None: the initial policy."""
    prm_model: Path | None = None
    """PRM dir (AutoModelForTokenClassification, num_labels=1): the critic's initial weights with
    --value-init prm. The dense rewards themselves come from the PRM service via the rollout workers."""
    out_dir: Path = Path("runs/ppo")
    """Checkpoints, published weights, metrics.jsonl, trained_ids.jsonl, the final policy."""
    task_source: str = "builtin:tiny"
    """Tasks the trainer enqueues: a JSONL file (trainer/data.py), builtin:tiny, or none (someone else
    fills psgpo:{run}:tasks)."""

    # --- reward (every ablation of the paper is a combination of these) -----------------------------
    reward: Literal["rltf", "psgpo"] = "psgpo"
    """Preset: rltf = unit-test reward only (the baseline); psgpo = plus dense PRM line rewards."""
    dense_prm: bool | None = None
    """Dense PRM line rewards on/off; None: as the preset says (psgpo: on, rltf: off)."""
    unit_test_reward: bool = True
    """Unit-test reward at the last response token (on in both presets)."""
    pass_reward: float = 1.0
    """R_UT of a response passing all its unit tests."""
    fail_reward: float = 0.0
    """R_UT of a failing response (0 as in the paper's RLTF framing; -1 for the ±1 convention)."""
    partial_credit: bool = False
    """Failing responses get credit in proportion to the tests they pass (an ablation)."""
    lambda_failed: float = 0.25
    """λ of the PRM line rewards of a failing response (paper: 0.25)."""
    lambda_passed: float = 0.025
    """λ of the PRM line rewards of a passing response (paper: 0.025)."""
    normalize_by_lines: bool = True
    """Divide each line reward by T, the number of non-neutral lines (paper: on)."""
    prm_clip: float | None = None
    """Clamp PRM scores to [-prm_clip, prm_clip] before scaling; None: no clipping."""
    kl_coef: float = 0.05
    """β of the per-token KL penalty to the reference (initial β when kl_target is set); 0: off."""
    kl_estimator: Literal["k1", "k2", "k3"] = "k1"
    """Per-token KL estimator (Schulman, "Approximating KL Divergence"): k1 unbiased (Ziegler et al.
    2019, TRL), k3 unbiased and >= 0."""
    kl_target: float | None = None
    """Adaptive β tracking this per-sequence KL (Ziegler et al. 2019); None: fixed β."""
    kl_horizon: int = 10_000
    """Horizon of the adaptive KL controller, in sequences."""

    # --- critic ----------------------------------------------------------------------------------------
    value_init: Literal["auto", "prm", "policy", "random"] = "auto"
    """Critic init: prm = the PRM checkpoint as is (paper); policy = the policy backbone with a fresh
    1-output head; random = fresh weights; auto = prm for --reward psgpo, policy for rltf."""

    # --- PPO ----------------------------------------------------------------------------------------
    gamma: float = 1.0
    """Discount (1: the usual choice for LM rewards, TRL's default)."""
    gae_lambda: float = 0.95
    """GAE λ (bias/variance trade-off of the advantages)."""
    lr: float = 1e-6
    """Policy learning rate (AdamW)."""
    critic_lr: float = 1e-5
    """Critic learning rate (AdamW; a separate optimizer, so no value-loss coefficient is needed:
    Adam is invariant to the loss scale)."""
    anneal_lr: bool = False
    """Decay both learning rates linearly to 0 over `steps` (CleanRL's anneal_lr)."""
    clip_eps: float = 0.2
    """PPO ratio clipping ε."""
    value_clip: float | None = 0.2
    """Clip the value prediction to ±value_clip around its sampling-time value (CleanRL clip_vloss);
    None: plain MSE."""
    ent_coef: float = 0.0
    """Entropy bonus coefficient (0: usual for LMs; entropy is logged either way)."""
    max_grad_norm: float = 1.0
    """Global gradient-norm clipping of each network (CleanRL)."""
    whiten_advantages: bool = True
    """Normalise advantages to mean 0, std 1 over the batch's valid tokens (CleanRL norm_adv)."""
    minibatch_size: int = 8
    """Trajectories per optimizer step (per rank under DDP)."""
    update_epochs: int = 1
    """PPO epochs over each batch."""
    target_kl: float | None = None
    """Stop the epochs early once the mean approx KL of an epoch exceeds this (CleanRL target_kl)."""

    # --- the loop --------------------------------------------------------------------------------------
    trajectories_per_step: int = 32
    """Usable trajectories per PPO step (divisible by the world size)."""
    samples_per_task: int = 4
    """n samples per enqueued task."""
    steps: int = 100
    """Total PPO steps (a resumed run continues up to this number)."""
    sync_every: int = 1
    """Publish the policy weights (a new version) every this many steps."""
    max_staleness: int = 2
    """Drop trajectories generated more than this many policy versions ago (-1: never drop)."""
    prefetch_steps: int = 1
    """Keep this many steps' worth of extra samples enqueued or waiting, so workers never idle."""
    temperature: float = 1.0
    """Sampling temperature put on enqueued tasks."""
    top_p: float = 1.0
    """Nucleus sampling put on enqueued tasks."""
    max_new_tokens: int = 256
    """Response length limit put on enqueued tasks."""
    batch_timeout_s: float = 600.0
    """Give up (error) when a step's trajectories do not arrive within this time."""
    checkpoint_every: int = 1
    """Checkpoint every this many steps (and at the last); deliveries are acknowledged at checkpoints.
    0: never checkpoint, acknowledge after each update (at most once, no resume)."""
    keep_checkpoints: int = 2
    """Checkpoints kept on disk (the newest)."""
    resume: bool = True
    """Resume from out_dir's latest checkpoint when there is one (--no-resume refuses to overwrite)."""
    claim_idle_ms: int = 120_000
    """Reclaim trajectories another (dead) trainer consumer held this long."""

    # --- machine ---------------------------------------------------------------------------------------
    seed: int = 0
    """Seed of every random choice (task order, sampling seeds, minibatch order, random critic)."""
    device: str = "auto"
    """auto (cuda if available), cpu, cuda; under torchrun each rank takes cuda:LOCAL_RANK."""
    forward_batch_size: int = 16
    """Trajectories per no-grad forward (reference, critic values)."""
    torch_threads: int = 0
    """torch intra-op threads (0: torch's default)."""
    metrics_port: int = 0
    """Prometheus /metrics port of rank 0 (0: off)."""
    parallel: Literal["ddp", "fsdp"] = "ddp"
    """Under torchrun: ddp = every rank holds the whole policy and critic (DistributedDataParallel);
    fsdp = the policy, the critic and the frozen reference are sharded over the ranks (FSDP2
    fully_shard per decoder layer, then the root), for models whose weights, gradients and Adam state
    do not fit one device. Checkpoints and published weights are full state dicts either way. Each rank
    still loads the full model before sharding it. Ignored in a single process."""

    def reward_config(self) -> RewardConfig:
        dense = {} if self.dense_prm is None else {"use_prm_dense": self.dense_prm}
        return RewardConfig.preset(
            self.reward,
            **dense,
            use_unit_test_reward=self.unit_test_reward,
            pass_reward=self.pass_reward,
            fail_reward=self.fail_reward,
            partial_credit=self.partial_credit,
            lambda_failed=self.lambda_failed,
            lambda_passed=self.lambda_passed,
            normalize_by_lines=self.normalize_by_lines,
            prm_clip=self.prm_clip,
            kl_coef=self.kl_coef,
            kl_estimator=self.kl_estimator,
            kl_target=self.kl_target,
            kl_horizon=self.kl_horizon,
        )

    def critic_init(self) -> str:
        if self.value_init != "auto":
            return self.value_init
        return "prm" if self.reward == "psgpo" else "policy"

    def consumer_name(self) -> str:
        return self.consumer or f"trainer-{self.run}"

    def check(self, world_size: int = 1) -> None:
        """UserError on arguments that cannot work together."""
        if self.policy is None:
            raise UserError("--policy is required (a Hugging Face causal LM dir)")
        if self.critic_init() == "prm" and self.prm_model is None:
            raise UserError("--value-init prm (the default with --reward psgpo) needs --prm-model DIR")
        positive = ("trajectories_per_step", "samples_per_task", "minibatch_size", "update_epochs",
                    "sync_every", "max_new_tokens", "forward_batch_size", "keep_checkpoints")  # fmt: skip
        for name in positive:
            if getattr(self, name) < 1:
                raise UserError(f"--{name.replace('_', '-')} must be >= 1")
        if self.steps < 0 or self.checkpoint_every < 0 or self.prefetch_steps < 0:
            raise UserError("--steps, --checkpoint-every and --prefetch-steps must be >= 0")
        if self.trajectories_per_step % world_size:
            raise UserError(f"--trajectories-per-step must be divisible by the world size {world_size}")
        try:
            self.reward_config()
        except ValueError as exc:
            raise UserError(str(exc)) from None


# =====================================================================================================
# Distributed setup (torchrun sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT)
# =====================================================================================================


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    initialized_here: bool = False

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def on(self) -> bool:
        return self.world > 1


def setup_distributed(device: str) -> Dist:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and world > 1:
        device = f"cuda:{local_rank}"
    if device.startswith("cuda"):
        torch.cuda.set_device(torch.device(device))
    initialized_here = False
    if world > 1 and not torch_dist.is_initialized():
        torch_dist.init_process_group(backend="nccl" if device.startswith("cuda") else "gloo")
        initialized_here = True
    return Dist(rank, world, torch.device(device), initialized_here)


def broadcast_object(obj: Any, dist: Dist) -> Any:
    """Rank 0's `obj` on every rank (pickled; small payloads: trajectory bytes, counters)."""
    if not dist.on:
        return obj
    box = [obj if dist.main else None]
    torch_dist.broadcast_object_list(box, src=0)
    return box[0]


def all_reduce_sum(values: torch.Tensor, dist: Dist) -> torch.Tensor:
    """Elementwise sum over ranks (on the rank's device: nccl reduces CUDA tensors only)."""
    if not dist.on:
        return values
    reduced = values.to(dist.device, copy=True)
    torch_dist.all_reduce(reduced)
    return reduced.to(values.device)


def sum_over_ranks(values: dict[str, Any], dist: Dist) -> dict[str, float]:
    """Named scalars (floats or 0-d tensors) summed over all ranks, as floats."""
    local = torch.tensor([float(v) for v in values.values()], dtype=torch.float64)
    return dict(zip(values, all_reduce_sum(local, dist).tolist(), strict=True))


def barrier(dist: Dist) -> None:
    if dist.on:
        torch_dist.barrier()


# =====================================================================================================
# Models: policy, frozen reference, critic
# =====================================================================================================


def quiet_transformers() -> None:
    """No progress bars or load reports: the critic checks below inspect the loading info themselves."""
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def load_policy(path: Path, device: torch.device) -> tuple[nn.Module, Any]:
    """(causal LM, tokenizer) from a Hugging Face dir, float32, in eval mode.

    Eval mode throughout (also while training) disables dropout: PPO's ratios and values must come
    from the same deterministic network that computed them (TRL's `disable_dropout_in_model`)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not (Path(path) / "config.json").is_file():
        raise UserError(f"{path} is not a Hugging Face model dir (no config.json)")
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    return model.to(device).eval(), tokenizer


def check_critic_checkpoint(path: Path) -> None:
    """Refuse, with one clear line, a critic/PRM dir that is not a token classifier with one label."""
    from transformers import AutoConfig

    if not (Path(path) / "config.json").is_file():
        raise UserError(f"critic checkpoint {path} is not a Hugging Face model dir (no config.json)")
    config = AutoConfig.from_pretrained(path)
    architectures = list(getattr(config, "architectures", None) or [])
    if not any(a.endswith("ForTokenClassification") for a in architectures):
        raise UserError(
            f"critic checkpoint {path} is {architectures or 'of unknown architecture'}, not a token "
            "classifier (AutoModelForTokenClassification with num_labels=1, the PRM format)"
        )
    if config.num_labels != 1:
        raise UserError(
            f"critic checkpoint {path} has num_labels={config.num_labels}; a value head needs exactly 1"
        )


def load_token_classifier(path: Path, device: torch.device) -> nn.Module:
    """A one-label token classifier whose every weight, head included, comes from `path`."""
    from transformers import AutoModelForTokenClassification

    check_critic_checkpoint(path)
    model, info = AutoModelForTokenClassification.from_pretrained(
        path, dtype=torch.float32, output_loading_info=True
    )
    if info["missing_keys"] or info["mismatched_keys"]:
        missing = sorted(info["missing_keys"]) + sorted(str(k) for k in info["mismatched_keys"])
        raise UserError(f"critic checkpoint {path} lacks weights {missing[:5]}: not a trained value head")
    return model.to(device).eval()


def same_vocabulary(policy_dir: Path, other_dir: Path) -> bool:
    from transformers import AutoTokenizer

    try:
        other = AutoTokenizer.from_pretrained(other_dir)
    except (OSError, ValueError):
        return False
    return AutoTokenizer.from_pretrained(policy_dir).get_vocab() == other.get_vocab()


def build_critic(args: PPOArgs, device: torch.device) -> nn.Module:
    """The value network V(s_t): a token classifier with one output per token.

    prm: the PRM checkpoint as is (the paper initialises the value function from the PRM: same
    architecture, same one-output head). policy: the policy's backbone with a fresh linear head.
    random: the policy's architecture, fresh weights (seeded).
    The critic reads the policy's token ids, so a PRM init needs the policy's tokenizer."""
    from transformers import AutoConfig, AutoModelForTokenClassification

    assert args.policy is not None
    init = args.critic_init()
    if init == "prm":
        assert args.prm_model is not None
        check_critic_checkpoint(args.prm_model)
        if not same_vocabulary(args.policy, args.prm_model):
            raise UserError(
                f"the PRM {args.prm_model} and the policy {args.policy} have different tokenizers: the "
                "critic reads the policy's tokens, so --value-init prm needs the same vocabulary "
                "(use --value-init policy; the dense PRM rewards work with any tokenizer)"
            )
        return load_token_classifier(args.prm_model, device)
    if init == "policy":
        model, info = AutoModelForTokenClassification.from_pretrained(
            args.policy, num_labels=1, dtype=torch.float32, output_loading_info=True
        )
        unexpected_missing = [k for k in info["missing_keys"] if not k.startswith(("score.", "classifier."))]
        if unexpected_missing:
            raise UserError(
                f"cannot build a critic on the backbone of {args.policy}: {unexpected_missing[:5]}"
            )
        return model.to(device).eval()
    if init == "random":
        config = AutoConfig.from_pretrained(args.policy, num_labels=1)
        torch.manual_seed(args.seed)
        return AutoModelForTokenClassification.from_config(config).to(device).eval()
    raise UserError(f"unknown --value-init {init!r} (prm, policy or random)")


def full_value(value: torch.Tensor) -> torch.Tensor:
    """A DTensor (FSDP) as the plain tensor it stands for; a plain tensor as it is."""
    return value.full_tensor() if hasattr(value, "full_tensor") else value


def unwrap(model: nn.Module) -> nn.Module:
    """The module under DDP's wrapper (FSDP2 shards the module in place: nothing to unwrap)."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def sharded(dist: Dist, args: PPOArgs) -> bool:
    return dist.on and args.parallel == "fsdp"


def shard_model(model: nn.Module, mesh: Any) -> nn.Module:
    """FSDP2: `fully_shard` each decoder layer (the classes HF lists in `_no_split_modules`), then the
    root (embeddings, final norm, heads: tied weights stay together in the root's group)."""
    from torch.distributed.fsdp import fully_shard

    layer_types = set(getattr(model, "_no_split_modules", None) or ())
    layers = [m for m in model.modules() if m is not model and type(m).__name__ in layer_types]
    if not layers:
        log.warning("%s lists no decoder layers (_no_split_modules): sharding it as one unit",
                    type(model).__name__)  # fmt: skip
    for layer in layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def full_state_dict(model: nn.Module, dist: Dist, args: PPOArgs) -> dict[str, torch.Tensor]:
    """The full (unsharded) weights, keyed as `unwrap(model).state_dict()`. Under FSDP a collective
    (every rank must call it) that returns them, on the CPU, on rank 0 only ({} elsewhere); tied
    parameters come back as one tensor under each of their names, as from `state_dict()`."""
    if not sharded(dist, args):
        return unwrap(model).state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if state:
        aliases: dict[int, list[str]] = {}
        for name, param in model.named_parameters(remove_duplicate=False):
            aliases.setdefault(id(param), []).append(name)
        for names in aliases.values():  # gathered separately: tie them again (save_pretrained dedupes)
            for name in names[1:]:
                if names[0] in state and name in state:
                    state[name] = state[names[0]]
    return state


def full_optimizer_state(
    model: nn.Module, optimizer: torch.optim.Optimizer, dist: Dist, args: PPOArgs
) -> dict[str, Any]:
    """`optimizer.state_dict()` in its usual form (parameters numbered in `model.parameters()` order).
    Under FSDP a collective: the gathered full state, on the CPU, on rank 0 only ({} elsewhere)."""
    if not sharded(dist, args):
        return optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    full = get_optimizer_state_dict(
        model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
    )
    if not dist.main:
        return {}
    number = {name: i for i, (name, _) in enumerate(model.named_parameters())}
    return {
        "state": {number[name]: value for name, value in full["state"].items()},
        "param_groups": [
            {**group, "params": [number[name] for name in group["params"]]} for group in full["param_groups"]
        ],
    }


def load_optimizer_state(
    model: nn.Module, optimizer: torch.optim.Optimizer, saved: dict[str, Any], dist: Dist, args: PPOArgs
) -> None:
    """Load a `full_optimizer_state` (every rank passes the whole of it; FSDP keeps this rank's shard)."""
    if not sharded(dist, args):
        optimizer.load_state_dict(saved)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    names = [name for name, _ in model.named_parameters()]
    by_name = {
        "state": {names[i]: value for i, value in saved["state"].items()},
        "param_groups": [
            {**group, "params": [names[i] for i in group["params"]]} for group in saved["param_groups"]
        ],
    }
    set_optimizer_state_dict(
        model, optimizer, optim_state_dict=by_name, options=StateDictOptions(full_state_dict=True)
    )


def parallelize(
    policy: nn.Module, critic: nn.Module, reference: nn.Module, dist: Dist, args: PPOArgs
) -> tuple[nn.Module, nn.Module, nn.Module]:
    """(policy, critic, reference) for this world: as they are in one process; policy and critic under
    DDP (the reference, never trained, stays whole); or all three sharded with FSDP2. The reference is
    sharded too because it is as large as the policy: keeping it whole would undo most of the saving."""
    if not dist.on:
        return policy, critic, reference
    if args.parallel == "fsdp":
        from torch.distributed.device_mesh import init_device_mesh

        # Every rank loaded the same weights (same files, same seed): fully_shard keeps its own slice.
        mesh = init_device_mesh(dist.device.type, (dist.world,))
        return shard_model(policy, mesh), shard_model(critic, mesh), shard_model(reference, mesh)
    # DDP broadcasts rank 0's parameters at construction; gradients are averaged in backward.
    ddp_ids = [dist.device.index] if dist.device.type == "cuda" else None
    return (
        nn.parallel.DistributedDataParallel(policy, device_ids=ddp_ids),
        nn.parallel.DistributedDataParallel(critic, device_ids=ddp_ids),
        reference,
    )


# =====================================================================================================
# Trajectories -> padded token batches
# =====================================================================================================


@dataclass
class TokenBatch:
    """Prompts left-padded to one width P, responses right-padded to T: every response starts at column
    P, so one slice of the model's outputs holds all of them (as OpenRLHF's `action_mask` layout)."""

    input_ids: torch.Tensor  # (B, P + T) prompt and response tokens, pad elsewhere
    attention_mask: torch.Tensor  # (B, P + T) 1 on real tokens
    position_ids: torch.Tensor  # (B, P + T) 0.. from each sequence's first real token
    prompt_width: int  # P: column of the first response token
    response_ids: torch.Tensor  # (B, T)
    mask: torch.Tensor  # (B, T) bool, True on response tokens
    logp_old: torch.Tensor  # (B, T) raw-policy logprobs recorded at sampling time

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])

    def rows(self, index: torch.Tensor | slice) -> TokenBatch:
        return TokenBatch(
            self.input_ids[index],
            self.attention_mask[index],
            self.position_ids[index],
            self.prompt_width,
            self.response_ids[index],
            self.mask[index],
            self.logp_old[index],
        )


def make_batch(trajectories: Sequence[Trajectory], pad_id: int, device: torch.device) -> TokenBatch:
    B = len(trajectories)
    P = max(len(t.prompt_token_ids) for t in trajectories)
    T = max(len(t.response_token_ids) for t in trajectories)
    input_ids = torch.full((B, P + T), pad_id, dtype=torch.long)  # (B, P + T)
    attention_mask = torch.zeros((B, P + T), dtype=torch.long)  # (B, P + T)
    response_ids = torch.full((B, T), pad_id, dtype=torch.long)  # (B, T)
    mask = torch.zeros((B, T), dtype=torch.bool)  # (B, T)
    logp_old = torch.zeros((B, T), dtype=torch.float32)  # (B, T)
    for b, traj in enumerate(trajectories):
        prompt, response = list(traj.prompt_token_ids), list(traj.response_token_ids)
        p, n = len(prompt), len(response)
        input_ids[b, P - p : P + n] = torch.tensor(prompt + response)
        attention_mask[b, P - p : P + n] = 1
        response_ids[b, :n] = torch.tensor(response)
        mask[b, :n] = True
        logp_old[b, :n] = torch.tensor(list(traj.logprobs), dtype=torch.float32)
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)  # (B, P + T) left padding: count from 0
    return TokenBatch(
        input_ids.to(device),
        attention_mask.to(device),
        position_ids.to(device),
        P,
        response_ids.to(device),
        mask.to(device),
        logp_old.to(device),
    )


def policy_logits(model: nn.Module, batch: TokenBatch) -> torch.Tensor:
    """Logits predicting each response token, (B, T, V): the outputs at columns P-1 .. P+T-2.
    `logits_to_keep` skips the LM head on the prompt."""
    T = batch.response_ids.shape[1]
    out = model(
        input_ids=batch.input_ids,
        attention_mask=batch.attention_mask,
        position_ids=batch.position_ids,
        logits_to_keep=T + 1,
        use_cache=False,
    )
    return out.logits[:, :-1]  # (B, T, V)


def critic_values(critic: nn.Module, batch: TokenBatch) -> torch.Tensor:
    """V(s_t) for each response token t, (B, T): the critic's output at column P-1+t, the last token of
    the state (prompt + response[:t]) from which token t is chosen (as OpenRLHF's critic)."""
    T = batch.response_ids.shape[1]
    out = critic(
        input_ids=batch.input_ids, attention_mask=batch.attention_mask, position_ids=batch.position_ids
    )
    start = batch.prompt_width - 1
    return out.logits[:, start : start + T, 0].float()  # (B, T)


def in_chunks(batch: TokenBatch, size: int) -> Iterator[TokenBatch]:
    for start in range(0, len(batch), size):
        yield batch.rows(slice(start, start + size))


# =====================================================================================================
# Which trajectories can be trained on
# =====================================================================================================


def skip_reason(traj: Trajectory, cfg: RewardConfig, vocab_size: int, max_positions: int) -> str | None:
    """Why a scored trajectory cannot be trained on (a metric label), or None. Never a made-up reward."""
    components = {f.component for f in traj.failures}
    if "task" in components:
        return "task_failure"  # the worker could not roll the task out at all
    if "sandbox" in components and cfg.use_unit_test_reward:
        return "sandbox_failure"
    if "prm" in components and cfg.use_prm_dense:
        return "prm_failure"
    if not traj.prompt_token_ids:
        return "no_prompt_tokens"
    ids = list(traj.prompt_token_ids) + list(traj.response_token_ids)
    if min(ids) < 0 or max(ids) >= vocab_size:
        return "token_out_of_vocab"
    if len(ids) > max_positions:
        return "too_long"
    try:
        trajectory_token_rewards(traj, cfg)  # NaN logprobs, missing verdict or PRM scores, NaN scores
    except RewardError as exc:
        return exc.reason
    return None


def staleness(traj: Trajectory, version: int) -> int:
    return version - int(traj.policy_version)


# =====================================================================================================
# Rank 0: the trajectory stream, task top-up, acknowledgements
# =====================================================================================================


class StopRequested(Exception):
    """`stop()` turned true while waiting for trajectories: leave without training on a partial batch."""


@dataclass
class Collected:
    trajectories: list[Trajectory]  # exactly trajectories_per_step usable ones
    dropped_stale: int = 0
    skipped: Counter[str] = field(default_factory=Counter)
    wait_s: float = 0.0
    tasks_enqueued: int = 0


def ack_deliveries(consumer: Any, deliveries: Sequence[Any]) -> None:
    """XACK + record the trajectory ids as consumed (one MULTI, `StreamConsumer.ack`)."""
    if deliveries:
        consumer.ack(*deliveries)


class TrajectorySource:
    """Rank 0's side of Redis: reads the `trainer` group, keeps the tasks stream topped up, and holds
    every delivery (used, stale or skipped) until the step that read it is committed."""

    def __init__(self, r: Any, args: PPOArgs, feeder: Any) -> None:
        from services.common import keys
        from services.common.streams import trajectory_consumer

        self.r = r
        self.args = args
        self.keys = keys.run_keys(args.run)
        self.consumer = trajectory_consumer(
            r, args.run, args.consumer_name(), claim_idle_ms=args.claim_idle_ms, max_deliveries=5
        )
        self.feeder = feeder
        self.held: list[Any] = []  # deliveries read but not acknowledged yet (committed at a checkpoint)
        self._held_ids: set[str] = set()

    def acknowledge_committed(self, committed: Sequence[Sequence[str]]) -> int:
        """Acknowledge what a checkpoint already contains (a crash between commit and ack)."""
        from services.common.streams import Delivery

        deliveries = [Delivery(eid, Trajectory(trajectory_id=tid), 0, b"") for eid, tid in committed]
        ack_deliveries(self.consumer, deliveries)
        return len(deliveries)

    def top_up(self, still_needed: int) -> int:
        """Enqueue tasks until the samples in flight (tasks not yet rolled out × n + trajectories not yet
        read) cover this step's remainder and `prefetch_steps` more steps. Returns tasks enqueued."""
        if self.feeder is None:
            return 0
        from services.common import keys
        from services.common.streams import backlog, enqueue_tasks

        n = self.args.samples_per_task
        tasks_waiting = backlog(self.r, self.keys.tasks, keys.TASKS_GROUP).unconsumed
        unread = backlog(self.r, self.keys.trajectories, keys.TRAJECTORIES_GROUP).unconsumed - len(self.held)
        in_flight = tasks_waiting * n + max(0, unread)
        target = still_needed + self.args.prefetch_steps * self.args.trajectories_per_step
        if in_flight >= target:
            return 0
        count = math.ceil((target - in_flight) / n)
        enqueue_tasks(self.r, self.args.run, self.feeder.next_tasks(count))
        return count

    def collect(
        self,
        n: int,
        version: int,
        cfg: RewardConfig,
        vocab_size: int,
        max_positions: int,
        stop: Callable[[], bool] | None = None,
    ) -> Collected:
        """Exactly `n` usable trajectories; stale and unusable ones are counted (and held for the ack)."""
        out = Collected([])
        t0 = time.perf_counter()
        deadline = time.monotonic() + self.args.batch_timeout_s
        while len(out.trajectories) < n:
            if stop is not None and stop():
                raise StopRequested
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"only {len(out.trajectories)} of {n} usable trajectories after "
                    f"{self.args.batch_timeout_s}s "
                    f"(run {self.args.run!r}; are rollout workers running? skipped: {dict(out.skipped)}, "
                    f"stale: {out.dropped_stale})"
                )
            out.tasks_enqueued += self.top_up(n - len(out.trajectories))
            for delivery in self.consumer.read(count=min(64, n - len(out.trajectories)), block_ms=1000):
                if delivery.id in self._held_ids:  # our own held entry, reclaimed after claim_idle_ms
                    continue
                self.held.append(delivery)
                self._held_ids.add(delivery.id)
                traj = delivery.message
                if self.args.max_staleness >= 0 and staleness(traj, version) > self.args.max_staleness:
                    out.dropped_stale += 1
                    continue
                reason = skip_reason(traj, cfg, vocab_size, max_positions)
                if reason is not None:
                    out.skipped[reason] += 1
                    log.warning("skipping trajectory %s: %s", traj.trajectory_id, reason)
                    continue
                out.trajectories.append(traj)
        out.wait_s = time.perf_counter() - t0
        return out

    def commit(self) -> list[tuple[str, str]]:
        """The held deliveries as (entry id, trajectory id): what the next checkpoint covers."""
        return [(d.id, d.message.trajectory_id) for d in self.held]

    def acknowledge_held(self) -> None:
        ack_deliveries(self.consumer, self.held)
        self.held, self._held_ids = [], set()

    def keepalive(self) -> None:
        """Held entries stay ours (reset their idle time, so nobody reclaims them before the commit)."""
        self.consumer.keepalive(*self.held)


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


def check_replicas_in_sync(models: Sequence[nn.Module], dist: Dist, args: PPOArgs | None = None) -> None:
    """Every rank holds the same weights (DDP keeps them so; a cheap checksum proves it). Under FSDP
    there are no replicas (each rank holds its own shard): nothing to check."""
    if not dist.on or (args is not None and sharded(dist, args)):
        return
    total = sum(float(p.detach().double().sum()) for m in models for p in unwrap(m).parameters())
    mine = torch.tensor([total, -total], dtype=torch.float64, device=dist.device)
    torch_dist.all_reduce(mine, op=torch_dist.ReduceOp.MAX)
    if mine[0] != -mine[1]:
        raise RuntimeError(f"DDP replicas diverged: parameter checksums range over [{-mine[1]}, {mine[0]}]")


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


def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> float:
    """1 - Var(R - V) / Var(R) over valid tokens (CleanRL logs it; 1 is a perfect critic)."""
    m = mask.float()
    if m.sum() < 2:
        return float("nan")
    var_r = masked_mean((returns - masked_mean(returns, m)) ** 2, m)
    diff = returns - values
    var_d = masked_mean((diff - masked_mean(diff, m)) ** 2, m)
    return float(1.0 - var_d / var_r) if var_r > 0 else float("nan")


# =====================================================================================================
# Training
# =====================================================================================================


@dataclass
class TrainResult:
    """What `train` ends with. Under `--parallel fsdp` policy and critic hold this rank's shards
    (DTensors): gather them with `get_model_state_dict(..., full_state_dict=True)` while the process group
    is still up (a caller that wants that initialises the group itself), or read out_dir/policy."""

    policy: nn.Module
    critic: nn.Module
    state: TrainerState
    out_dir: Path
    resumed_from: int | None


def whiten(advantages: torch.Tensor, mask: torch.Tensor, dist: Dist) -> torch.Tensor:
    """Masked whitening over the whole batch: `masked_whiten` on one rank; over all ranks' tokens under
    DDP (sums all-reduced), so sharding does not change the advantages."""
    if not dist.on:
        return masked_whiten(advantages, mask)
    m = mask.to(advantages.dtype)
    sums = all_reduce_sum(
        torch.stack([masked_sum(advantages, m), masked_sum(advantages**2, m), m.sum()]), dist
    )
    count = sums[2]
    mean = sums[0] / count
    var = (sums[1] / count - mean**2) * count / (count - 1)  # Bessel, as masked_var
    return torch.where(
        mask.bool(), (advantages - mean) * torch.rsqrt(var + 1e-8), torch.zeros_like(advantages)
    )


def train(args: PPOArgs, stop: Callable[[], bool] | None = None) -> TrainResult:
    """Run PPO until `args.steps` (or `stop()` turns true between steps). See the module docstring."""
    from tqdm.auto import tqdm

    dist = setup_distributed(args.device)
    args.check(dist.world)
    assert args.policy is not None
    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    quiet_transformers()
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    reward_cfg = args.reward_config()
    random.seed(args.seed + dist.rank)
    torch.manual_seed(args.seed)
    minibatch_rng = torch.Generator().manual_seed(args.seed + dist.rank)

    # ---- resume or start fresh -------------------------------------------------------------------------
    checkpoint = latest_checkpoint(out_dir)
    if checkpoint is not None and not args.resume:
        raise UserError(
            f"{out_dir} holds a checkpoint ({checkpoint.name}); pass --resume or another --out-dir"
        )
    state = load_trainer_state(checkpoint) if checkpoint is not None else TrainerState(kl_coef=args.kl_coef)

    # ---- models: the policy (trained), a frozen reference, the critic (trained) --------------------
    policy, tokenizer = load_policy(checkpoint / "policy" if checkpoint else args.policy, dist.device)
    reference, _ = load_policy(args.ref_policy or args.policy, dist.device)
    reference.requires_grad_(False)
    if checkpoint is not None:
        critic = load_token_classifier(checkpoint / "critic", dist.device)
    else:
        critic = build_critic(args, dist.device)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    vocab_size = int(unwrap(policy).get_input_embeddings().weight.shape[0])
    max_positions = int(getattr(policy.config, "max_position_embeddings", 1 << 30))
    kl_ctl = make_kl_controller(reward_cfg)
    if checkpoint is not None:
        kl_ctl.value = state.kl_coef
        rng_file = checkpoint / f"rng-rank{dist.rank}.pt"
        if rng_file.is_file():
            set_rng_state(torch.load(rng_file, weights_only=True), minibatch_rng)
        else:
            log.warning(
                "no RNG state for rank %d in %s (another world size?): fresh streams", dist.rank, checkpoint
            )

    # ---- rank 0: Redis, weights, tasks, logs --------------------------------------------------------
    source: TrajectorySource | None = None
    publisher = None
    metrics_log: MetricsLog | None = None
    if dist.main:
        from services.common.streams import connect
        from services.common.weights import WeightPublisher, read_policy
        from trainer.data import SamplingDefaults, TaskFeeder, load_tasks

        for name in ("metrics.jsonl", "trained_ids.jsonl"):  # drop what the restored weights do not contain
            truncate_jsonl(out_dir / name, state.step)
        metrics_log = MetricsLog(out_dir, args.metrics_port)
        r = connect(args.redis_url)
        feeder = None
        if args.task_source != "none":
            feeder = TaskFeeder(
                load_tasks(args.task_source),
                seed=args.seed,
                samples_per_task=args.samples_per_task,
                sampling=SamplingDefaults(args.temperature, args.top_p, args.max_new_tokens),
                score_with_prm=reward_cfg.use_prm_dense,
                incarnation=secrets.token_hex(3),  # task ids unique to this process (see TaskFeeder)
                cursor=state.task_cursor,
            )
        source = TrajectorySource(r, args, feeder)
        if state.committed:
            done = source.acknowledge_committed(state.committed)
            log.info("acknowledged %d trajectories the checkpoint already contains", done)
        publisher = WeightPublisher(r, args.run, out_dir / "weights", keep=3)
        published = read_policy(r, args.run)
        announced = published.version if published is not None else 0
        if announced > state.policy_version:
            # Redis announces weights the restored ones are not (published after the checkpoint, then
            # lost with the crash, or a previous run): put the workers on ours under a newer version.
            state.policy_version = announced + 1
            publisher.publish(state.policy_version, unwrap(policy).state_dict())
        elif announced < state.policy_version:  # killed between the checkpoint and the publish
            publisher.publish(state.policy_version, unwrap(policy).state_dict())
    # ---- every rank: DDP or FSDP, then the optimizers (on the sharded parameters under FSDP) ----------
    # After rank 0's start-up publish above, which reads the whole, not yet sharded, policy.
    policy, critic, reference = parallelize(policy, critic, reference, dist, args)
    # CleanRL: Adam eps 1e-5 (instead of 1e-8), "The 37 Implementation Details of PPO", detail 3.
    policy_opt = torch.optim.AdamW(policy.parameters(), lr=args.lr, eps=1e-5, weight_decay=0.0)
    critic_opt = torch.optim.AdamW(critic.parameters(), lr=args.critic_lr, eps=1e-5, weight_decay=0.0)
    optimizers = {"policy": policy_opt, "critic": critic_opt}
    trained_models = {"policy": policy, "critic": critic}
    if checkpoint is not None:
        for name, opt_state in torch.load(checkpoint / "optimizers.pt", weights_only=True).items():
            load_optimizer_state(trained_models[name], optimizers[name], opt_state, dist, args)
        log.info("resumed from %s (step %d, policy version %d)", checkpoint, state.step, state.policy_version)
    resumed_from = state.step if checkpoint is not None else None

    progress = tqdm(
        total=args.steps, initial=state.step, desc="ppo", disable=not dist.main, dynamic_ncols=True
    )
    for step in range(state.step + 1, args.steps + 1):
        step_start = time.perf_counter()
        if args.anneal_lr:  # CleanRL: linear decay to 0 over the run
            frac = 1.0 - (step - 1) / max(1, args.steps)
            for optimizer, base_lr in ((policy_opt, args.lr), (critic_opt, args.critic_lr)):
                optimizer.param_groups[0]["lr"] = frac * base_lr

        # ---- 1. Collect: rank 0 reads the stream, every rank gets its shard -----------------------------
        payload: dict[str, Any] | None = None
        if dist.main:
            assert source is not None
            try:
                got = source.collect(
                    args.trajectories_per_step,
                    state.policy_version,
                    reward_cfg,
                    vocab_size,
                    max_positions,
                    stop,
                )
                payload = {
                    "trajectories": [t.SerializeToString() for t in got.trajectories],
                    "version": state.policy_version,
                    "dropped_stale": got.dropped_stale,
                    "skipped": dict(got.skipped),
                    "wait_s": got.wait_s,
                    "tasks_enqueued": got.tasks_enqueued,
                }
            except StopRequested:  # this step's deliveries stay pending: a restart trains on them
                payload = {"stop": True}
            except Exception as exc:  # tell the other ranks, then fail (they would wait in the broadcast)
                broadcast_object({"error": f"{type(exc).__name__}: {exc}"}, dist)
                raise
        payload = broadcast_object(payload, dist)
        assert payload is not None
        if "error" in payload:
            raise RuntimeError(f"rank 0 failed: {payload['error']}")
        if "stop" in payload:
            log.warning("stopped while waiting for the trajectories of step %d", step)
            break
        everything = [Trajectory.FromString(raw) for raw in payload["trajectories"]]
        shard = everything[dist.rank :: dist.world]  # (B,) this rank's trajectories
        batch = make_batch(shard, pad_id, dist.device)
        update_start = time.perf_counter()

        # ---- 2. Rewards: unit tests + dense PRM (trainer.rewards), minus β·KL to the reference ---------
        with torch.no_grad():
            token_rewards = [trajectory_token_rewards(t, reward_cfg) for t in shard]  # B × (n_b,)
            scores, _ = batch_token_rewards(token_rewards, length=batch.mask.shape[1])  # (B, T)
            scores = scores.to(dist.device)
            logp_ref = torch.cat(
                [
                    logprobs_from_logits(policy_logits(reference, chunk), chunk.response_ids)
                    for chunk in in_chunks(batch, args.forward_batch_size)
                ]
            )  # (B, T)
            beta = kl_ctl.value
            # KL of the sampling-time policy to the reference, fixed for the whole update (trainer.kl).
            rewards, kl = kl_penalized_rewards(
                scores, batch.logp_old, logp_ref, batch.mask, beta, reward_cfg.kl_estimator
            )  # (B, T), (B, T)

            # ---- 3. Values (critic at "sampling time"), GAE, whitening ------------------------------
            values = torch.cat(
                [critic_values(unwrap(critic), chunk) for chunk in in_chunks(batch, args.forward_batch_size)]
            )  # (B, T)
            advantages, returns = compute_gae(
                rewards, values, batch.mask, args.gamma, args.gae_lambda
            )  # (B, T)
            raw_advantages = advantages
            if args.whiten_advantages:
                advantages = whiten(advantages, batch.mask, dist)  # (B, T)

            unit_parts = torch.tensor(
                [
                    unit_test_reward(
                        t.verdict.passed, t.verdict.tests_passed, t.verdict.tests_total, reward_cfg
                    )
                    if reward_cfg.use_unit_test_reward
                    else 0.0
                    for t in shard
                ]
            )  # (B,)
            score_sums = masked_sum(scores, batch.mask, dim=-1).cpu()  # (B,) unit + PRM per response
            # Sums over the whole batch (all ranks) for the KL controller and the logs.
            totals = sum_over_ranks(
                {
                    "kl": masked_sum(kl, batch.mask),  # Σ per-sequence KL
                    "unit": unit_parts.sum(),
                    "prm": (score_sums - unit_parts).sum(),
                    "reward": masked_sum(rewards, batch.mask),
                    "passed": sum(t.verdict.passed for t in shard),
                    "tokens": batch.mask.sum(),
                    "value": masked_sum(values, batch.mask),
                    "advantage": masked_sum(raw_advantages, batch.mask),
                    "return": masked_sum(returns, batch.mask),
                },
                dist,
            )
            n_total = len(everything)
            mean_kl = totals["kl"] / n_total
        kl_ctl.update(mean_kl, n_steps=n_total)  # Ziegler et al. 2019: adapt β after each batch

        # ---- 4. PPO epochs over minibatches ------------------------------------------------------------
        stats: dict[str, list[float]] = {k: [] for k in (
            "loss/policy", "loss/value", "entropy", "clip_frac", "value_clip_frac", "approx_kl",
            "old_approx_kl", "ratio_mean", "grad_norm/policy", "grad_norm/critic")}  # fmt: skip
        drift_kl = float("nan")
        epochs_run = 0
        for _epoch in range(args.update_epochs):
            epoch_kl: list[float] = []
            order = torch.randperm(len(batch), generator=minibatch_rng)
            for start in range(0, len(batch), args.minibatch_size):
                index = order[start : start + args.minibatch_size].to(dist.device)
                mb = batch.rows(index)
                logits = policy_logits(policy, mb)  # (b, T, V)
                logp = logprobs_from_logits(logits, mb.response_ids)  # (b, T)
                pg = ppo_policy_loss(logp, mb.logp_old, advantages[index], mb.mask, args.clip_eps)
                if args.ent_coef:
                    entropy = masked_entropy(logits, mb.mask)
                else:
                    with torch.no_grad():
                        entropy = masked_entropy(logits, mb.mask)
                new_values = critic_values(critic, mb)  # (b, T)
                vf = value_loss(new_values, values[index], returns[index], mb.mask, args.value_clip)
                loss = pg.loss - args.ent_coef * entropy + vf.loss
                policy_opt.zero_grad(set_to_none=True)
                critic_opt.zero_grad(set_to_none=True)
                loss.backward()  # DDP all-reduces (FSDP reduce-scatters) the averaged gradients here
                # Under FSDP the norms are DTensors over the shards: full_tensor() is the global norm.
                policy_norm = full_value(nn.utils.clip_grad_norm_(policy.parameters(), args.max_grad_norm))
                critic_norm = full_value(nn.utils.clip_grad_norm_(critic.parameters(), args.max_grad_norm))
                policy_opt.step()
                critic_opt.step()
                if math.isnan(drift_kl):  # before any update of this step: sampling policy vs trainer's
                    drift_kl = float(pg.approx_kl)
                for key, value in (("loss/policy", pg.loss), ("loss/value", vf.loss), ("entropy", entropy),
                                   ("clip_frac", pg.clip_frac), ("value_clip_frac", vf.clip_frac),
                                   ("approx_kl", pg.approx_kl), ("old_approx_kl", pg.old_approx_kl),
                                   ("ratio_mean", pg.ratio_mean), ("grad_norm/policy", policy_norm),
                                   ("grad_norm/critic", critic_norm)):  # fmt: skip
                    stats[key].append(float(value.detach()))
                epoch_kl.append(float(pg.approx_kl))
            epochs_run += 1
            if args.target_kl is not None:  # CleanRL: early stop; the decision is the same on every rank
                mean_epoch_kl = sum_over_ranks({"kl": sum(epoch_kl) / len(epoch_kl)}, dist)["kl"] / dist.world
                if mean_epoch_kl > args.target_kl:
                    break
        update_s = time.perf_counter() - update_start

        # ---- 5. Log, commit (checkpoint, then ack), publish -------------------------------------------
        rank_means = {key: sum(v) / len(v) for key, v in stats.items()} | {"policy_drift_kl": drift_kl}
        means = {key: v / dist.world for key, v in sum_over_ranks(rank_means, dist).items()}  # over ranks
        tokens = int(totals["tokens"])
        state.step = step
        state.trajectories_trained += n_total
        state.tokens_trained += tokens
        state.kl_coef = kl_ctl.value
        publish_now = step % args.sync_every == 0
        if publish_now:  # the version is decided (and checkpointed) before the publish below
            state.policy_version += 1
        metrics: dict[str, Any] = {
            "step": step,
            "time": time.time(),
            "policy_version": payload["version"],
            "published_version": state.policy_version if publish_now else None,
            "reward/total": totals["reward"] / n_total,
            "reward/unit_test": totals["unit"] / n_total,
            "reward/prm": totals["prm"] / n_total,
            "reward/kl_penalty": -beta * mean_kl,
            "pass_rate": totals["passed"] / n_total,
            "kl": mean_kl,
            "kl_coef": beta,
            **means,
            "value/mean": totals["value"] / tokens,
            "value/explained_variance": explained_variance(values, returns, batch.mask),
            "advantages/mean": totals["advantage"] / tokens,
            "returns/mean": totals["return"] / tokens,
            "response_length": tokens / n_total,
            "staleness/mean": sum(staleness(t, payload["version"]) for t in everything) / n_total,
            "staleness/max": max(staleness(t, payload["version"]) for t in everything),
            "dropped/stale": payload["dropped_stale"],
            **{f"skipped/{reason}": count for reason, count in sorted(payload["skipped"].items())},
            "skipped/total": sum(payload["skipped"].values()),
            "trajectories": n_total,
            "tasks_enqueued": payload["tasks_enqueued"],
            "epochs_run": epochs_run,
            "lr": policy_opt.param_groups[0]["lr"],
            "time/wait_s": payload["wait_s"],
            "time/update_s": update_s,
            "time/step_s": time.perf_counter() - step_start,
            "throughput/tokens_per_s": tokens / max(1e-9, time.perf_counter() - step_start),
            "throughput/trajectories_per_s": n_total / max(1e-9, time.perf_counter() - step_start),
        }
        if dist.main:
            assert metrics_log is not None and source is not None
            metrics_log.write(metrics, everything)  # before the commit: truncated back on resume
            state.task_cursor = source.feeder.cursor if source.feeder is not None else 0
        # rank 0 decides (a signal may reach the ranks at different moments; all must checkpoint together)
        stopping = broadcast_object(step == args.steps or (stop is not None and stop()), dist)
        checkpoint_now = args.checkpoint_every > 0 and (step % args.checkpoint_every == 0 or stopping)
        if checkpoint_now:
            check_replicas_in_sync([policy, critic], dist, args)
            state.committed = source.commit() if source is not None else []
            save_checkpoint(out_dir, state, policy, critic, tokenizer, optimizers, minibatch_rng, args, dist)
        if source is not None:
            if checkpoint_now or args.checkpoint_every == 0:
                source.acknowledge_held()  # the update is durable (or, with no checkpoints, applied)
            else:
                source.keepalive()
        if publish_now:
            weights = full_state_dict(policy, dist, args)  # every rank gathers under FSDP
            if dist.main:
                assert publisher is not None
                publisher.publish(state.policy_version, weights)
            del weights
        state.committed = []
        progress.update(1)
        progress.set_postfix(
            reward=f"{metrics['reward/total']:.3f}", passed=f"{metrics['pass_rate']:.2f}", kl=f"{mean_kl:.3f}"
        )
        if stopping:
            break
    progress.close()

    final_weights = full_state_dict(policy, dist, args)  # every rank gathers under FSDP
    if dist.main:
        final = out_dir / "policy"
        unwrap(policy).save_pretrained(final, state_dict=final_weights, safe_serialization=True)
        tokenizer.save_pretrained(final)
    del final_weights
    barrier(dist)
    if dist.initialized_here:
        torch_dist.destroy_process_group()
    return TrainResult(unwrap(policy), unwrap(critic), state, out_dir, resumed_from)


def main(argv: Sequence[str] | None = None) -> None:
    """`python -m trainer.ppo --flags` (and `torchrun ... -m trainer.ppo --flags`)."""
    import sys

    from trainer.cli_train import run_ppo

    try:
        run_ppo(argv)
    except UserError as exc:  # one line, as `psgpo` prints it
        print(f"psgpo: error: {exc}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
