"""PPO for code generation with the PSGPO reward (arXiv 2410.17621), in the spirit of CleanRL's ppo.py:
the algorithm in this file, read it top to bottom. Its plumbing lives beside it: `trainer.source`
(trajectories from Redis), `trainer.batch` (tensors and forwards), `trainer.modeling` (policy, reference,
critic), `trainer.checkpoint` (state on disk), `trainer.distributed` (DDP / FSDP). The pure math lives
in small tested modules: `trainer.rewards` (where
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

import logging
import math
import random
import secrets
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
import torch.distributed as torch_dist
from torch import nn

from psgpo.v1.rollout_pb2 import Trajectory
from services.common.errors import UserError
from trainer.batch import critic_values, in_chunks, make_batch, policy_logits
from trainer.checkpoint import (
    MetricsLog,
    TrainerState,
    latest_checkpoint,
    load_trainer_state,
    save_checkpoint,
    save_final_policy,
    set_rng_state,
    truncate_jsonl,
)
from trainer.distributed import (
    Dist,
    all_reduce_sum,
    barrier,
    broadcast_object,
    check_replicas_in_sync,
    full_state_dict,
    full_value,
    load_optimizer_state,
    parallelize,
    setup_distributed,
    sum_over_ranks,
    unwrap,
)
from trainer.gae import compute_gae, masked_mean, masked_sum, masked_whiten
from trainer.kl import kl_penalized_rewards, make_kl_controller
from trainer.losses import logprobs_from_logits, masked_entropy, ppo_policy_loss, value_loss
from trainer.modeling import build_critic, load_policy, load_token_classifier, quiet_transformers
from trainer.rewards import (
    RewardConfig,
    batch_token_rewards,
    trajectory_token_rewards,
    unit_test_reward,
)
from trainer.source import StopRequested, TrajectorySource, staleness

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
                assert publisher is not None and source is not None
                source.publish(publisher, state.policy_version, weights)  # rides out a Redis restart
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
        save_final_policy(out_dir / "policy", unwrap(policy), final_weights, tokenizer)
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
