"""Figures for `psgpo demo`: learning curves of several variants over seeds, and per-line program scores.

Drawn with numpy, trainer.plot's 3x5 bitmap font and its PNG writer, like `psgpo plot`, so nothing beyond
the base install is needed.

- `draw_curves_panel` / `write_learning_curves`: one panel per metric, one coloured curve per variant (the
  mean over seeds at the steps every seed has, optionally a trailing moving average), a light band from
  the min to the max over seeds, and a legend under the plot.
- `draw_line_scores` / `write_line_scores`: one row per program line (number, code, a bar from a centre
  zero axis to the line's score; green above the threshold, red at or below, NEUTRAL for None).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import numpy as np

from trainer.plot import (
    BLACK,
    GREY,
    SCALE,
    WHITE,
    _fmt,
    draw_axis_labels,
    draw_line,
    draw_text,
    fit_axes,
    text_width,
    write_png,
)

Color = tuple[int, int, int]
Series = tuple[list[float], list[float]]

# Distinguishable curve colours, assigned in the order of the series.
PALETTE: tuple[Color, ...] = (
    (31, 90, 180),  # blue
    (230, 120, 20),  # orange
    (40, 150, 60),  # green
    (200, 40, 40),  # red
    (130, 70, 180),  # purple
    (140, 90, 50),  # brown
    (220, 90, 170),  # pink
    (20, 150, 160),  # teal
)
CHAR_W, CHAR_H = 4 * SCALE, 5 * SCALE  # the advance and the ink height of one character

CURVE_W, CURVE_H = 480, 300
CURVE_LEFT, CURVE_RIGHT, CURVE_TOP = 72, 14, 26
LEGEND_ROW, LEGEND_ROWS, SWATCH_W = 16, 4, 14
BAND_TINT = 0.22  # the share of the series colour in its band (the rest is white)

GOOD, BAD, STRIPE = (40, 160, 70), (205, 50, 50), (244, 244, 244)
ROW_H, HEAD_H = 14, 40  # a line-score row, and the title plus scale labels above the rows
NUMBER_CHARS, CODE_CHARS, VALUE_CHARS = 3, 56, 8
NUMBER_X = 8
CODE_X = NUMBER_X + (NUMBER_CHARS + 1) * CHAR_W
BAR_X0 = CODE_X + CODE_CHARS * CHAR_W + 12
BAR_W = 200
AXIS_X = BAR_X0 + BAR_W // 2
VALUE_X = BAR_X0 + BAR_W + 8
LINES_W = VALUE_X + VALUE_CHARS * CHAR_W + 8


def _clip(text: str, chars: int) -> str:
    """`text` cut to at most `chars` characters, ending in '..' when cut."""
    if len(text) <= chars:
        return text
    return text[: max(0, chars - 2)] + ".." if chars >= 2 else text[:chars]


# ---------------------------------------------------------------- learning curves


def moving_average(values: list[float], window: int) -> list[float]:
    """Trailing moving average: point i is the mean of the finite values among points i-window+1..i
    (fewer at the start); NaN when none of them is finite."""
    if window < 1:
        raise ValueError(f"smoothing window must be >= 1, got {window}")
    out = []
    for i in range(len(values)):
        finite = [v for v in values[max(0, i - window + 1) : i + 1] if math.isfinite(v)]
        out.append(sum(finite) / len(finite) if finite else math.nan)
    return out


def mean_band(
    seeds: list[Series], smooth: int = 1
) -> tuple[list[float], list[float], list[float], list[float]]:
    """(steps, mean, low, high) over seeds at the steps present in every seed, in increasing order.

    mean/low/high are the mean/min/max of the seeds' finite values at each step (NaN where none is
    finite), each then smoothed with a trailing moving average of `smooth` points. With one seed,
    low == high == mean."""
    if not seeds:
        raise ValueError("mean_band needs at least one seed's (steps, values)")
    tables = []
    for steps, values in seeds:
        if len(steps) != len(values):
            raise ValueError(f"a seed has {len(steps)} steps but {len(values)} values")
        tables.append({float(s): float(v) for s, v in zip(steps, values, strict=True)})
    common = sorted(set.intersection(*(set(t) for t in tables)))
    mean, low, high = [], [], []
    for step in common:
        finite = [t[step] for t in tables if math.isfinite(t[step])]
        mean.append(sum(finite) / len(finite) if finite else math.nan)
        low.append(min(finite) if finite else math.nan)
        high.append(max(finite) if finite else math.nan)
    return common, moving_average(mean, smooth), moving_average(low, smooth), moving_average(high, smooth)


def _legend_layout(names: list[str], width: int) -> list[tuple[int, int, str]]:
    """(x, row, label) of each legend entry, flowing left to right and wrapping within `width`; names
    are clipped (down to 8 characters) when the full ones would take more than LEGEND_ROWS rows."""
    longest = max((len(name) for name in names), default=0)
    for max_chars in range(min(longest, (width - 16 - SWATCH_W - 4) // CHAR_W), 7, -1):
        placed = _flow([_clip(name, max_chars) for name in names], width)
        if placed[-1][1] < LEGEND_ROWS:
            return placed
    return _flow([_clip(name, 8) for name in names], width)


def _flow(labels: list[str], width: int) -> list[tuple[int, int, str]]:
    placed, x, row = [], 8, 0
    for label in labels:
        entry = SWATCH_W + 4 + text_width(label)
        if x > 8 and x + entry > width - 8:
            x, row = 8, row + 1
        placed.append((x, row, label))
        x += entry + 16
    return placed


def _draw_legend(img: np.ndarray, colors: dict[str, Color], with_data: set[str]) -> int:
    """Colour swatch + name of each series along the bottom of `img` (names of series with no finite
    point in grey); returns the y of the legend's top."""
    legend = _legend_layout(list(colors), img.shape[1])
    top = img.shape[0] - 6 - (max((row for _, row, _ in legend), default=-1) + 1) * LEGEND_ROW
    for (x, row, label), (name, color) in zip(legend, colors.items(), strict=True):
        y = top + row * LEGEND_ROW
        img[y + 2 : y + CHAR_H - 2, x : x + SWATCH_W] = color
        draw_text(img, x + SWATCH_W + 4, y, label, BLACK if name in with_data else GREY)
    return top


def _finite(xs: list[float], *columns: list[float]) -> list[tuple[float, ...]]:
    """Rows (x, c1, c2, ...) where every value is finite, sorted by x."""
    rows = zip(xs, *columns, strict=True)
    return sorted(tuple(map(float, r)) for r in rows if all(math.isfinite(v) for v in r))


def _check_band(series: dict[str, Series], band: dict[str, Series]) -> None:
    for name, (low, high) in band.items():
        if name not in series:
            raise ValueError(f"band for {name!r}, which is not one of the series ({', '.join(series)})")
        if not len(low) == len(high) == len(series[name][0]):
            raise ValueError(f"band for {name!r} must have one (low, high) per x of the series")


def _fill_band(
    img: np.ndarray,
    rows: list[tuple[float, ...]],
    px: Callable[[float], float],
    py: Callable[[float], float],
    color: Color,
    clip: tuple[int, int],
) -> None:
    """Tint the area between low and high (linear between points) with a light shade of `color`."""
    mask = np.zeros(img.shape[:2], dtype=bool)
    screen = [(px(x), py(hi), py(lo)) for x, lo, hi in rows]
    pairs = list(zip(screen, screen[1:], strict=False)) or [(screen[0], screen[0])]
    for (x0, top0, bot0), (x1, top1, bot1) in pairs:
        for col in range(int(round(x0)), int(round(x1)) + 1):
            t = 0.0 if x1 == x0 else min(1.0, max(0.0, (col - x0) / (x1 - x0)))
            top, bot = top0 + t * (top1 - top0), bot0 + t * (bot1 - bot0)
            mask[max(clip[0], int(round(top))) : min(clip[1], int(round(bot))) + 1, col] = True
    tint = np.array([255 - BAND_TINT * (255 - c) for c in color]) / 255.0
    img[mask] = (img[mask] * tint).astype(np.uint8)  # multiplied, so overlapping bands stay visible


def draw_curves_panel(
    title: str, series: dict[str, Series], band: dict[str, Series] | None = None
) -> np.ndarray:
    """A CURVE_W x CURVE_H panel: one curve per series (x = steps, y = values; non-finite points skipped)
    in PALETTE colours in dict order, min/max y labels, first/last x labels and a legend under the plot.
    `band[name]` = (low, high) aligned with that series' x, drawn as a light tint of its colour."""
    band = band or {}
    _check_band(series, band)
    colors = {name: PALETTE[i % len(PALETTE)] for i, name in enumerate(series)}
    img = np.full((CURVE_H, CURVE_W, 3), WHITE, dtype=np.uint8)
    draw_text(img, CURVE_LEFT, 6, _clip(title, (CURVE_W - CURVE_LEFT) // CHAR_W))

    points = {name: _finite(xs, ys) for name, (xs, ys) in series.items()}
    bands = {name: _finite(series[name][0], low, high) for name, (low, high) in band.items()}
    legend_top = _draw_legend(img, colors, {name for name, rows in points.items() if rows})
    x_lo, x_hi = CURVE_LEFT, CURVE_W - CURVE_RIGHT
    y_hi, y_lo = CURVE_TOP, legend_top - 24  # room for the x labels between plot and legend
    img[y_hi : y_lo + 1, [x_lo, x_hi]] = GREY
    img[[y_hi, y_lo], x_lo : x_hi + 1] = GREY
    xs = [row[0] for rows in (*points.values(), *bands.values()) for row in rows]
    ys = [v for rows in (*points.values(), *bands.values()) for row in rows for v in row[1:]]
    if not any(points.values()):
        draw_text(img, x_lo + 8, (y_hi + y_lo) // 2 - 5, "NO FINITE VALUES", GREY)
        return img

    axes = fit_axes((x_lo, x_hi, y_lo, y_hi), xs, ys)
    for name, rows in bands.items():
        if rows:
            _fill_band(img, rows, axes.px, axes.py, colors[name], (y_hi + 1, y_lo - 1))
    draw_axis_labels(img, axes)

    for name, rows in points.items():
        screen = [(axes.px(s), axes.py(v)) for s, v in rows]
        for (x0, y0), (x1, y1) in zip(screen, screen[1:], strict=False):
            draw_line(img, x0, y0, x1, y1, colors[name])
        if len(screen) <= 30:
            for x, y in screen:
                xi, yi = int(round(x)), int(round(y))
                img[max(0, yi - 1) : yi + 3, max(0, xi - 1) : xi + 3] = colors[name]
    return img


def write_learning_curves(path: Path, panels: dict[str, dict[str, list[Series]]], smooth: int = 1) -> Path:
    """One PNG of learning-curve panels (2 columns): per panel title, per variant, the mean over its seeds
    (common steps, trailing moving average of `smooth` points) and a min..max band when >= 2 seeds.

    A variant keeps the same colour in every panel (colours follow the order in which variants first
    appear); a variant missing from a panel is listed in its legend with no curve."""
    if not panels:
        raise ValueError("write_learning_curves needs at least one panel (title -> variant -> seeds)")
    variants = list(dict.fromkeys(name for variants in panels.values() for name in variants))
    images = []
    for title, runs in panels.items():
        series: dict[str, Series] = {}
        band: dict[str, Series] = {}
        for name in variants:
            seeds = runs.get(name, [])
            steps, mean, low, high = mean_band(seeds, smooth) if seeds else ([], [], [], [])
            series[name] = (steps, mean)
            if len(seeds) >= 2:
                band[name] = (low, high)
        images.append(draw_curves_panel(title, series, band))
    columns = min(2, len(images))
    rows = math.ceil(len(images) / columns)
    canvas = np.full((rows * CURVE_H, columns * CURVE_W, 3), WHITE, dtype=np.uint8)
    for i, image in enumerate(images):
        r, c = divmod(i, columns)
        canvas[r * CURVE_H : (r + 1) * CURVE_H, c * CURVE_W : (c + 1) * CURVE_W] = image
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_png(path, canvas)
    return path


# ---------------------------------------------------------------- per-line scores


def score_range(scores: list[float | None], threshold: float = 0.0) -> float:
    """Half-width of the symmetric bar scale: the largest |score| (or |threshold|) rounded up to 1, 2,
    2.5 or 5 times a power of ten; 1 when there is no non-zero finite score or threshold."""
    finite = [abs(s) for s in scores if s is not None and math.isfinite(s)]
    if math.isfinite(threshold):
        finite.append(abs(threshold))
    top = max(finite, default=0.0)
    if top == 0.0:
        return 1.0
    power = 10.0 ** math.floor(math.log10(top))
    for step in (1, 2, 2.5, 5, 10):
        if step * power >= top * (1 - 1e-9):
            return step * power
    return 10 * power  # unreachable: 10 * power > top


def _signed(value: float) -> str:
    return ("+" if value > 0 else "") + _fmt(value, 2)


def draw_line_scores(
    title: str, lines: list[str], scores: list[float | None], threshold: float = 0.0
) -> np.ndarray:
    """One program, one row per line: its number, its code (tabs expanded, indentation kept, cut to
    CODE_CHARS), and a bar from the centre zero axis to its score on a symmetric scale (score_range),
    GOOD colour when score > threshold and BAD otherwise, with the value on the right; None (or NaN)
    shows the word NEUTRAL (NAN) in grey and no bar. A dashed grey line marks a non-zero threshold."""
    if len(lines) != len(scores):
        raise ValueError(f"{len(lines)} lines but {len(scores)} scores")
    height = HEAD_H + max(1, len(lines)) * ROW_H + 8
    img = np.full((height, LINES_W, 3), WHITE, dtype=np.uint8)
    scale = score_range(scores, threshold)
    half = BAR_W // 2
    for i in range(1, len(lines), 2):
        img[HEAD_H + i * ROW_H : HEAD_H + (i + 1) * ROW_H] = STRIPE

    draw_text(img, NUMBER_X, 6, _clip(title, (LINES_W - 2 * NUMBER_X) // CHAR_W))
    if threshold != 0.0:
        note = f"THRESHOLD {_fmt(threshold, 3)} (DASHED)"
        draw_text(img, LINES_W - 8 - text_width(note), 6, note, GREY)
    low, high = "-" + _fmt(scale), "+" + _fmt(scale)
    draw_text(img, BAR_X0, 24, low, GREY)
    draw_text(img, AXIS_X - CHAR_W // 2, 24, "0", GREY)
    draw_text(img, BAR_X0 + BAR_W - text_width(high), 24, high, GREY)
    img[HEAD_H - 4 : height - 6, AXIS_X] = BLACK
    img[HEAD_H - 4, BAR_X0 : BAR_X0 + BAR_W + 1] = GREY
    if not lines:
        draw_text(img, CODE_X, HEAD_H + 2, "NO LINES", GREY)
        return img

    for i, (line, score) in enumerate(zip(lines, scores, strict=True)):
        top = HEAD_H + i * ROW_H + 2
        draw_text(img, NUMBER_X, top, str(i + 1).rjust(NUMBER_CHARS), GREY)
        draw_text(img, CODE_X, top, _clip(line.expandtabs(4).rstrip(), CODE_CHARS))
        if score is None or not math.isfinite(score):
            word = "NEUTRAL" if score is None else "NAN"
            x = AXIS_X - text_width(word) // 2
            img[top - 1 : top + CHAR_H + 1, x - 3 : x + text_width(word) + 1] = STRIPE if i % 2 else WHITE
            draw_text(img, x, top, word, GREY)
            continue
        color = GOOD if score > threshold else BAD
        length = max(2, int(round(min(abs(score), scale) / scale * half)))  # small scores stay visible
        if score > 0:
            img[top : top + CHAR_H, AXIS_X + 1 : AXIS_X + 1 + length] = color
        elif score < 0:
            img[top : top + CHAR_H, AXIS_X - length : AXIS_X] = color
        draw_text(img, VALUE_X, top, _signed(score), color)

    if threshold != 0.0 and abs(threshold) <= scale:
        x = AXIS_X + int(round(threshold / scale * half))
        for y in range(HEAD_H - 4, height - 6, 4):
            img[y : y + 2, x] = GREY
    return img


def write_line_scores(path: Path, examples: list[dict]) -> Path:
    """One PNG: the draw_line_scores panels of `examples` ({"title", "lines", "scores"}, optionally
    "threshold") stacked top to bottom, separated by grey rules."""
    if not examples:
        raise ValueError("write_line_scores needs at least one example ({'title', 'lines', 'scores'})")
    rule = np.full((2, LINES_W, 3), GREY, dtype=np.uint8)
    parts = []
    for i, example in enumerate(examples):
        missing = [key for key in ("title", "lines", "scores") if key not in example]
        if missing:
            raise ValueError(f"example {i} lacks {', '.join(missing)}")
        if parts:
            parts.append(rule)
        parts.append(
            draw_line_scores(
                str(example["title"]),
                list(example["lines"]),
                list(example["scores"]),
                float(example.get("threshold", 0.0)),
            )
        )
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_png(path, np.vstack(parts))
    return path
