"""`psgpo plot RUN_DIR`: learning curves from RUN_DIR/metrics.jsonl as one PNG, with no plotting library.

Each numeric metric gets a panel (title, min/max of y, first/last step on x, the curve, a zero line when
0 is in range). Pixels are drawn with numpy and written as an RGB PNG with zlib; text uses a 3x5 bitmap
font (upper case, digits, a little punctuation), so the figures need nothing beyond the base install.
"""

from __future__ import annotations

import json
import math
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from services.common.errors import UserError

# 3x5 glyphs, five rows of three pixels, top to bottom ('#' = ink). Lower case is drawn as upper case.
_GLYPHS = r"""
A .#. #.# ### #.# #.#   B ##. #.# ##. #.# ##.   C .## #.. #.. #.. .##   D ##. #.# #.# #.# ##.
E ### #.. ##. #.. ###   F ### #.. ##. #.. #..   G .## #.. #.# #.# .##   H #.# #.# ### #.# #.#
I ### .#. .#. .#. ###   J ..# ..# ..# #.# .#.   K #.# #.# ##. #.# #.#   L #.. #.. #.. #.. ###
M #.# ### ### #.# #.#   N ##. #.# #.# #.# #.#   O .#. #.# #.# #.# .#.   P ##. #.# ##. #.. #..
Q .#. #.# #.# ##. .##   R ##. #.# ##. #.# #.#   S .## #.. .#. ..# ##.   T ### .#. .#. .#. .#.
U #.# #.# #.# #.# ###   V #.# #.# #.# #.# .#.   W #.# #.# ### ### #.#   X #.# #.# .#. #.# #.#
Y #.# #.# .#. .#. .#.   Z ### ..# .#. #.. ###   0 ### #.# #.# #.# ###   1 .#. ##. .#. .#. ###
2 ##. ..# .#. #.. ###   3 ##. ..# .#. ..# ##.   4 #.# #.# ### ..# ..#   5 ### #.. ##. ..# ##.
6 .## #.. ### #.# ###   7 ### ..# .#. .#. .#.   8 ### #.# ### #.# ###   9 ### #.# ### ..# ##.
. ... ... ... ... .#.   - ... ... ### ... ...   _ ... ... ... ... ###   / ..# ..# .#. #.. #..
: ... .#. ... .#. ...   + ... .#. ### .#. ...   ( .#. #.. #.. #.. .#.   ) .#. ..# ..# ..# .#.
= ... ### ... ### ...   % #.# ..# .#. #.. #.#   , ... ... ... .#. #..   ? ##. ..# .#. ... .#.
[ ##. #.. #.. #.. ##.   ] .## ..# ..# ..# .##   * ... #.# .#. #.# ...   < ..# .#. #.. .#. ..#
> #.. .#. ..# .#. #..   ' .#. .#. ... ... ...   " #.# #.# ... ... ...   ! .#. .#. .#. ... .#.
# #.# ### #.# ### #.#   { .## .#. ##. .#. .##   } ##. .#. .## .#. ##.   & .#. #.# .#. #.# .##
| .#. .#. .#. .#. .#.   ~ ... ... .## ##. ...   ^ .#. #.# ... ... ...   ; ... .#. ... .#. #..
@ .#. #.# ### #.. .##   \ #.. #.. .#. ..# ..#   $ .## ##. .#. .## ##.   ` #.. .#. ... ... ...
"""
_TOKENS = _GLYPHS.split()
FONT = {_TOKENS[i]: "".join(_TOKENS[i + 1 : i + 6]) for i in range(0, len(_TOKENS), 6)}
FONT[" "] = "." * 15

WHITE, BLACK, GREY, LIGHT, BLUE = (
    (255, 255, 255),
    (30, 30, 30),
    (150, 150, 150),
    (225, 225, 225),
    (31, 90, 180),
)
PANEL_W, PANEL_H = 360, 220
LEFT, RIGHT, TOP, BOTTOM = 64, 12, 26, 26
SCALE = 2  # font pixels per glyph pixel


def draw_text(img: np.ndarray, x: int, y: int, text: str, color: tuple[int, int, int] = BLACK) -> None:
    """Text with its top-left corner at (x, y); characters outside the font are drawn as '?'."""
    h, w = img.shape[:2]
    for i, char in enumerate(text.upper()):
        glyph = FONT.get(char, FONT["?"])
        for row in range(5):
            for col in range(3):
                if glyph[row * 3 + col] != "#":
                    continue
                x0, y0 = x + (i * 4 + col) * SCALE, y + row * SCALE
                if 0 <= x0 and x0 + SCALE <= w and 0 <= y0 and y0 + SCALE <= h:
                    img[y0 : y0 + SCALE, x0 : x0 + SCALE] = color


def text_width(text: str) -> int:
    return len(text) * 4 * SCALE


def draw_line(
    img: np.ndarray, x0: float, y0: float, x1: float, y1: float, color: tuple[int, int, int]
) -> None:
    """A 2-pixel line, sampled at every pixel step along its longer axis."""
    n = int(max(abs(x1 - x0), abs(y1 - y0))) + 1
    xs = np.rint(np.linspace(x0, x1, n + 1)).astype(int)
    ys = np.rint(np.linspace(y0, y1, n + 1)).astype(int)
    h, w = img.shape[:2]
    for dx, dy in ((0, 0), (1, 0), (0, 1)):
        ok = (xs + dx >= 0) & (xs + dx < w) & (ys + dy >= 0) & (ys + dy < h)
        img[ys[ok] + dy, xs[ok] + dx] = color


def _fmt(value: float, digits: int = 3) -> str:
    return f"{value:.{digits}g}".replace("e+0", "e").replace("e-0", "e-")


def _labels(low: float, high: float) -> tuple[str, str]:
    """The shortest labels (3 to 8 significant digits) that tell the two ends apart."""
    digits = 3
    while digits < 8 and _fmt(low, digits) == _fmt(high, digits):
        digits += 1
    return _fmt(low, digits), _fmt(high, digits)


@dataclass(frozen=True)
class Axes:
    """A plot box in pixels (y_lo is the bottom row) and the data range it shows."""

    x_lo: int
    x_hi: int
    y_lo: int
    y_hi: int
    s_min: float
    s_max: float
    v_min: float
    v_max: float

    def px(self, s: float) -> float:
        return self.x_lo + (s - self.s_min) / (self.s_max - self.s_min) * (self.x_hi - self.x_lo)

    def py(self, v: float) -> float:
        return self.y_lo - (v - self.v_min) / (self.v_max - self.v_min) * (self.y_lo - self.y_hi)


def fit_axes(box: tuple[int, int, int, int], xs: list[float], ys: list[float]) -> Axes:
    """Axes over (x_lo, x_hi, y_lo, y_hi) showing the range of xs and ys (non-empty), widened when flat."""
    s_min, s_max, v_min, v_max = min(xs), max(xs), min(ys), max(ys)
    if v_max == v_min:
        pad = abs(v_min) * 0.1 or 1.0
        v_min, v_max = v_min - pad, v_max + pad
    if s_max == s_min:
        s_min, s_max = s_min - 1, s_max + 1
    return Axes(*box, s_min, s_max, v_min, v_max)


def draw_axis_labels(img: np.ndarray, axes: Axes) -> None:
    """A light zero line when 0 is in range, min/max labels left of the y axis, first/last x below."""
    if axes.v_min < 0 < axes.v_max:
        img[int(round(axes.py(0.0))), axes.x_lo + 1 : axes.x_hi] = LIGHT
    low_label, high_label = _labels(axes.v_min, axes.v_max)
    for label, v in ((high_label, axes.v_max), (low_label, axes.v_min)):
        draw_text(img, max(0, axes.x_lo - 4 - text_width(label)), int(axes.py(v)) - 5, label)
    draw_text(img, axes.x_lo, axes.y_lo + 8, _fmt(axes.s_min))
    last = _fmt(axes.s_max)
    draw_text(img, axes.x_hi - text_width(last), axes.y_lo + 8, last)


def draw_panel(title: str, steps: list[float], values: list[float]) -> np.ndarray:
    img = np.full((PANEL_H, PANEL_W, 3), WHITE, dtype=np.uint8)
    draw_text(img, LEFT, 6, title[: (PANEL_W - LEFT) // (4 * SCALE)])
    x_lo, x_hi = LEFT, PANEL_W - RIGHT
    y_lo, y_hi = PANEL_H - BOTTOM, TOP
    points = [(s, v) for s, v in zip(steps, values, strict=True) if math.isfinite(v)]
    for x in (x_lo, x_hi):
        img[y_hi : y_lo + 1, x] = GREY
    for y in (y_lo, y_hi):
        img[y, x_lo : x_hi + 1] = GREY
    if not points:
        draw_text(img, LEFT + 8, (TOP + PANEL_H - BOTTOM) // 2, "NO FINITE VALUES", GREY)
        return img
    axes = fit_axes((x_lo, x_hi, y_lo, y_hi), [p[0] for p in points], [p[1] for p in points])
    px, py = axes.px, axes.py
    draw_axis_labels(img, axes)
    previous: tuple[float, float] | None = None
    for s, v in points:
        x, y = px(s), py(v)
        if previous is not None:
            draw_line(img, previous[0], previous[1], x, y, BLUE)
        if len(points) <= 40:
            xi, yi = int(round(x)), int(round(y))
            img[max(0, yi - 2) : yi + 3, max(0, xi - 2) : xi + 3] = BLUE
        previous = (x, y)
    return img


def write_png(path: Path, img: np.ndarray) -> None:
    """An 8-bit RGB PNG (filter 0 on every row, one zlib stream)."""
    height, width = img.shape[:2]
    raw = b"".join(b"\x00" + img[row].tobytes() for row in range(height))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data))
            + kind
            + data
            + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
        )

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    png = (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(raw, 6))
        + chunk(b"IEND", b"")
    )
    path.write_bytes(png)


def read_metrics(path: Path) -> tuple[list[float], dict[str, list[float]]]:
    """(steps, {metric: values aligned with steps, NaN where a line lacks it}) of numeric metrics."""
    rows = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise UserError(f"{path}:{number}: not JSON: {exc}") from None
    rows = [row for row in rows if isinstance(row.get("step"), int | float)]
    names: list[str] = []
    for row in rows:
        for key, value in row.items():
            numeric = isinstance(value, int | float) and not isinstance(value, bool)
            if key not in ("step", "time") and numeric and key not in names:
                names.append(key)
    steps = [float(row["step"]) for row in rows]
    series = {
        name: [float(v) if isinstance(v := row.get(name), int | float) else math.nan for row in rows]
        for name in names
    }
    return steps, series


def plot_run(run_dir: Path, out: Path | None = None, keys: list[str] | None = None, columns: int = 3) -> Path:
    """Write the panels of RUN_DIR/metrics.jsonl into one PNG (default RUN_DIR/curves.png)."""
    metrics = Path(run_dir) / "metrics.jsonl"
    if not metrics.is_file():
        raise UserError(f"{metrics} does not exist (a psgpo train ppo|sft output dir has one)")
    steps, series = read_metrics(metrics)
    if not steps:
        raise UserError(f"{metrics} holds no steps yet")
    if keys:
        unknown = [k for k in keys if k not in series]
        if unknown:
            raise UserError(f"no metric named {', '.join(unknown)} in {metrics}; have: {', '.join(series)}")
        series = {k: series[k] for k in keys}
    names = list(series)
    rows = math.ceil(len(names) / columns)
    canvas = np.full((rows * PANEL_H, columns * PANEL_W, 3), WHITE, dtype=np.uint8)
    for i, name in enumerate(names):
        r, c = divmod(i, columns)
        canvas[r * PANEL_H : (r + 1) * PANEL_H, c * PANEL_W : (c + 1) * PANEL_W] = draw_panel(
            name, steps, series[name]
        )
    path = Path(out) if out is not None else Path(run_dir) / "curves.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    write_png(path, canvas)
    return path
