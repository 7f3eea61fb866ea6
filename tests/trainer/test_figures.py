"""trainer.figures: learning curves over seeds and per-line score bars, drawn with numpy into PNGs."""

from __future__ import annotations

import math

import numpy as np
import pytest

from tests.pngs import decode_png
from trainer.figures import (
    AXIS_X,
    BAR_W,
    BAR_X0,
    CHAR_H,
    CURVE_H,
    CURVE_W,
    HEAD_H,
    LINES_W,
    PALETTE,
    ROW_H,
    draw_curves_panel,
    draw_line_scores,
    mean_band,
    moving_average,
    score_range,
    write_learning_curves,
    write_line_scores,
)
from trainer.plot import FONT, draw_text

NAN = math.nan


def has_color(img: np.ndarray, color: tuple[int, int, int]) -> np.ndarray:
    return (img == np.array(color, dtype=np.uint8)).all(axis=-1)


def is_green(img: np.ndarray) -> np.ndarray:
    r, g, b = (img[..., i].astype(int) for i in range(3))
    return (g > 130) & (r < 100) & (b < 120)


def is_red(img: np.ndarray) -> np.ndarray:
    r, g, b = (img[..., i].astype(int) for i in range(3))
    return (r > 170) & (g < 90) & (b < 90)


def ink(img: np.ndarray) -> np.ndarray:
    return (img < 200).any(axis=-1)


# ---------------------------------------------------------------- the pure helpers


def test_mean_band_uses_only_the_steps_every_seed_has():
    seeds = [
        ([0, 10, 20, 30], [1.0, 2.0, 3.0, 4.0]),
        ([0, 10, 20], [3.0, 6.0, 5.0]),  # a shorter seed: step 30 is dropped
        ([10, 20, 0], [4.0, 1.0, 2.0]),  # another order, no extra steps
    ]
    steps, mean, low, high = mean_band(seeds, smooth=1)
    assert steps == [0.0, 10.0, 20.0]
    assert mean == pytest.approx([2.0, 4.0, 3.0])
    assert low == [1.0, 2.0, 1.0]
    assert high == [3.0, 6.0, 5.0]


def test_mean_band_skips_nan_values_and_smooths_each_line():
    seeds = [([1, 2, 3], [1.0, NAN, 5.0]), ([1, 2, 3], [3.0, 4.0, NAN])]
    steps, mean, low, high = mean_band(seeds, smooth=1)
    assert steps == [1.0, 2.0, 3.0]
    assert (mean, low, high) == ([2.0, 4.0, 5.0], [1.0, 4.0, 5.0], [3.0, 4.0, 5.0])
    steps, mean, low, high = mean_band(seeds, smooth=2)
    assert mean == pytest.approx([2.0, 3.0, 4.5])
    assert low == pytest.approx([1.0, 2.5, 4.5])
    assert high == pytest.approx([3.0, 3.5, 4.5])


def test_mean_band_one_seed_and_errors():
    assert mean_band([([5, 6], [1.0, 2.0])], smooth=1) == ([5.0, 6.0], [1.0, 2.0], [1.0, 2.0], [1.0, 2.0])
    assert mean_band([([1, 2], [1.0, 2.0]), ([3, 4], [1.0, 2.0])], smooth=1) == ([], [], [], [])
    with pytest.raises(ValueError, match="at least one seed"):
        mean_band([], smooth=1)
    with pytest.raises(ValueError, match="3 steps but 2 values"):
        mean_band([([1, 2, 3], [1.0, 2.0])], smooth=1)


def test_moving_average_is_trailing_and_skips_nan():
    assert moving_average([1.0, 2.0, 3.0, 4.0, 10.0], 3) == pytest.approx([1.0, 1.5, 2.0, 3.0, 17 / 3])
    assert moving_average([1.0, 2.0], 1) == [1.0, 2.0]
    out = moving_average([NAN, NAN, 4.0, NAN, NAN, NAN], 2)
    assert math.isnan(out[0]) and math.isnan(out[1]) and math.isnan(out[5])
    assert out[2:4] == [4.0, 4.0] and math.isnan(out[4])  # 4.0 has left the two-point window
    with pytest.raises(ValueError, match=">= 1"):
        moving_average([1.0], 0)


def test_score_range_is_a_round_number_above_the_largest_magnitude():
    assert score_range([0.3, -0.7, None]) == 1.0
    assert score_range([0.02, -0.013]) == pytest.approx(0.02)
    assert score_range([1.3, -2.2]) == 2.5
    assert score_range([3.0]) == 5.0
    assert score_range([None, NAN, 0.0]) == 1.0
    assert score_range([0.1], threshold=0.5) == pytest.approx(0.5)


def test_added_glyphs_for_code():
    for char in "*<>'\"!#{}&|~^;@\\":
        assert char in FONT and len(FONT[char]) == 15 and "#" in FONT[char], char
    # distinct from the fallback '?' and from each other
    added = [FONT[c] for c in "*<>'\"!#{}&|~^;@\\"]
    assert FONT["?"] not in added and len(set(added)) == len(added)
    img = np.full((12, 40, 3), 255, dtype=np.uint8)
    draw_text(img, 0, 0, "{}")
    question = np.full((12, 40, 3), 255, dtype=np.uint8)
    draw_text(question, 0, 0, "??")
    assert not (img == question).all()


# ---------------------------------------------------------------- curve panels


def test_curves_panel_draws_each_series_in_its_colour_with_a_legend():
    steps = list(range(50))
    series = {f"variant {i}": (steps, [math.sin(s / 7 + i) + i for s in steps]) for i in range(6)}
    series["variant 0"][1][10] = NAN
    series["variant 1"][1][11] = math.inf
    img = draw_curves_panel("pass rate", series)
    assert img.shape == (CURVE_H, CURVE_W, 3) and img.dtype == np.uint8
    for i in range(6):
        assert has_color(img, PALETTE[i]).sum() > 150, f"series {i} has no curve"
    legend = img[CURVE_H - 60 :, :]
    assert ink(legend).sum() > 300  # swatches and names
    for i in range(6):
        assert has_color(legend, PALETTE[i]).sum() >= 20, f"no legend swatch for series {i}"


def test_curves_panel_band_is_a_light_tint_of_the_series_colour():
    steps = [0.0, 1.0, 2.0, 3.0]
    series = {"a": (steps, [0.0, 1.0, 2.0, 3.0]), "b": (steps, [3.0, 2.0, 1.0, 0.0])}
    bare = draw_curves_panel("t", series)
    banded = draw_curves_panel("t", series, band={"a": ([-1.0, 0.0, 1.0, 2.0], [1.0, 2.0, 3.0, 4.0])})
    blue = np.array(PALETTE[0], dtype=int)
    changed = (bare != banded).any(axis=-1)
    assert changed.sum() > 2000
    pixels = banded[changed].astype(int)
    tinted = pixels[(pixels > 150).all(axis=-1)]  # the band, not the re-drawn curves or labels
    assert len(tinted) > 1500
    # a tint of blue: lighter than the curve colour and bluer than red or green
    assert (tinted.mean(axis=0) > blue).all()
    assert tinted[:, 2].mean() > tinted[:, 0].mean()
    with pytest.raises(ValueError, match="not one of the series"):
        draw_curves_panel("t", series, band={"c": ([0.0], [1.0])})
    with pytest.raises(ValueError, match="one \\(low, high\\) per x"):
        draw_curves_panel("t", series, band={"a": ([0.0], [1.0])})


def test_curves_panel_without_finite_values():
    message = np.full((10, 16 * 8, 3), 255, dtype=np.uint8)
    draw_text(message, 0, 0, "NO FINITE VALUES", (150, 150, 150))
    for img in (
        draw_curves_panel("empty", {}),
        draw_curves_panel("nan", {"a": ([1.0, 2.0], [NAN, math.inf])}),
    ):
        assert img.shape == (CURVE_H, CURVE_W, 3)
        assert not has_color(img[: CURVE_H - 30], PALETTE[0]).any()  # no curve above the legend
        found = [
            (y, x)
            for y in range(30, CURVE_H - 30)
            for x in (80,)
            if (img[y : y + 10, x : x + message.shape[1]] == message).all()
        ]
        assert found, "the panel does not say NO FINITE VALUES"


def test_write_learning_curves_grid_mean_and_band(tmp_path):
    seeds_a = [([0, 1, 2, 3], [0.0, 0.2, 0.4, 0.6]), ([0, 1, 2], [0.2, 0.4, 0.6])]
    seeds_b = [([0, 1, 2, 3], [0.6, 0.5, 0.4, 0.3])]
    panels = {
        "pass rate": {"ppo": seeds_a, "grpo": seeds_b},
        "kl": {"grpo": seeds_b},  # ppo missing here: grpo keeps its colour
        "loss": {"ppo": seeds_a, "grpo": seeds_b},
    }
    path = write_learning_curves(tmp_path / "sub" / "curves.png", panels, smooth=2)
    assert path == tmp_path / "sub" / "curves.png"
    pixels = decode_png(path)
    assert pixels.shape == (2 * CURVE_H, 2 * CURVE_W, 3)
    cells = [
        pixels[r * CURVE_H : (r + 1) * CURVE_H, c * CURVE_W : (c + 1) * CURVE_W]
        for r, c in ((0, 0), (0, 1), (1, 0))
    ]
    plot_area = slice(0, CURVE_H - 40)
    for cell in (cells[0], cells[2]):
        assert has_color(cell[plot_area], PALETTE[0]).sum() > 50  # ppo
        assert has_color(cell[plot_area], PALETTE[1]).sum() > 50  # grpo
    assert not has_color(cells[1][plot_area], PALETTE[0]).any()
    assert has_color(cells[1][plot_area], PALETTE[1]).sum() > 50
    empty_cell = pixels[CURVE_H:, CURVE_W:]
    assert (empty_cell == 255).all()
    # the same figure drawn by hand from mean_band: identical pixels
    steps, mean, low, high = mean_band(seeds_a, smooth=2)
    assert steps == [0.0, 1.0, 2.0] and mean == pytest.approx([0.1, 0.2, 0.4])
    s_b, m_b, _, _ = mean_band(seeds_b, smooth=2)
    expected = draw_curves_panel(
        "pass rate", {"ppo": (steps, mean), "grpo": (s_b, m_b)}, {"ppo": (low, high)}
    )
    assert (cells[0] == expected).all()


def test_write_learning_curves_single_panel_and_errors(tmp_path):
    path = write_learning_curves(tmp_path / "one.png", {"x": {"a": [([1, 2], [1.0, 2.0])]}})
    assert decode_png(path).shape == (CURVE_H, CURVE_W, 3)
    with pytest.raises(ValueError, match="at least one panel"):
        write_learning_curves(tmp_path / "none.png", {})
    assert not (tmp_path / "none.png").exists()


# ---------------------------------------------------------------- per-line scores


def row_pixels(img: np.ndarray, i: int) -> np.ndarray:
    top = HEAD_H + i * ROW_H + 2
    return img[top : top + CHAR_H]


def test_line_scores_bars_sides_and_colours():
    lines = ["def f(x):", "    y = x * 2  # {a: 'b'}", "    return y", "pass"]
    img = draw_line_scores("f", lines, [0.8, -0.5, None, 0.3], threshold=0.0)
    assert img.shape == (HEAD_H + 4 * ROW_H + 8, LINES_W, 3)
    bar_zone = slice(BAR_X0, BAR_X0 + BAR_W + 1)  # the value text, right of it, is coloured too
    positive, negative, neutral, small = (row_pixels(img, i)[:, bar_zone] for i in range(4))
    left, right = slice(0, AXIS_X - BAR_X0), slice(AXIS_X - BAR_X0 + 1, None)
    assert is_green(positive[:, right]).sum() > 500 and not is_green(positive[:, left]).any()
    assert not is_red(positive).any()
    assert is_red(negative[:, left]).sum() > 300 and not is_red(negative[:, right]).any()
    assert not is_green(negative).any()
    assert not is_green(neutral).any() and not is_red(neutral).any()
    assert ink(neutral).sum() > 40  # the word NEUTRAL
    # bar length is proportional to the score on the [-1, 1] scale
    assert is_green(positive).sum() > 2 * is_green(small).sum() > 0
    # the code and the line numbers are drawn
    assert ink(row_pixels(img, 1)[:, :BAR_X0]).sum() > 100


def test_line_scores_threshold_colours_and_errors():
    img = draw_line_scores("p", ["a", "b"], [0.9, 0.3], threshold=0.5)
    high, low = row_pixels(img, 0), row_pixels(img, 1)
    assert is_green(high).sum() > 100 and not is_red(high).any()
    assert is_red(low[:, AXIS_X:]).sum() > 50 and not is_green(low).any()  # at or below threshold: red
    long = draw_line_scores("long", ["\tx = " + "1 + " * 100], [1.0])
    assert long.shape[1] == LINES_W  # the code is cut, not the figure widened
    with pytest.raises(ValueError, match="2 lines but 1 scores"):
        draw_line_scores("p", ["a", "b"], [0.1])


def test_write_line_scores_stacks_panels(tmp_path):
    examples = [
        {"title": "one", "lines": ["a = 1", "b = 2"], "scores": [0.5, -0.5]},
        {"title": "two", "lines": ["c = 3"], "scores": [None], "threshold": 0.2},
    ]
    path = write_line_scores(tmp_path / "lines.png", examples)
    pixels = decode_png(path)
    first = draw_line_scores("one", ["a = 1", "b = 2"], [0.5, -0.5])
    second = draw_line_scores("two", ["c = 3"], [None], threshold=0.2)
    assert pixels.shape == (first.shape[0] + 2 + second.shape[0], LINES_W, 3)
    assert (pixels[: first.shape[0]] == first).all()
    assert (pixels[first.shape[0] + 2 :] == second).all()
    with pytest.raises(ValueError, match="at least one example"):
        write_line_scores(tmp_path / "none.png", [])
    with pytest.raises(ValueError, match="example 0 lacks scores"):
        write_line_scores(tmp_path / "bad.png", [{"title": "x", "lines": []}])


def test_legend_clips_long_names_to_keep_the_plot():
    from trainer.figures import LEGEND_ROWS, _legend_layout

    names = [f"variant number {i} with a long name" for i in range(8)]
    placed = _legend_layout(names, CURVE_W)
    assert max(row for _, row, _ in placed) < LEGEND_ROWS
    assert all(label.endswith("..") and len(label) >= 8 for _, _, label in placed)
    assert [label for _, _, label in _legend_layout(["a", "bb"], CURVE_W)] == ["a", "bb"]
    assert _legend_layout([], CURVE_W) == []
