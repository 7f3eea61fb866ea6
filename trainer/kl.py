"""Per-token KL penalty to a frozen reference policy, and the controllers of its coefficient β.

KL(π || π_ref) is estimated per sampled token from the two log-probabilities of that token, after
John Schulman, "Approximating KL Divergence" (http://joschu.net/blog/kl-approx.html). With x ~ π
(the tokens were sampled from the policy) and r = π_ref(x) / π(x):

    k1 = -log r = log π - log π_ref          unbiased, high variance, can be negative per token
    k2 = ½ (log r)²                           biased, low variance, ≥ 0
    k3 = (r - 1) - log r                      unbiased, low variance, ≥ 0 per token

Sign convention: a positive KL estimate means the policy drifted away from the reference; the
penalised reward is r_t - β·KL_t (Ziegler et al. 2019, "Fine-Tuning Language Models from Human
Preferences"; TRL, OpenRLHF). `logp` should be the policy's log-probabilities of the sampled tokens
at sampling time (the trajectory's `logprobs`), so the reward is fixed for the whole PPO update.
"""

from __future__ import annotations

import torch

from trainer.gae import masked_sum
from trainer.rewards import KLEstimator, RewardConfig


def kl_k1(logp: torch.Tensor, logp_ref: torch.Tensor) -> torch.Tensor:
    """k1 = log π(x) - log π_ref(x), elementwise, any shape."""
    return logp - logp_ref


def kl_k2(logp: torch.Tensor, logp_ref: torch.Tensor) -> torch.Tensor:
    """k2 = ½ (log π(x) - log π_ref(x))², elementwise."""
    return 0.5 * (logp - logp_ref) ** 2


def kl_k3(logp: torch.Tensor, logp_ref: torch.Tensor) -> torch.Tensor:
    """k3 = (r - 1) - log r with r = π_ref(x) / π(x), elementwise; ≥ 0 since e^u ≥ 1 + u.

    expm1 keeps the small-difference case exact (r - 1 ≈ log r there, and both would round).
    """
    log_r = logp_ref - logp
    return torch.expm1(log_r) - log_r


_ESTIMATORS = {"k1": kl_k1, "k2": kl_k2, "k3": kl_k3}


def kl_per_token(logp: torch.Tensor, logp_ref: torch.Tensor, estimator: KLEstimator = "k1") -> torch.Tensor:
    """The chosen estimator of KL(π || π_ref) at each sampled token, shape of logp (e.g. (B, T))."""
    if logp.shape != logp_ref.shape:
        raise ValueError(f"logp {tuple(logp.shape)} and logp_ref {tuple(logp_ref.shape)} differ in shape")
    try:
        fn = _ESTIMATORS[estimator]
    except KeyError:
        raise ValueError(f"unknown KL estimator {estimator!r} (k1, k2 or k3)") from None
    return fn(logp, logp_ref)


def kl_penalized_rewards(
    token_rewards: torch.Tensor,
    logp: torch.Tensor,
    logp_ref: torch.Tensor,
    mask: torch.Tensor,
    kl_coef: float,
    estimator: KLEstimator = "k1",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Combined reward r_t - β·KL_t for every valid token; returns (rewards (B, T), kl (B, T)).

    token_rewards: (B, T) from `trainer.rewards` (unit-test + PRM), logp / logp_ref: (B, T) policy at
    sampling time / frozen reference, mask: (B, T). Both outputs are 0 on padding. The KL is
    returned so the trainer can log it and feed `mean_sequence_kl` to the KL controller.
    """
    if not (token_rewards.shape == logp.shape == mask.shape):
        raise ValueError(
            f"token_rewards {tuple(token_rewards.shape)}, logp {tuple(logp.shape)} and mask "
            f"{tuple(mask.shape)} must have one shape"
        )
    valid = mask.bool()
    kl = kl_per_token(logp, logp_ref, estimator)  # (B, T)
    kl = torch.where(valid, kl, torch.zeros_like(kl))  # (B, T) nothing from padding
    rewards = torch.where(valid, token_rewards - kl_coef * kl, torch.zeros_like(kl))  # (B, T)
    return rewards, kl


def mean_sequence_kl(kl: torch.Tensor, mask: torch.Tensor) -> float:
    """KL per response (sum over its tokens), averaged over the batch: what the controller tracks
    (as lm-human-preferences and TRL, where the target is a per-sequence KL)."""
    return float(masked_sum(kl, mask, dim=-1).mean())


class FixedKLController:
    """A constant β."""

    def __init__(self, kl_coef: float) -> None:
        self.value = kl_coef

    def update(self, current_kl: float, n_steps: int) -> None:
        """No-op; same interface as `AdaptiveKLController`."""


class AdaptiveKLController:
    """Adaptive β (Ziegler et al. 2019, section 2.2; OpenAI lm-human-preferences `AdaptiveKLController`,
    TRL, OpenRLHF): a proportional controller pushing the per-sequence KL towards `target`.

        e = clip(KL / target - 1, -0.2, 0.2),   β ← β · (1 + e · n_steps / horizon)

    KL above target raises β (pulls the policy back), below target lowers it.
    """

    def __init__(self, init_kl_coef: float, target: float, horizon: int) -> None:
        if target <= 0 or horizon <= 0:
            raise ValueError("AdaptiveKLController needs target > 0 and horizon > 0")
        self.value = init_kl_coef
        self.target = target
        self.horizon = horizon

    def update(self, current_kl: float, n_steps: int) -> None:
        """current_kl: the batch's `mean_sequence_kl`; n_steps: sequences in the batch."""
        proportional_error = min(max(current_kl / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + proportional_error * n_steps / self.horizon


def make_kl_controller(cfg: RewardConfig) -> FixedKLController | AdaptiveKLController:
    """The controller a `RewardConfig` asks for: adaptive when kl_target is set, else fixed."""
    if cfg.kl_target is None:
        return FixedKLController(cfg.kl_coef)
    return AdaptiveKLController(cfg.kl_coef, cfg.kl_target, cfg.kl_horizon)
