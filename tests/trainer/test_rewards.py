"""PSGPO token rewards: placement, neutral lines, λ, the 1/T normalisation, and rejected inputs."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from services.common.lines import split_lines, token_index_for_lines
from trainer.rewards import (
    MissingPrmScores,
    RewardConfig,
    RewardError,
    batch_token_rewards,
    pad_right,
    token_rewards,
    trajectory_token_rewards,
    unit_test_reward,
)

NAN = float("nan")

# The hand-computed example. Response (5 lines), split by services.common.lines:
#   line 0 "def f(x):"       chars [0, 9)    scored
#   line 1 "    # add one"   chars [10, 23)  neutral (comment-only)
#   line 2 "    y = x + 1"   chars [24, 37)  scored
#   line 3 ""                chars [38, 38)  neutral (blank)
#   line 4 "    return y"    chars [39, 51)  scored       -> T = 3 non-neutral lines
# The policy's tokens (8) and the token holding each line's last character:
#   t0 "def"  t1 " f(x):"  t2 "\n    #"  t3 " add one\n"
#   t4 "    y = x"  t5 " + 1\n\n"  t6 "    return"  t7 " y"
#   line 0 -> t1, line 1 -> t3 (neutral), line 2 -> t5, line 3 -> t4 (neutral, empty),
#   line 4 -> t7 (the last token, which also gets R_UT)
RESPONSE = "def f(x):\n    # add one\n    y = x + 1\n\n    return y"
TOKENS = ["def", " f(x):", "\n    #", " add one\n", "    y = x", " + 1\n\n", "    return", " y"]
TOKEN_INDEX = [1, 3, 5, 4, 7]
NEUTRAL = [False, True, False, True, False]
PRM = [0.9, NAN, 0.6, NAN, -0.3]


def _rewards(passed: bool, cfg: RewardConfig | None = None, prm: list[float] | None = PRM) -> torch.Tensor:
    cfg = cfg or RewardConfig()
    unit = unit_test_reward(passed, 3 if passed else 1, 3, cfg)
    return token_rewards(len(TOKENS), passed, unit, TOKEN_INDEX, NEUTRAL, prm, cfg)


def test_example_matches_the_line_definition():
    assert "".join(TOKENS) == RESPONSE
    lines = split_lines(RESPONSE)
    assert [ln.neutral for ln in lines] == NEUTRAL
    ends = list(itertools.accumulate(len(t) for t in TOKENS))
    assert token_index_for_lines(lines, ends) == TOKEN_INDEX


def test_hand_computed_failed_response():
    # failed: λ = 0.25, T = 3, R_UT = 0 on t7
    #   t1: 0.25 * 0.9 / 3 = 0.075    t5: 0.25 * 0.6 / 3 = 0.05    t7: 0 + 0.25 * (-0.3) / 3 = -0.025
    expected = torch.tensor([0, 0.075, 0, 0, 0, 0.05, 0, -0.025])
    got = _rewards(passed=False)
    assert got.shape == (8,) and got.dtype == torch.float32
    torch.testing.assert_close(got, expected)


def test_hand_computed_passed_response():
    # passed: λ = 0.025, T = 3, R_UT = 1 on t7
    #   t1: 0.025 * 0.9 / 3 = 0.0075  t5: 0.025 * 0.6 / 3 = 0.005   t7: 1 + 0.025 * (-0.3) / 3 = 0.9975
    expected = torch.tensor([0, 0.0075, 0, 0, 0, 0.005, 0, 0.9975])
    torch.testing.assert_close(_rewards(passed=True), expected)


def test_lambda_follows_the_verdict_and_is_configurable():
    cfg = RewardConfig(lambda_failed=0.5, lambda_passed=0.1, use_unit_test_reward=False)
    failed, passed = _rewards(False, cfg), _rewards(True, cfg)
    torch.testing.assert_close(failed[1], torch.tensor(0.5 * 0.9 / 3))
    torch.testing.assert_close(passed[1], torch.tensor(0.1 * 0.9 / 3))
    torch.testing.assert_close(failed / 0.5, passed / 0.1)


def test_neutral_lines_get_nothing_whatever_their_score():
    # Finite (even huge) scores on neutral lines are ignored exactly like the NaNs the PRM sends.
    loud = [0.9, 100.0, 0.6, -100.0, -0.3]
    torch.testing.assert_close(_rewards(False, prm=loud), _rewards(False))
    got = _rewards(False)
    assert got[3] == 0 and got[4] == 0  # t3 and t4 only hold neutral lines' ends


def test_only_neutral_lines_gives_only_the_unit_reward():
    got = token_rewards(4, True, 1.0, [0, 2], [True, True], [NAN, NAN], RewardConfig())
    torch.testing.assert_close(got, torch.tensor([0.0, 0.0, 0.0, 1.0]))


def test_several_lines_on_one_token_add_up():
    # "a=1\nb=2\n" tokenized as ["a=", "1\nb=2\n"]: lines 0 and 1 both end inside token 1 (the last),
    # line 2 (empty after the final newline) is neutral. T = 2.
    response, tokens = "a=1\nb=2\n", ["a=", "1\nb=2\n"]
    lines = split_lines(response)
    index = token_index_for_lines(lines, list(itertools.accumulate(len(t) for t in tokens)))
    assert index == [1, 1, 1]
    neutral = [ln.neutral for ln in lines]
    failed = token_rewards(2, False, 0.0, index, neutral, [0.5, 0.7, NAN], RewardConfig())
    torch.testing.assert_close(failed, torch.tensor([0.0, 0.25 * (0.5 + 0.7) / 2]))  # 0.15
    passed = token_rewards(2, True, 1.0, index, neutral, [0.5, 0.7, NAN], RewardConfig())
    torch.testing.assert_close(passed, torch.tensor([0.0, 1.0 + 0.025 * (0.5 + 0.7) / 2]))  # 1.015


def test_divided_by_the_number_of_non_neutral_lines():
    cfg = RewardConfig(use_unit_test_reward=False)
    one = token_rewards(3, False, 0.0, [0], [False], [1.0], cfg)
    torch.testing.assert_close(one, torch.tensor([0.25, 0.0, 0.0]))
    # Neutral lines do not count in T ...
    with_neutral = token_rewards(3, False, 0.0, [0, 1, 2], [False, True, True], [1.0, NAN, NAN], cfg)
    torch.testing.assert_close(with_neutral, one)
    # ... scored ones do: four lines of score 1 share λ, so a longer response earns no more.
    four = token_rewards(4, False, 0.0, [0, 1, 2, 3], [False] * 4, [1.0] * 4, cfg)
    torch.testing.assert_close(four, torch.full((4,), 0.25 / 4))
    assert math.isclose(float(four.sum()), float(one.sum()), rel_tol=1e-6)


def test_normalisation_can_be_switched_off():
    cfg = RewardConfig(use_unit_test_reward=False, normalize_by_lines=False)
    four = token_rewards(4, False, 0.0, [0, 1, 2, 3], [False] * 4, [1.0] * 4, cfg)
    torch.testing.assert_close(four, torch.full((4,), 0.25))


def test_prm_clip():
    cfg = RewardConfig(use_unit_test_reward=False, normalize_by_lines=False, prm_clip=1.0)
    got = token_rewards(3, False, 0.0, [0, 1, 2], [False] * 3, [3.0, -7.0, 0.5], cfg)
    torch.testing.assert_close(got, torch.tensor([0.25, -0.25, 0.125]))


def test_rltf_ignores_prm_scores():
    cfg = RewardConfig.preset("rltf")
    assert not cfg.use_prm_dense
    for prm in (None, [NAN] * 5, PRM):
        torch.testing.assert_close(_rewards(False, cfg, prm), torch.zeros(8))
        torch.testing.assert_close(_rewards(True, cfg, prm), torch.tensor([0.0] * 7 + [1.0]))


def test_unit_test_reward_conventions():
    cfg = RewardConfig()
    assert (unit_test_reward(True, 5, 5, cfg), unit_test_reward(False, 4, 5, cfg)) == (1.0, 0.0)
    signed = RewardConfig(fail_reward=-1.0)
    assert unit_test_reward(False, 0, 5, signed) == -1.0
    partial = RewardConfig(partial_credit=True)
    assert unit_test_reward(False, 3, 4, partial) == 0.75
    assert unit_test_reward(False, 0, 0, partial) == 0.0  # no tests ran: no credit
    assert unit_test_reward(False, 1, 4, RewardConfig(partial_credit=True, fail_reward=-1.0)) == -0.5
    with pytest.raises(RewardError):
        unit_test_reward(False, 5, 4, partial)


def test_unit_reward_lands_on_the_last_token_only():
    got = token_rewards(6, False, -1.0, [], [], [], RewardConfig())
    torch.testing.assert_close(got, torch.tensor([0.0] * 5 + [-1.0]))


@pytest.mark.parametrize("bad", [NAN, float("inf"), float("-inf")])
def test_nonfinite_prm_score_on_a_scored_line_is_rejected(bad: float):
    prm = [0.9, NAN, bad, NAN, -0.3]
    with pytest.raises(RewardError) as info:
        _rewards(False, prm=prm)
    assert info.value.reason == "nonfinite_prm_score" and "line 2" in str(info.value)
    assert isinstance(info.value, ValueError)


def test_missing_prm_scores_are_rejected_when_dense_is_on():
    with pytest.raises(MissingPrmScores) as info:
        _rewards(False, prm=None)
    assert info.value.reason == "missing_prm_scores" and isinstance(info.value, ValueError)
    with pytest.raises(MissingPrmScores):
        _rewards(False, prm=[0.9, NAN, 0.6])  # fewer scores than lines


@pytest.mark.parametrize(
    ("kwargs", "reason"),
    [
        ({"unit_reward": NAN}, "nonfinite_unit_reward"),
        ({"unit_reward": float("inf")}, "nonfinite_unit_reward"),
        ({"num_tokens": 0}, "empty_response"),
        ({"line_token_index": [1, 3, 5, 4, 8]}, "line_token_out_of_range"),
        ({"line_token_index": [-1, 3, 5, 4, 7]}, "line_token_out_of_range"),
        ({"line_neutral": [False, True]}, "bad_lines"),
    ],
)
def test_malformed_inputs_are_rejected(kwargs: dict, reason: str):
    args = {
        "num_tokens": 8,
        "passed": False,
        "unit_reward": 0.0,
        "line_token_index": TOKEN_INDEX,
        "line_neutral": NEUTRAL,
        "prm_scores": PRM,
        "cfg": RewardConfig(),
    }
    with pytest.raises(RewardError) as info:
        token_rewards(**{**args, **kwargs})
    assert info.value.reason == reason


def test_config_validation_and_presets():
    assert RewardConfig.preset("psgpo").use_prm_dense
    assert RewardConfig.preset("psgpo", lambda_failed=0.1).lambda_failed == 0.1
    with pytest.raises(ValueError):
        RewardConfig.preset("grpo")  # type: ignore[arg-type]
    for bad in ({"prm_clip": 0.0}, {"kl_coef": -0.1}, {"kl_estimator": "k4"}, {"lambda_failed": NAN}):
        with pytest.raises(ValueError):
            RewardConfig(**bad)


def _trajectory(**overrides):
    from psgpo.v1 import rollout_pb2, sandbox_pb2

    lines = split_lines(RESPONSE)
    traj = rollout_pb2.Trajectory(
        trajectory_id="t:0",
        response=RESPONSE,
        response_token_ids=list(range(100, 108)),
        logprobs=[-0.5] * 8,
        lines=[
            rollout_pb2.LineSpan(line=ln.index, start=ln.start, end=ln.end, token_index=i, neutral=ln.neutral)
            for ln, i in zip(lines, TOKEN_INDEX, strict=True)
        ],
        verdict=sandbox_pb2.RunResult(
            status=sandbox_pb2.RUN_STATUS_FAILED, passed=False, tests_passed=1, tests_total=3
        ),
        prm_scores=PRM,
        has_prm_scores=True,
    )
    for key, value in overrides.items():
        if key == "verdict":
            traj.verdict.CopyFrom(value)
        else:
            setattr(traj, key, value)
    return traj


def test_trajectory_token_rewards_reads_the_proto():
    got = trajectory_token_rewards(_trajectory(), RewardConfig())
    torch.testing.assert_close(got, torch.tensor([0, 0.075, 0, 0, 0, 0.05, 0, -0.025]))
    partial = trajectory_token_rewards(_trajectory(), RewardConfig(partial_credit=True))
    assert math.isclose(float(partial[7]), 1 / 3 - 0.025, rel_tol=1e-6)


def test_trajectory_without_scores_or_verdict_is_rejected():
    from psgpo.v1 import sandbox_pb2

    with pytest.raises(MissingPrmScores):
        trajectory_token_rewards(_trajectory(has_prm_scores=False), RewardConfig.preset("psgpo"))
    # The RLTF baseline does not need PRM scores.
    rltf = trajectory_token_rewards(_trajectory(has_prm_scores=False), RewardConfig.preset("rltf"))
    torch.testing.assert_close(rltf, torch.zeros(8))
    with pytest.raises(RewardError) as info:
        trajectory_token_rewards(_trajectory(verdict=sandbox_pb2.RunResult()), RewardConfig())
    assert info.value.reason == "missing_verdict"


@pytest.mark.parametrize(
    ("logprobs", "reason"),
    [
        ([-0.5] * 7, "bad_logprobs"),
        ([-0.5] * 7 + [NAN], "nonfinite_logprobs"),
        ([-0.5] * 7 + [float("-inf")], "nonfinite_logprobs"),
    ],
)
def test_trajectory_with_bad_sampling_logprobs_is_rejected(logprobs: list[float], reason: str):
    traj = _trajectory()
    del traj.logprobs[:]
    traj.logprobs.extend(logprobs)
    with pytest.raises(RewardError) as info:
        trajectory_token_rewards(traj, RewardConfig())
    assert info.value.reason == reason


def test_batch_pads_right_with_a_mask():
    a, b = torch.tensor([1.0, 2.0, 3.0]), torch.tensor([4.0])
    rewards, mask = batch_token_rewards([a, b])
    torch.testing.assert_close(rewards, torch.tensor([[1.0, 2.0, 3.0], [4.0, 0.0, 0.0]]))
    assert mask.dtype == torch.bool and mask.tolist() == [[True, True, True], [True, False, False]]
    rewards, mask = batch_token_rewards([a, b], length=5)
    assert rewards.shape == mask.shape == (2, 5) and int(mask.sum()) == 4
    with pytest.raises(ValueError):
        pad_right([a], length=2)
    ids, _ = pad_right([torch.tensor([7, 8]), torch.tensor([9])], pad_value=-1)
    assert ids.tolist() == [[7, 8], [9, -1]]


@settings(max_examples=60, deadline=None)
@given(
    num_tokens=st.integers(1, 30),
    passed=st.booleans(),
    lines=st.lists(
        st.tuples(st.integers(0, 29), st.booleans(), st.floats(-2, 2, allow_nan=False)), max_size=12
    ),
)
def test_total_reward_is_unit_plus_lambda_times_mean_line_score(num_tokens, passed, lines):
    lines = [(min(i, num_tokens - 1), neutral, score) for i, neutral, score in lines]
    cfg = RewardConfig()
    unit = unit_test_reward(passed, 0, 0, cfg)
    scores = [NAN if neutral else s for _, neutral, s in lines]
    got = token_rewards(
        num_tokens, passed, unit, [i for i, _, _ in lines], [n for _, n, _ in lines], scores, cfg
    )
    scored = [s for _, neutral, s in lines if not neutral]
    lam = cfg.lambda_passed if passed else cfg.lambda_failed
    expected_total = unit + (lam * sum(scored) / len(scored) if scored else 0.0)
    assert math.isclose(float(got.sum()), expected_total, abs_tol=1e-5)
    touched = {i for i, neutral, _ in lines if not neutral} | {num_tokens - 1}
    assert all(float(got[t]) == 0.0 for t in range(num_tokens) if t not in touched)
