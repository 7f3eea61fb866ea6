"""PSGPO token rewards: the unit-test reward at the last token plus dense PRM line rewards.

The reward of one response y = (y_1 .. y_n) with lines 1..M, T of them non-neutral (DESIGN.md,
"PSGPO, precisely"; arXiv 2410.17621 section 3):

    r_t = R_UT(x, y) · 1[t = n]                                   (unit tests, last response token)
        + Σ_{m non-neutral, end(m) = t} λ · R_PRM(x, y_{≤ m}) / T  (PRM, at each line's end token)

with λ = 0.25 for a response that fails its tests and 0.025 for one that passes. Neutral lines
(blank or comment-only, `services.common.lines`) get nothing, so writing comments earns no reward;
dividing by T keeps a longer response from collecting more PRM reward (both guard against PRM
hacking, paper section 3.2). The per-token KL penalty is added later (`trainer.kl`).

Rewards are never made up: a NaN/inf anywhere, or PRM scores missing when the dense reward is on,
raises a `RewardError` whose `reason` the trainer counts before it skips the trajectory.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch

KLEstimator = Literal["k1", "k2", "k3"]


class RewardError(ValueError):
    """A trajectory whose reward cannot be computed honestly; `reason` is a short metric label."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


class MissingPrmScores(RewardError):
    """The dense PRM reward is on but the trajectory carries no (or too few) PRM line scores."""

    def __init__(self, detail: str) -> None:
        super().__init__("missing_prm_scores", detail)


@dataclass
class RewardConfig:
    """How a scored trajectory becomes per-token rewards (one field per ablation switch)."""

    use_unit_test_reward: bool = True
    """Add the unit-test reward R_UT at the last response token (on in both RLTF and PSGPO)."""

    pass_reward: float = 1.0
    """R_UT of a response that passes all its unit tests."""

    fail_reward: float = 0.0
    """R_UT of a response that fails. 0 follows the paper's framing of RLTF ("when generated code fails
    all unit tests, no learning signal is received", abstract of arXiv 2410.17621); set -1.0 for the
    ±1 convention some RLTF setups use."""

    partial_credit: bool = False
    """If true, a failing response gets fail_reward + (pass_reward - fail_reward) · tests_passed /
    tests_total instead of fail_reward (an ablation, not the paper's setting)."""

    use_prm_dense: bool = True
    """Add the dense PRM line rewards (PSGPO). Off: the RLTF baseline, and prm_scores are ignored."""

    lambda_failed: float = 0.25
    """λ scaling the PRM line rewards of a response that fails its unit tests (paper: 0.25)."""

    lambda_passed: float = 0.025
    """λ scaling the PRM line rewards of a response that passes its unit tests (paper: 0.025)."""

    normalize_by_lines: bool = True
    """Divide each line reward by T, the number of non-neutral lines (paper: on; guards against
    long responses collecting more PRM reward)."""

    prm_clip: float | None = None
    """If set, clamp each PRM score to [-prm_clip, prm_clip] before scaling (the PRM regresses
    ±1 labels, so 1.0 bounds an extrapolating PRM). None: use the scores as they are."""

    kl_coef: float = 0.05
    """β of the per-token KL penalty r_t - β·KL_t to the frozen reference policy (the initial value
    when kl_target is set). 0 turns the penalty off. 0.05 is TRL's PPOConfig default."""

    kl_estimator: KLEstimator = "k1"
    """Per-token KL estimator (`trainer.kl`, after J. Schulman, "Approximating KL Divergence"):
    k1 = log π - log π_ref (unbiased, as in Ziegler et al. 2019 / TRL), k3 (unbiased, always ≥ 0)."""

    kl_target: float | None = None
    """If set, adapt β so that the mean per-sequence KL tracks this target (Ziegler et al. 2019,
    `AdaptiveKLController`); None keeps β fixed."""

    kl_horizon: int = 10_000
    """Horizon (in sequences) of the adaptive KL controller; larger moves β more slowly."""

    def __post_init__(self) -> None:
        for name in ("pass_reward", "fail_reward", "lambda_failed", "lambda_passed", "kl_coef"):
            if not math.isfinite(getattr(self, name)):
                raise ValueError(f"RewardConfig.{name} must be finite")
        if self.prm_clip is not None and not self.prm_clip > 0:
            raise ValueError("RewardConfig.prm_clip must be positive or None")
        if self.kl_coef < 0:
            raise ValueError("RewardConfig.kl_coef must be >= 0")
        if self.kl_estimator not in ("k1", "k2", "k3"):
            raise ValueError(f"RewardConfig.kl_estimator must be k1, k2 or k3, got {self.kl_estimator!r}")
        if self.kl_target is not None and not self.kl_target > 0:
            raise ValueError("RewardConfig.kl_target must be positive or None")
        if self.kl_horizon <= 0:
            raise ValueError("RewardConfig.kl_horizon must be positive")

    @classmethod
    def preset(cls, name: Literal["rltf", "psgpo"], **overrides: Any) -> RewardConfig:
        """`--reward rltf`: unit tests only (the baseline); `--reward psgpo`: plus dense PRM rewards."""
        if name not in ("rltf", "psgpo"):
            raise ValueError(f"unknown reward preset {name!r} (rltf or psgpo)")
        return cls(**{"use_prm_dense": name == "psgpo", **overrides})


def unit_test_reward(passed: bool, tests_passed: int, tests_total: int, cfg: RewardConfig) -> float:
    """R_UT from a sandbox verdict: pass_reward / fail_reward, or partial credit when configured."""
    if passed:
        return cfg.pass_reward
    if cfg.partial_credit and tests_total > 0:
        if not 0 <= tests_passed <= tests_total:
            raise RewardError("bad_verdict", f"tests_passed={tests_passed} of tests_total={tests_total}")
        return cfg.fail_reward + (cfg.pass_reward - cfg.fail_reward) * tests_passed / tests_total
    return cfg.fail_reward


def token_rewards(
    num_tokens: int,
    passed: bool,
    unit_reward: float,
    line_token_index: Sequence[int],
    line_neutral: Sequence[bool],
    prm_scores: Sequence[float] | None,
    cfg: RewardConfig,
) -> torch.Tensor:
    """Per-token reward of one response, shape (num_tokens,), float32, before the KL penalty.

    num_tokens:        response length n (the policy's sampled tokens; prompt excluded).
    passed:            the unit-test verdict; picks λ (lambda_passed or lambda_failed).
    unit_reward:       R_UT (see `unit_test_reward`), placed on token n - 1.
    line_token_index:  per line, the response token holding the line's last character
                       (`services.common.lines.token_index_for_lines`; LineSpan.token_index).
    line_neutral:      per line, blank or comment-only (no reward, not counted in T).
    prm_scores:        per line, R_PRM of the prefix ending at that line; NaN allowed on neutral lines.
                       Needed only when cfg.use_prm_dense.
    """
    if num_tokens <= 0:
        raise RewardError("empty_response", "no response token to place the unit-test reward on")
    if len(line_token_index) != len(line_neutral):
        raise RewardError(
            "bad_lines", f"{len(line_token_index)} line token indices for {len(line_neutral)} lines"
        )
    if not math.isfinite(unit_reward):
        raise RewardError("nonfinite_unit_reward", f"unit-test reward is {unit_reward}")

    rewards = torch.zeros(num_tokens, dtype=torch.float64)  # (n,) accumulate in float64
    if cfg.use_unit_test_reward:
        rewards[-1] += unit_reward  # the sparse RLTF reward lands on the last response token

    if cfg.use_prm_dense:
        if prm_scores is None:
            raise MissingPrmScores("use_prm_dense is on but the trajectory has no PRM scores")
        if len(prm_scores) != len(line_neutral):
            raise MissingPrmScores(f"{len(prm_scores)} PRM scores for {len(line_neutral)} lines")
        lam = cfg.lambda_passed if passed else cfg.lambda_failed
        scored = [m for m, neutral in enumerate(line_neutral) if not neutral]
        num_scored = len(scored)  # T in the paper: neutral lines do not count
        scale = lam / num_scored if cfg.normalize_by_lines and num_scored else lam
        for m in scored:
            score = float(prm_scores[m])
            if not math.isfinite(score):
                raise RewardError("nonfinite_prm_score", f"PRM score of line {m} is {score}")
            token = int(line_token_index[m])
            if not 0 <= token < num_tokens:
                raise RewardError(
                    "line_token_out_of_range", f"line {m} ends at token {token} of {num_tokens}"
                )
            if cfg.prm_clip is not None:
                score = min(max(score, -cfg.prm_clip), cfg.prm_clip)
            # Several lines ending on one token (one token holding "\n\n" and more) add up.
            rewards[token] += scale * score

    if not torch.isfinite(rewards).all():  # e.g. an absurd config overflowing; never train on it
        raise RewardError("nonfinite_reward", "token rewards overflowed")
    return rewards.to(torch.float32)


def check_logprobs(logprobs: Sequence[float], num_tokens: int) -> None:
    """Raise `RewardError` unless there is one finite sampling logprob per response token."""
    if len(logprobs) != num_tokens:
        raise RewardError("bad_logprobs", f"{len(logprobs)} sampling logprobs for {num_tokens} tokens")
    for t, value in enumerate(logprobs):
        if not math.isfinite(value):
            raise RewardError("nonfinite_logprobs", f"sampling logprob of token {t} is {value}")


def trajectory_token_rewards(trajectory: Any, cfg: RewardConfig) -> torch.Tensor:
    """`token_rewards` of a `psgpo.v1.Trajectory` (read by field name; shape (len(response_token_ids),)).

    The sampling logprobs are checked too (`check_logprobs`): PPO's importance ratios need them. A
    trajectory without a sandbox verdict (status UNSPECIFIED = 0: the scoring call failed) is a
    `RewardError`, and one without PRM scores under the dense reward a `MissingPrmScores`: neither is
    ever scored as zero.
    """
    check_logprobs(trajectory.logprobs, len(trajectory.response_token_ids))
    verdict = trajectory.verdict
    if cfg.use_unit_test_reward and int(verdict.status) == 0:
        raise RewardError(
            "missing_verdict", f"trajectory {trajectory.trajectory_id!r} has no sandbox verdict"
        )
    prm_scores: Sequence[float] | None = None
    if cfg.use_prm_dense:
        if not trajectory.has_prm_scores:
            raise MissingPrmScores(f"trajectory {trajectory.trajectory_id!r} has no PRM scores")
        prm_scores = list(trajectory.prm_scores)
    lines = list(trajectory.lines)
    return token_rewards(
        num_tokens=len(trajectory.response_token_ids),
        passed=bool(verdict.passed),
        unit_reward=unit_test_reward(
            bool(verdict.passed), int(verdict.tests_passed), int(verdict.tests_total), cfg
        ),
        line_token_index=[int(span.token_index) for span in lines],
        line_neutral=[bool(span.neutral) for span in lines],
        prm_scores=prm_scores,
        cfg=cfg,
    )


def pad_right(
    sequences: Sequence[torch.Tensor], pad_value: float = 0.0, length: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad 1-D tensors into a batch: (values (B, T), mask (B, T) bool, True on real tokens).

    T = `length` if given (must fit every sequence), else the longest sequence.
    """
    if not sequences:
        raise ValueError("pad_right needs at least one sequence")
    lengths = [int(s.shape[0]) for s in sequences]
    width = max(lengths) if length is None else length
    if max(lengths) > width:
        raise ValueError(f"a sequence of length {max(lengths)} does not fit length {width}")
    first = sequences[0]
    values = torch.full((len(sequences), width), pad_value, dtype=first.dtype, device=first.device)  # (B, T)
    mask = torch.zeros((len(sequences), width), dtype=torch.bool, device=first.device)  # (B, T)
    for b, (seq, n) in enumerate(zip(sequences, lengths, strict=True)):
        values[b, :n] = seq
        mask[b, :n] = True
    return values, mask


def batch_token_rewards(
    per_response: Sequence[torch.Tensor], length: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack `token_rewards` outputs: rewards (B, T) zero on padding, mask (B, T) bool."""
    return pad_right(per_response, 0.0, length)
