"""GAE against a plain double-loop reference, and masked statistics / whitening over valid tokens."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from trainer.gae import (
    check_right_padded,
    compute_gae,
    masked_mean,
    masked_sum,
    masked_var,
    masked_whiten,
)


def reference_gae(
    rewards: list[list[float]], values: list[list[float]], lengths: list[int], gamma: float, lam: float
) -> tuple[list[list[float]], list[list[float]]]:
    """Straight from the definition: Â_t = Σ_{l ≥ 0} (γλ)^l δ_{t+l}, δ_t = r_t + γ V_{t+1} - V_t,
    V = 0 after the last valid token; one sequence at a time, no recursion, no masks."""
    advantages, returns = [], []
    for r, v, n in zip(rewards, values, lengths, strict=True):
        width = len(r)
        adv_row, ret_row = [0.0] * width, [0.0] * width
        for t in range(n):
            total = 0.0
            for k in range(t, n):
                next_value = v[k + 1] if k + 1 < n else 0.0
                delta = r[k] + gamma * next_value - v[k]
                total += (gamma * lam) ** (k - t) * delta
            adv_row[t] = total
            ret_row[t] = total + v[t]
        advantages.append(adv_row)
        returns.append(ret_row)
    return advantages, returns


def _random_batch(gen: torch.Generator, B: int, T: int) -> tuple[torch.Tensor, ...]:
    lengths = torch.randint(1, T + 1, (B,), generator=gen)  # (B,)
    mask = torch.arange(T)[None, :] < lengths[:, None]  # (B, T) right-padded
    rewards = torch.randn(B, T, generator=gen, dtype=torch.float64)
    values = torch.randn(B, T, generator=gen, dtype=torch.float64)
    # Garbage on the padding must not matter.
    rewards = torch.where(mask, rewards, torch.full_like(rewards, 1e6))
    values = torch.where(mask, values, torch.full_like(values, float("nan")))
    return rewards, values, mask, lengths


@pytest.mark.parametrize("seed", range(20))
def test_gae_matches_the_reference_on_random_batches(seed: int):
    gen = torch.Generator().manual_seed(seed)
    B, T = int(torch.randint(1, 7, (1,), generator=gen)), int(torch.randint(1, 25, (1,), generator=gen))
    gamma = float(torch.rand(1, generator=gen)) * 0.5 + 0.5 if seed % 2 else 1.0
    lam = float(torch.rand(1, generator=gen))
    rewards, values, mask, lengths = _random_batch(gen, B, T)
    adv, ret = compute_gae(rewards, values, mask, gamma=gamma, lam=lam)
    ref_adv, ref_ret = reference_gae(rewards.tolist(), values.tolist(), lengths.tolist(), gamma, lam)
    torch.testing.assert_close(adv, torch.tensor(ref_adv, dtype=torch.float64))
    torch.testing.assert_close(ret, torch.tensor(ref_ret, dtype=torch.float64))
    assert torch.isfinite(adv).all() and (adv[~mask] == 0).all() and (ret[~mask] == 0).all()


@settings(max_examples=40, deadline=None)
@given(
    data=st.data(),
    gamma=st.floats(0.0, 1.0),
    lam=st.floats(0.0, 1.0),
    B=st.integers(1, 4),
    T=st.integers(1, 12),
)
def test_gae_matches_the_reference_property(data, gamma: float, lam: float, B: int, T: int):
    lengths = data.draw(st.lists(st.integers(1, T), min_size=B, max_size=B))
    floats = st.floats(-10, 10, allow_nan=False)
    rewards = data.draw(st.lists(st.lists(floats, min_size=T, max_size=T), min_size=B, max_size=B))
    values = data.draw(st.lists(st.lists(floats, min_size=T, max_size=T), min_size=B, max_size=B))
    mask = torch.arange(T)[None, :] < torch.tensor(lengths)[:, None]
    adv, ret = compute_gae(
        torch.tensor(rewards, dtype=torch.float64),
        torch.tensor(values, dtype=torch.float64),
        mask,
        gamma,
        lam,
    )
    ref_adv, ref_ret = reference_gae(rewards, values, lengths, gamma, lam)
    ref_adv_t, ref_ret_t = (
        torch.tensor(ref_adv, dtype=torch.float64),
        torch.tensor(ref_ret, dtype=torch.float64),
    )
    # The reference keeps padded values, GAE zeroes them; compare on valid tokens, check zeros elsewhere.
    torch.testing.assert_close(adv[mask], ref_adv_t[mask])
    torch.testing.assert_close(ret[mask], ref_ret_t[mask])
    assert (adv[~mask] == 0).all()


def test_gae_hand_example():
    # One sequence of 3 tokens, reward 1 at the end, V = (0.5, 0.5, 0.5), γ = 1, λ = 1:
    # Â_t = (sum of future rewards) - V_t = 1 - 0.5, returns = 1 everywhere (Monte-Carlo return).
    adv, ret = compute_gae(
        torch.tensor([[0.0, 0.0, 1.0]]), torch.full((1, 3), 0.5), torch.ones(1, 3), 1.0, 1.0
    )
    torch.testing.assert_close(adv, torch.full((1, 3), 0.5))
    torch.testing.assert_close(ret, torch.ones(1, 3))
    # λ = 0: one-step TD errors δ_t = r_t + V_{t+1} - V_t, with V = 0 after the last token.
    adv, _ = compute_gae(
        torch.tensor([[0.0, 0.0, 1.0]]), torch.tensor([[0.2, 0.5, 0.7]]), torch.ones(1, 3), 1.0, 0.0
    )
    torch.testing.assert_close(adv, torch.tensor([[0.3, 0.2, 0.3]]))


def test_gae_rejects_masks_that_are_not_right_padded():
    with pytest.raises(ValueError, match="right-padded"):
        compute_gae(torch.zeros(1, 3), torch.zeros(1, 3), torch.tensor([[1, 0, 1]]))
    with pytest.raises(ValueError):
        compute_gae(torch.zeros(1, 3), torch.zeros(1, 4), torch.ones(1, 3))
    check_right_padded(torch.tensor([[1, 1, 0], [0, 0, 0], [1, 1, 1]]))  # valid, must not raise


def test_masked_stats_use_only_valid_tokens():
    x = torch.tensor([[1.0, 2.0, 3.0, 100.0], [4.0, float("nan"), float("inf"), -50.0]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0]])
    valid = torch.tensor([1.0, 2.0, 3.0, 4.0])
    assert float(masked_sum(x, mask)) == 10.0
    assert float(masked_mean(x, mask)) == 2.5
    torch.testing.assert_close(masked_mean(x, mask, dim=-1), torch.tensor([2.0, 4.0]))
    torch.testing.assert_close(masked_var(x, mask), valid.var(unbiased=True))
    torch.testing.assert_close(masked_var(x, mask, unbiased=False), valid.var(unbiased=False))
    with pytest.raises(ValueError):
        masked_var(x, torch.tensor([[1, 0, 0, 0], [0, 0, 0, 0]]))


def test_whitening_uses_only_valid_tokens():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(4, 9, generator=gen, dtype=torch.float64) * 3 + 2
    mask = torch.arange(9)[None, :] < torch.tensor([9, 5, 2, 7])[:, None]
    poisoned = torch.where(mask, x, torch.full_like(x, 1e9))  # padding must not move mean or var
    w = masked_whiten(poisoned, mask)
    valid = x[mask]
    torch.testing.assert_close(w[mask], (valid - valid.mean()) / torch.sqrt(valid.var() + 1e-8))
    assert abs(float(w[mask].mean())) < 1e-12 and abs(float(w[mask].std()) - 1) < 1e-6
    assert (w[~mask] == 0).all()
    # shift_mean=False: only the scale is normalised, the mean is added back (TRL / OpenRLHF).
    w_keep = masked_whiten(poisoned, mask, shift_mean=False)
    torch.testing.assert_close(w_keep[mask], w[mask] + valid.mean())
    assert (w_keep[~mask] == 0).all()
