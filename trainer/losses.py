"""PPO loss pieces over (B, T) token batches with a right-padding mask.

Every mean is a token-level masked mean over the whole minibatch (`trainer.gae.masked_mean`), as in
TRL's PPOTrainer and CleanRL's flattened batches: each valid token weighs the same.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from trainer.gae import masked_mean


class PolicyLoss(NamedTuple):
    loss: torch.Tensor  # scalar, differentiable: the clipped surrogate to minimise
    clip_frac: torch.Tensor  # scalar, detached: share of valid tokens where clipping engaged
    approx_kl: torch.Tensor  # scalar, detached: k3 estimate of KL(π_old || π) (CleanRL `approx_kl`)
    old_approx_kl: torch.Tensor  # scalar, detached: k1 estimate mean(logp_old - logp)
    ratio_mean: torch.Tensor  # scalar, detached: mean importance ratio over valid tokens


class ValueLoss(NamedTuple):
    loss: torch.Tensor  # scalar, differentiable
    clip_frac: torch.Tensor  # scalar, detached: share of valid tokens where the clipped term won


def _upcast(logits: torch.Tensor) -> torch.Tensor:
    """bf16/fp16 logits to fp32 before softmax (half precision loses small log-probabilities)."""
    return logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits


def logprobs_from_logits(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """log π(token | context) from logits (B, T, V) and the tokens (B, T) they predict → (B, T).

    The caller aligns them: logits at position t are the model's output one step before token t.
    """
    logp_all = F.log_softmax(_upcast(logits), dim=-1)  # (B, T, V)
    return logp_all.gather(-1, tokens.long().unsqueeze(-1)).squeeze(-1)  # (B, T)


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of the categorical at each position, logits (B, T, V) → (B, T).

    H = logsumexp(z) - Σ softmax(z)·z, stable for large logits (as TRL's `entropy_from_logits`).
    """
    logits = _upcast(logits)
    probs = F.softmax(logits, dim=-1)  # (B, T, V)
    return torch.logsumexp(logits, dim=-1) - (probs * logits).sum(dim=-1)  # (B, T)


def masked_entropy(logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean entropy over valid tokens (the entropy bonus is -coef · this in the loss)."""
    return masked_mean(entropy_from_logits(logits), mask)


def approx_kl(
    logp: torch.Tensor, logp_old: torch.Tensor, mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(old_approx_kl, approx_kl) of KL(π_old || π) for logging and early stopping, detached.

    As CleanRL's ppo.py (citing Schulman's "Approximating KL Divergence"): with log r = logp - logp_old,
    old_approx_kl = mean(-log r) (k1) and approx_kl = mean((r - 1) - log r) (k3, ≥ 0 per token).
    """
    with torch.no_grad():
        log_ratio = logp - logp_old  # (B, T)
        old = masked_mean(-log_ratio, mask)
        k3 = masked_mean(torch.expm1(log_ratio) - log_ratio, mask)
    return old, k3


def clip_fraction(ratio: torch.Tensor, mask: torch.Tensor, clip_eps: float) -> torch.Tensor:
    """Share of valid tokens whose ratio lies outside [1 - ε, 1 + ε] (CleanRL `clipfracs`), detached."""
    with torch.no_grad():
        return masked_mean(((ratio - 1.0).abs() > clip_eps).to(ratio.dtype), mask)


def ppo_policy_loss(
    logp: torch.Tensor,
    logp_old: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_eps: float = 0.2,
) -> PolicyLoss:
    """Clipped surrogate objective (Schulman et al. 2017, eq. 7), negated to be minimised.

    logp: (B, T) log π_θ of the sampled tokens now (with grad); logp_old: (B, T) the logprobs recorded
    at sampling time (so stale trajectories are importance-weighted against the policy that made
    them); advantages: (B, T), already whitened if wanted; mask: (B, T).

        ratio = exp(logp - logp_old)
        loss  = mean_valid max(-A·ratio, -A·clip(ratio, 1-ε, 1+ε))
    """
    if not (logp.shape == logp_old.shape == advantages.shape == mask.shape):
        raise ValueError("logp, logp_old, advantages and mask must have one (B, T) shape")
    advantages = advantages.detach()
    log_ratio = logp - logp_old.detach()  # (B, T)
    ratio = torch.exp(log_ratio)  # (B, T)
    pg_losses = -advantages * ratio  # (B, T)
    pg_losses_clipped = -advantages * torch.clamp(ratio, 1.0 - clip_eps, 1.0 + clip_eps)  # (B, T)
    loss = masked_mean(torch.max(pg_losses, pg_losses_clipped), mask)
    old_kl, k3_kl = approx_kl(logp, logp_old, mask)
    return PolicyLoss(
        loss=loss,
        clip_frac=clip_fraction(ratio, mask, clip_eps),
        approx_kl=k3_kl,
        old_approx_kl=old_kl,
        ratio_mean=masked_mean(ratio.detach(), mask),
    )


def value_loss(
    values: torch.Tensor,
    values_old: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    clip_eps: float | None = 0.2,
) -> ValueLoss:
    """½·(V - R)² with optional clipping around the sampling-time values (OpenAI baselines ppo2,
    CleanRL `clip_vloss`):

        V_clip = V_old + clip(V - V_old, -ε, ε),   loss = ½ · mean_valid max((V - R)², (V_clip - R)²)

    values: (B, T) critic now (with grad); values_old: (B, T) at sampling time; returns: (B, T) GAE
    targets; clip_eps None: plain ½·MSE. Note ε is in reward units, unlike the ratio's ε.
    """
    if not (values.shape == values_old.shape == returns.shape == mask.shape):
        raise ValueError("values, values_old, returns and mask must have one (B, T) shape")
    returns = returns.detach()
    unclipped = (values - returns) ** 2  # (B, T)
    if clip_eps is None:
        return ValueLoss(0.5 * masked_mean(unclipped, mask), values.new_zeros(()))
    values_old = values_old.detach()
    values_clipped = values_old + torch.clamp(values - values_old, -clip_eps, clip_eps)  # (B, T)
    clipped = (values_clipped - returns) ** 2  # (B, T)
    loss = 0.5 * masked_mean(torch.max(unclipped, clipped), mask)
    with torch.no_grad():
        frac = masked_mean((clipped > unclipped).to(values.dtype), mask)
    return ValueLoss(loss, frac)
