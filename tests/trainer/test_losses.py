"""PPO loss pieces on small hand-checked tensors."""

from __future__ import annotations

import math

import pytest
import torch

from trainer.losses import (
    approx_kl,
    clip_fraction,
    entropy_from_logits,
    logprobs_from_logits,
    masked_entropy,
    ppo_policy_loss,
    value_loss,
)

MASK = torch.tensor([[True, True, True], [True, True, False]])


def test_ratio_one_gives_minus_mean_advantage_and_its_gradient():
    logp_old = torch.tensor([[-1.0, -2.0, -0.5], [-0.1, -3.0, -7.0]])
    logp = logp_old.clone().requires_grad_(True)
    adv = torch.tensor([[1.0, -2.0, 0.5], [3.0, 0.5, 100.0]])  # 100 sits on padding
    out = ppo_policy_loss(logp, logp_old, adv, MASK, clip_eps=0.2)
    valid_adv = torch.tensor([1.0, -2.0, 0.5, 3.0, 0.5])
    torch.testing.assert_close(out.loss, -valid_adv.mean())
    assert float(out.clip_frac) == 0.0 and float(out.approx_kl) == 0.0 and float(out.old_approx_kl) == 0.0
    assert float(out.ratio_mean) == 1.0
    out.loss.backward()
    # d(-A·ratio)/d logp = -A·ratio = -A at ratio 1, divided by the 5 valid tokens; 0 on padding.
    torch.testing.assert_close(logp.grad, -(adv * MASK) / 5)


def test_clipping_engages_at_one_plus_minus_eps():
    eps = 0.2
    # Two tokens, positive advantage: ratio 1.5 is clipped at 1.2 (no gradient), ratio 1.1 is not.
    ratio = torch.tensor([[1.5, 1.1]])
    logp_old = torch.zeros(1, 2)
    logp = ratio.log().requires_grad_(True)
    adv = torch.ones(1, 2)
    out = ppo_policy_loss(logp, logp_old, adv, torch.ones(1, 2), clip_eps=eps)
    torch.testing.assert_close(out.loss, torch.tensor(-(1.2 + 1.1) / 2))
    assert math.isclose(float(out.clip_frac), 0.5)
    out.loss.backward()
    torch.testing.assert_close(logp.grad, torch.tensor([[0.0, -1.1 / 2]]))

    # Negative advantage: ratio 0.5 is clipped at 0.8 (pessimistic bound -A·0.8 wins), 1.5 is not.
    ratio = torch.tensor([[0.5, 1.5]])
    logp = ratio.log().requires_grad_(True)
    out = ppo_policy_loss(logp, logp_old, -adv, torch.ones(1, 2), clip_eps=eps)
    torch.testing.assert_close(out.loss, torch.tensor((0.8 + 1.5) / 2))
    out.loss.backward()
    torch.testing.assert_close(logp.grad, torch.tensor([[0.0, 1.5 / 2]]))
    assert math.isclose(float(out.clip_frac), 1.0)  # both outside [0.8, 1.2], whichever term won


def test_clip_fraction_boundaries_and_mask():
    ratio = torch.tensor([[0.79, 0.8, 1.0], [1.2, 1.21, 5.0]], dtype=torch.float64)
    assert math.isclose(
        float(clip_fraction(ratio, MASK, 0.2)), 2 / 5, rel_tol=1e-9
    )  # 0.79 and 1.21; 5.0 is padding


def test_approx_kl_matches_cleanrl():
    logp_old = torch.tensor([[-1.0, -1.0, -1.0], [-2.0, -0.5, 0.0]], dtype=torch.float64)
    logp = torch.tensor([[-1.2, -0.9, -1.0], [-1.0, -0.5, -50.0]], dtype=torch.float64)
    old, k3 = approx_kl(logp, logp_old, MASK)
    log_ratio = (logp - logp_old)[MASK]
    ratio = log_ratio.exp()
    torch.testing.assert_close(old, (-log_ratio).mean())
    torch.testing.assert_close(k3, ((ratio - 1) - log_ratio).mean())
    assert float(k3) > 0


def test_value_loss_unclipped_and_clipped():
    returns = torch.tensor([[1.0, 0.0, 2.0]])
    values_old = torch.tensor([[0.0, 0.0, 0.0]])
    values = torch.tensor([[0.5, 0.1, 1.0]], requires_grad=True)
    mask = torch.ones(1, 3)
    plain = value_loss(values, values_old, returns, mask, clip_eps=None)
    torch.testing.assert_close(plain.loss, 0.5 * torch.tensor((0.25 + 0.01 + 1.0) / 3))
    # ε = 0.2: V_clip = (0.2, 0.1, 0.2); squared errors clipped (0.64, 0.01, 3.24) vs (0.25, 0.01, 1.0):
    # max is the clipped one on tokens 0 and 2, where the gradient is then 0.
    out = value_loss(values, values_old, returns, mask, clip_eps=0.2)
    torch.testing.assert_close(out.loss, 0.5 * torch.tensor((0.64 + 0.01 + 3.24) / 3))
    assert math.isclose(float(out.clip_frac), 2 / 3, rel_tol=1e-6)
    out.loss.backward()
    torch.testing.assert_close(values.grad, torch.tensor([[0.0, 0.1 / 3, 0.0]]))


def test_value_loss_ignores_padding():
    returns = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 1e6]])
    values = torch.zeros(2, 3)
    out = value_loss(values, values, returns, MASK, clip_eps=0.2)
    torch.testing.assert_close(out.loss, torch.tensor(0.5))


def test_entropy_from_logits():
    logits = torch.zeros(2, 3, 4)  # uniform over 4: log 4
    torch.testing.assert_close(entropy_from_logits(logits), torch.full((2, 3), math.log(4)))
    one_hot = torch.tensor([[[1000.0, 0.0, 0.0, 0.0]]])  # stable at large logits: ~0, not NaN
    assert abs(float(entropy_from_logits(one_hot))) < 1e-6
    gen = torch.Generator().manual_seed(0)
    z = torch.randn(2, 3, 7, generator=gen)
    expected = torch.distributions.Categorical(logits=z).entropy()
    torch.testing.assert_close(entropy_from_logits(z), expected)
    padded = torch.cat([torch.zeros(1, 3, 4), torch.tensor([[[0.0, 0, 0, 0], [0, 0, 0, 0], [9, 0, 0, 0]]])])
    # Mean over the 5 valid tokens, all uniform: the peaked padded position does not count.
    torch.testing.assert_close(masked_entropy(padded, MASK), torch.tensor(math.log(4)))


def test_logprobs_from_logits():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 3, 5, generator=gen)
    tokens = torch.tensor([[0, 4, 2], [1, 1, 3]])
    got = logprobs_from_logits(logits, tokens)
    assert got.shape == (2, 3)
    for b in range(2):
        for t in range(3):
            expected = logits[b, t, tokens[b, t]] - torch.logsumexp(logits[b, t], -1)
            assert math.isclose(float(got[b, t]), float(expected), rel_tol=1e-5)


def test_shape_mismatch_is_an_error():
    with pytest.raises(ValueError):
        ppo_policy_loss(torch.zeros(2, 3), torch.zeros(2, 3), torch.zeros(2, 2), MASK)
    with pytest.raises(ValueError):
        value_loss(torch.zeros(2, 3), torch.zeros(2, 3), torch.zeros(2, 3), torch.ones(3, 2))
