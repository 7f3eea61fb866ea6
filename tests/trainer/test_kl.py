"""KL estimators (Schulman's k1/k2/k3), the combined reward, and the β controllers."""

from __future__ import annotations

import math

import pytest
import torch

from trainer.kl import (
    AdaptiveKLController,
    FixedKLController,
    kl_k1,
    kl_k2,
    kl_k3,
    kl_penalized_rewards,
    kl_per_token,
    make_kl_controller,
    mean_sequence_kl,
)
from trainer.rewards import RewardConfig


def test_estimators_match_their_formulas():
    logp = torch.tensor([-0.1, -2.0, -0.7, -3.0], dtype=torch.float64)
    logp_ref = torch.tensor([-0.3, -1.0, -0.7, -0.2], dtype=torch.float64)
    for i in range(4):
        p, q = math.exp(logp[i]), math.exp(logp_ref[i])  # π(x), π_ref(x)
        r = q / p
        assert math.isclose(float(kl_k1(logp, logp_ref)[i]), math.log(p / q), abs_tol=1e-12)
        assert math.isclose(float(kl_k2(logp, logp_ref)[i]), 0.5 * math.log(r) ** 2, abs_tol=1e-12)
        assert math.isclose(float(kl_k3(logp, logp_ref)[i]), (r - 1) - math.log(r), abs_tol=1e-12)
    assert float(kl_k3(logp, logp_ref)[2]) == 0.0  # same probability: no divergence
    torch.testing.assert_close(kl_per_token(logp, logp_ref, "k3"), kl_k3(logp, logp_ref))
    with pytest.raises(ValueError):
        kl_per_token(logp, logp_ref, "k9")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        kl_per_token(logp, logp_ref[:2])


def test_k3_and_k2_are_nonnegative_pointwise_k1_is_not():
    gen = torch.Generator().manual_seed(1)
    logp = -torch.rand(10_000, generator=gen) * 8
    logp_ref = -torch.rand(10_000, generator=gen) * 8
    assert (kl_k3(logp, logp_ref) >= 0).all()
    assert (kl_k2(logp, logp_ref) >= 0).all()
    assert (kl_k1(logp, logp_ref) < 0).any()


def _two_categoricals(seed: int, V: int = 50) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    logp = torch.log_softmax(torch.randn(V, generator=gen, dtype=torch.float64) * 2, -1)  # π
    logp_ref = torch.log_softmax(torch.randn(V, generator=gen, dtype=torch.float64) * 2, -1)  # π_ref
    return logp, logp_ref


@pytest.mark.parametrize("seed", range(5))
def test_k1_and_k3_are_unbiased_and_nonnegative_in_expectation(seed: int):
    logp, logp_ref = _two_categoricals(seed)
    p = logp.exp()
    true_kl = float((p * (logp - logp_ref)).sum())  # KL(π || π_ref), exactly
    assert true_kl > 0
    # Exact expectation under x ~ π: both unbiased.
    assert math.isclose(float((p * kl_k1(logp, logp_ref)).sum()), true_kl, rel_tol=1e-9)
    assert math.isclose(float((p * kl_k3(logp, logp_ref)).sum()), true_kl, rel_tol=1e-9)
    # Monte Carlo with tokens sampled from π, as in a rollout.
    gen = torch.Generator().manual_seed(100 + seed)
    x = torch.multinomial(p, 200_000, replacement=True, generator=gen)
    for estimate in (kl_k1(logp[x], logp_ref[x]).mean(), kl_k3(logp[x], logp_ref[x]).mean()):
        assert float(estimate) >= 0
        assert abs(float(estimate) - true_kl) < 0.05 * true_kl + 0.01


def test_kl_penalized_rewards_subtracts_beta_kl_on_valid_tokens():
    token_rewards = torch.tensor([[0.0, 0.1, 1.0], [0.0, -0.5, 0.0]])
    logp = torch.tensor([[-1.0, -0.5, -0.2], [-2.0, -1.0, -9.0]])
    logp_ref = torch.tensor([[-1.5, -0.5, -0.1], [-1.0, -3.0, 0.0]])
    mask = torch.tensor([[True, True, True], [True, True, False]])
    rewards, kl = kl_penalized_rewards(token_rewards, logp, logp_ref, mask, kl_coef=0.1, estimator="k1")
    # k1 = logp - logp_ref: [[0.5, 0, -0.1], [-1, 2, (padding)]]
    torch.testing.assert_close(kl, torch.tensor([[0.5, 0.0, -0.1], [-1.0, 2.0, 0.0]]))
    torch.testing.assert_close(rewards, torch.tensor([[-0.05, 0.1, 1.01], [0.1, -0.7, 0.0]]))
    assert math.isclose(mean_sequence_kl(kl, mask), ((0.4) + (1.0)) / 2, rel_tol=1e-6)
    # β = 0 leaves the rewards alone (but still masks the padding).
    plain, _ = kl_penalized_rewards(token_rewards, logp, logp_ref, mask, kl_coef=0.0)
    torch.testing.assert_close(plain, token_rewards * mask)
    # k3 penalises both directions of drift.
    _, kl3 = kl_penalized_rewards(token_rewards, logp, logp_ref, mask, kl_coef=0.1, estimator="k3")
    assert (kl3[mask] >= 0).all() and kl3[1, 2] == 0


def test_adaptive_controller_moves_beta_towards_the_target():
    ctl = AdaptiveKLController(init_kl_coef=0.1, target=6.0, horizon=10_000)
    ctl.update(current_kl=12.0, n_steps=256)  # KL above target: error clipped to +0.2, β grows
    assert math.isclose(ctl.value, 0.1 * (1 + 0.2 * 256 / 10_000))
    before = ctl.value
    ctl.update(current_kl=3.0, n_steps=256)  # below target: error -0.5 clipped to -0.2, β shrinks
    assert math.isclose(ctl.value, before * (1 - 0.2 * 256 / 10_000))
    before = ctl.value
    ctl.update(current_kl=6.6, n_steps=100)  # within the clip: error 0.1
    assert math.isclose(ctl.value, before * (1 + 0.1 * 100 / 10_000))
    ctl.update(current_kl=6.0, n_steps=100)  # on target: unchanged
    assert math.isclose(ctl.value, before * (1 + 0.1 * 100 / 10_000))


def test_fixed_controller_and_factory():
    fixed = FixedKLController(0.05)
    fixed.update(100.0, 1000)
    assert fixed.value == 0.05
    assert isinstance(make_kl_controller(RewardConfig(kl_coef=0.02)), FixedKLController)
    adaptive = make_kl_controller(RewardConfig(kl_coef=0.02, kl_target=4.0, kl_horizon=500))
    assert isinstance(adaptive, AdaptiveKLController)
    assert (adaptive.value, adaptive.target, adaptive.horizon) == (0.02, 4.0, 500)
