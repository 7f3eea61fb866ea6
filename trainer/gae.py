"""Generalized Advantage Estimation over right-padded token batches, and masked statistics.

Shapes: B responses, T = the longest response in tokens. `mask` (B, T) is 1 (True) on a response's
tokens and 0 on the right padding after them, any dtype. The masked statistics here are shared by
`trainer.losses` and `trainer.kl`.
"""

from __future__ import annotations

import torch


def _float_mask(mask: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    if mask.shape != like.shape:
        raise ValueError(f"mask shape {tuple(mask.shape)} != values shape {tuple(like.shape)}")
    return mask.to(like.dtype)


def masked_sum(values: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Sum of values where mask is set (padding contributes exactly 0, even if it holds NaN)."""
    masked = torch.where(mask.bool(), values, torch.zeros_like(values))
    return masked.sum() if dim is None else masked.sum(dim=dim)


def masked_mean(values: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean over the valid tokens: over the whole batch (dim=None: a token-level mean) or along dim.

    An empty selection gives NaN (0/0) on purpose: a loss over nothing is a bug to surface.
    """
    m = _float_mask(mask, values)
    return masked_sum(values, m, dim) / (m.sum() if dim is None else m.sum(dim=dim))


def masked_var(values: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    """Variance over the valid tokens of the whole batch (Bessel-corrected like TRL's `masked_var`)."""
    m = _float_mask(mask, values)
    mean = masked_mean(values, m)
    var = masked_mean((values - mean) ** 2, m)
    if unbiased:
        count = m.sum()
        if count < 2:
            raise ValueError(f"unbiased masked variance needs at least 2 valid tokens, got {int(count)}")
        var = var * count / (count - 1)
    return var


def masked_whiten(
    values: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8
) -> torch.Tensor:
    """(x - mean) / sqrt(var + eps) with mean and var over the valid tokens only; padding set to 0.

    As TRL's / OpenRLHF's `masked_whiten`: with shift_mean=False the mean is added back, so only the
    scale is normalised (the sign of the batch-mean advantage survives).
    """
    m = _float_mask(mask, values)
    mean, var = masked_mean(values, m), masked_var(values, m)
    whitened = (values - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        whitened = whitened + mean
    return torch.where(m.bool(), whitened, torch.zeros_like(whitened))


def check_right_padded(mask: torch.Tensor) -> None:
    """Raise unless every row of mask (B, T) is 1...1 0...0 (a response, then its padding)."""
    if mask.dim() != 2:
        raise ValueError(f"mask must be (B, T), got shape {tuple(mask.shape)}")
    m = mask.bool()
    if m.shape[1] > 1 and bool((m[:, 1:] & ~m[:, :-1]).any()):
        raise ValueError("mask is not right-padded: a valid token follows a padded one")


@torch.no_grad()
def compute_gae(
    rewards: torch.Tensor,
    values: torch.Tensor,
    mask: torch.Tensor,
    gamma: float = 1.0,
    lam: float = 0.95,
) -> tuple[torch.Tensor, torch.Tensor]:
    """GAE(γ, λ) (Schulman et al. 2016, "High-Dimensional Continuous Control Using GAE", eq. 16).

    rewards: (B, T) per-token rewards (KL penalty included), values: (B, T) critic V(s_t) at
    sampling time, mask: (B, T) right-padded. Returns (advantages, returns), both (B, T), 0 on padding.

        δ_t = r_t + γ·V(s_{t+1}) - V(s_t),   Â_t = δ_t + γλ·Â_{t+1},   R_t = Â_t + V(s_t)

    The episode ends after the last valid token: V = 0 and Â = 0 beyond it (no bootstrap; the
    response is complete, or truncated with its reward already given), as in TRL / OpenRLHF.
    γ = 1 is the usual choice for LM rewards (TRL's default); λ trades bias for variance.
    """
    if rewards.shape != values.shape or rewards.dim() != 2:
        raise ValueError(f"rewards {tuple(rewards.shape)} and values {tuple(values.shape)} must be (B, T)")
    check_right_padded(mask)
    m = _float_mask(mask, values)  # (B, T)
    # Zero the padding so whatever it holds (garbage logits, NaN) cannot leak into valid tokens.
    rewards = torch.where(m.bool(), rewards, torch.zeros_like(rewards))  # (B, T)
    values = torch.where(m.bool(), values, torch.zeros_like(values))  # (B, T)

    B, T = values.shape
    advantages = torch.zeros_like(values)  # (B, T)
    last_gae = torch.zeros(B, dtype=values.dtype, device=values.device)  # (B,) Â_{t+1}
    for t in reversed(range(T)):
        # V(s_{t+1}) and Â_{t+1} are 0 past the end: m[:, t+1] is 0 on padding (and at t = T-1).
        next_mask = m[:, t + 1] if t + 1 < T else torch.zeros_like(last_gae)  # (B,)
        next_value = values[:, t + 1] * next_mask if t + 1 < T else torch.zeros_like(last_gae)  # (B,)
        delta = rewards[:, t] + gamma * next_value - values[:, t]  # (B,)
        last_gae = delta + gamma * lam * next_mask * last_gae  # (B,)
        advantages[:, t] = last_gae
    advantages = advantages * m  # (B, T)
    returns = advantages + values  # (B, T) the critic's regression target; 0 on padding
    return advantages, returns
