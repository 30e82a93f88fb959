"""Pictures: bar charts with intervals, heat maps, overlays on an image grid, before/after grids.

Charts use matplotlib when it is installed (``pip install 'steer-toolkit[plots]'``; the object API on the Agg
canvas, no global pyplot state) and otherwise a plain PIL drawing of the same content, so every picture can be
made with steer's own dependencies. ``STEER_PLOTS=pil`` forces the PIL drawing. Overlays on images and the
composition of panels are PIL in both cases. Every function returns a ``PIL.Image``; the ``save_*`` helpers
write PNG files.
"""

from __future__ import annotations

import io
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw, ImageFont

from steer.errors import EvalInputError

__all__ = [
    "backend",
    "bar_chart",
    "before_after_grid",
    "grid",
    "heatmap",
    "metric_bars",
    "overlay_grid",
    "panels",
    "save",
    "stack",
]

_PALETTE = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75),
            (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207)]  # fmt: skip
_VIRIDIS = [(68, 1, 84), (59, 82, 139), (33, 145, 140), (94, 201, 98), (253, 231, 37)]


def _matplotlib() -> Any | None:
    """``matplotlib.figure`` when matplotlib is installed and not disabled (``STEER_PLOTS=pil``)."""
    if os.environ.get("STEER_PLOTS", "").lower() == "pil":
        return None
    try:
        import matplotlib

        matplotlib.use("Agg", force=False)
        from matplotlib import figure
    except Exception:  # not installed, or a broken install: draw with PIL
        return None
    return figure


def backend() -> str:
    """``"matplotlib"`` or ``"pil"``: what the charts are drawn with."""
    return "matplotlib" if _matplotlib() is not None else "pil"


def _font(size: int = 12) -> Any:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1
        return ImageFont.load_default()


_ASCII = {"↓": "(lower better)", "↑": "(higher better)", "Δ": "delta", "—": "-", "…": "..."}


def _plain(text: str) -> str:
    """``text`` without the symbols PIL's default font cannot draw."""
    for symbol, words in _ASCII.items():
        text = text.replace(symbol, words)
    return text


def _wrap(text: str, width_px: int) -> str:
    """``text`` wrapped to about ``width_px`` pixels of a 9-point title."""
    import textwrap

    return "\n".join(textwrap.wrap(text, max(width_px // 8, 20))) or text


def _text_width(draw: ImageDraw.ImageDraw, text: str, font: Any) -> int:
    left, _, right, _ = draw.textbbox((0, 0), text, font=font)
    return int(right - left)


def _color(value: float) -> tuple[int, int, int]:
    """A viridis-like colour for ``value`` in [0, 1]."""
    value = min(max(float(value), 0.0), 1.0) * (len(_VIRIDIS) - 1)
    i = min(int(value), len(_VIRIDIS) - 2)
    t = value - i
    a, b = _VIRIDIS[i], _VIRIDIS[i + 1]
    return (round(a[0] + t * (b[0] - a[0])), round(a[1] + t * (b[1] - a[1])), round(a[2] + t * (b[2] - a[2])))


def _from_figure(fig: Any) -> Image.Image:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    buffer.seek(0)
    with Image.open(buffer) as image:
        return image.convert("RGB")


def save(image: Image.Image, path: str | Path) -> Path:
    """Write ``image`` as PNG to ``path`` (folders created); return the path."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        image.save(path, format="PNG")
    except OSError as err:
        raise EvalInputError(f"cannot write {path} ({err.strerror or err})") from None
    return path


# --------------------------------------------------------------------------------------------------
# charts
# --------------------------------------------------------------------------------------------------


def bar_chart(
    values: Sequence[float],
    labels: Sequence[str],
    *,
    intervals: Sequence[Sequence[float] | None] | None = None,
    title: str = "",
    ylabel: str = "",
    size: tuple[int, int] = (360, 260),
    colors: Sequence[tuple[int, int, int]] | None = None,
) -> Image.Image:
    """Bars of ``values`` (one per label), with an interval whisker where ``intervals`` gives one."""
    colors = list(colors or [_PALETTE[i % len(_PALETTE)] for i in range(len(values))])
    intervals = list(intervals or [None] * len(values))
    figure = _matplotlib()
    if figure is not None:
        fig = figure.Figure(figsize=(size[0] / 100, size[1] / 100))
        ax = fig.add_subplot()
        xs = list(range(len(values)))
        ax.bar(xs, values, color=[tuple(c / 255 for c in col) for col in colors])
        for x, v, interval in zip(xs, values, intervals):
            if interval:
                ax.errorbar([x], [v], yerr=[[v - interval[0]], [interval[1] - v]], color="black", capsize=4)
        ax.set_xticks(xs)
        ax.set_xticklabels(
            [label[:14] for label in labels], rotation=20 if len(values) > 3 else 0, fontsize=8
        )
        ax.set_title(_wrap(title, size[0]), fontsize=9)
        ax.set_ylabel(ylabel, fontsize=8)
        ax.tick_params(axis="y", labelsize=8)
        fig.tight_layout()
        return _from_figure(fig)
    return _pil_bars(values, labels, intervals, title, size, colors)


def _pil_bars(
    values: Sequence[float],
    labels: Sequence[str],
    intervals: Sequence[Sequence[float] | None],
    title: str,
    size: tuple[int, int],
    colors: Sequence[tuple[int, int, int]],
) -> Image.Image:
    width, height = size
    image = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(image)
    font = _font(11)
    top, bottom, left, right = 24, 36, 44, 8
    draw.text((left, 4), _plain(title), fill="black", font=_font(12))
    highs = [max(v, (iv[1] if iv else v)) for v, iv in zip(values, intervals)] or [1.0]
    lows = [min(v, (iv[0] if iv else v)) for v, iv in zip(values, intervals)] or [0.0]
    hi, lo = max(max(highs), 0.0), min(min(lows), 0.0)
    span = (hi - lo) or 1.0

    def y(v: float) -> float:
        return top + (hi - v) / span * (height - top - bottom)

    draw.line([(left, top), (left, height - bottom)], fill="black")
    draw.line([(left, y(0)), (width - right, y(0))], fill="black")
    for tick in (lo, (lo + hi) / 2, hi):
        draw.text((2, y(tick) - 6), f"{tick:.3g}", fill="black", font=font)
    n = max(len(values), 1)
    slot = (width - left - right) / n
    for i, (v, label, interval) in enumerate(zip(values, labels, intervals)):
        x0, x1 = left + i * slot + slot * 0.15, left + (i + 1) * slot - slot * 0.15
        draw.rectangle([x0, min(y(v), y(0)), x1, max(y(v), y(0))], fill=colors[i % len(colors)])
        if interval:
            xc = (x0 + x1) / 2
            draw.line([(xc, y(interval[0])), (xc, y(interval[1]))], fill="black", width=2)
            for end in interval:
                draw.line([(xc - 5, y(end)), (xc + 5, y(end))], fill="black", width=2)
        short = _plain(label)[:12]
        draw.text(
            ((x0 + x1) / 2 - _text_width(draw, short, font) / 2, height - bottom + 4),
            short,
            fill="black",
            font=font,
        )
    return image


def heatmap(
    matrix: Sequence[Sequence[float]],
    *,
    row_labels: Sequence[str],
    col_labels: Sequence[str],
    marks: set[tuple[int, int]] | None = None,
    title: str = "",
    size: tuple[int, int] = (420, 320),
) -> Image.Image:
    """A heat map of ``matrix`` (rows x columns); cells in ``marks`` get a white dot."""
    marks = marks or set()
    rows, cols = len(matrix), max((len(r) for r in matrix), default=0)
    figure = _matplotlib()
    if figure is not None and rows and cols:
        fig = figure.Figure(figsize=(size[0] / 100, size[1] / 100))
        ax = fig.add_subplot()
        im = ax.imshow([list(r) for r in matrix], aspect="auto", cmap="viridis")
        for r, c in marks:
            ax.plot([c], [r], marker="o", color="white", markersize=4)
        ax.set_yticks(range(rows))
        ax.set_yticklabels(row_labels, fontsize=7)
        ax.set_xticks(range(cols))
        ax.set_xticklabels(col_labels, fontsize=7)
        ax.set_title(_wrap(title, size[0]), fontsize=9)
        fig.colorbar(im, ax=ax)
        fig.tight_layout()
        return _from_figure(fig)
    image = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(image)
    font = _font(10)
    draw.text((4, 4), _plain(title), fill="black", font=_font(12))
    if not rows or not cols:
        return image
    left, top = 40, 24
    cw, ch = (size[0] - left - 4) / cols, (size[1] - top - 18) / rows
    flat = [v for r in matrix for v in r]
    lo, hi = min(flat), max(flat)
    for r, row in enumerate(matrix):
        draw.text((2, top + r * ch + ch / 2 - 5), str(row_labels[r])[:6], fill="black", font=font)
        for c, v in enumerate(row):
            x0, y0 = left + c * cw, top + r * ch
            draw.rectangle([x0, y0, x0 + cw - 1, y0 + ch - 1], fill=_color((v - lo) / ((hi - lo) or 1)))
            if (r, c) in marks:
                radius = max(min(cw, ch) / 5, 1.5)
                draw.ellipse(
                    [x0 + cw / 2 - radius, y0 + ch / 2 - radius, x0 + cw / 2 + radius, y0 + ch / 2 + radius],
                    fill="white",
                )
    for c in range(cols):
        if cols <= 32 or c % max(cols // 16, 1) == 0:
            draw.text((left + c * cw + 1, size[1] - 16), str(col_labels[c]), fill="black", font=font)
    return image


# --------------------------------------------------------------------------------------------------
# images
# --------------------------------------------------------------------------------------------------


def overlay_grid(
    image: Image.Image,
    values: Sequence[Sequence[float | None]],
    *,
    title: str = "",
    labels: Sequence[Sequence[str]] | None = None,
    alpha: float = 0.55,
    size: int = 320,
    dim: Sequence[Sequence[bool]] | None = None,
) -> Image.Image:
    """``image`` (resized to ``size`` px wide) with a ``rows x cols`` grid over it: each cell coloured by its
    value (``None``: left clear), optionally darkened (``dim``) and labelled (``labels``)."""
    rows, cols = len(values), max((len(r) for r in values), default=1)
    base = image.convert("RGB").resize((size, max(round(size * image.height / image.width), 1)))
    layer = Image.new("RGBA", base.size, (0, 0, 0, 0))
    draw = ImageDraw.Draw(layer)
    cw, ch = base.width / cols, base.height / max(rows, 1)
    flat = [v for r in values for v in r if v is not None]
    lo, hi = (min(flat), max(flat)) if flat else (0.0, 1.0)
    font = _font(max(min(int(ch / 2.2), 14), 7))
    for r, row in enumerate(values):
        for c, v in enumerate(row):
            box = [c * cw, r * ch, (c + 1) * cw - 1, (r + 1) * ch - 1]
            if dim is not None and dim[r][c]:
                draw.rectangle(box, fill=(0, 0, 0, 190))
            elif v is not None:
                draw.rectangle(box, fill=(*_color((v - lo) / ((hi - lo) or 1)), round(255 * alpha)))
            draw.rectangle(box, outline=(255, 255, 255, 90))
            if labels is not None and labels[r][c]:
                text = labels[r][c]
                draw.text((box[0] + 2, box[1] + 1), text, fill=(255, 255, 255, 255), font=font)
    out = Image.alpha_composite(base.convert("RGBA"), layer).convert("RGB")
    return panels([out], title) if title else out


def panels(
    images: Sequence[Image.Image], title: str = "", *, columns: int | None = None, pad: int = 8
) -> Image.Image:
    """``images`` side by side (``columns`` per row; default all in one row) under a ``title``."""
    if not images:
        raise ValueError("panels needs at least one image")
    columns = columns or len(images)
    rows = math.ceil(len(images) / columns)
    cell_w = max(im.width for im in images)
    cell_h = max(im.height for im in images)
    head = 26 if title else 0
    canvas = Image.new(
        "RGB", (columns * cell_w + (columns + 1) * pad, head + rows * cell_h + (rows + 1) * pad), "white"
    )
    draw = ImageDraw.Draw(canvas)
    if title:
        draw.text((pad, 6), _plain(title), fill="black", font=_font(14))
    for i, im in enumerate(images):
        r, c = divmod(i, columns)
        canvas.paste(im, (pad + c * (cell_w + pad), head + pad + r * (cell_h + pad)))
    return canvas


def stack(images: Sequence[Image.Image], *, pad: int = 4) -> Image.Image:
    """``images`` one under the other, each at its own height, left aligned."""
    if not images:
        raise ValueError("stack needs at least one image")
    width = max(im.width for im in images)
    canvas = Image.new("RGB", (width, sum(im.height for im in images) + pad * (len(images) - 1)), "white")
    y = 0
    for im in images:
        canvas.paste(im, (0, y))
        y += im.height + pad
    return canvas


def grid(images: Sequence[Image.Image], *, columns: int, title: str = "") -> Image.Image:
    """``images`` in rows of ``columns``."""
    return panels(images, title, columns=columns)


def before_after_grid(
    prompt: str, before: Sequence[Image.Image], after: Sequence[Image.Image]
) -> Image.Image:
    """One picture per prompt: the stock pipeline's images (top row) above the steered ones (bottom row)."""
    if not before or len(before) != len(after):
        raise ValueError("before_after_grid needs as many steered images as stock images (at least one)")
    side = min(max(max(im.width for im in before), 160), 384)  # small images shown larger, pixel for pixel
    scale = [
        im.convert("RGB").resize((side, round(side * im.height / im.width)), Image.Resampling.NEAREST)
        for im in [*before, *after]
    ]
    labelled = []
    for i, im in enumerate(scale):
        canvas = Image.new("RGB", (im.width, im.height + 18), "white")
        canvas.paste(im, (0, 18))
        ImageDraw.Draw(canvas).text(
            (2, 2),
            ("before" if i < len(before) else "after") + f" {i % len(before)}",
            fill="black",
            font=_font(12),
        )
        labelled.append(canvas)
    return panels(labelled, prompt[:90], columns=len(before))


def metric_bars(data: Mapping[str, Any], path: str | Path) -> Path:
    """A bar chart per metric of a `steer.evals.compare.compare_data` result (one bar per run, whisker =
    its 95% interval), written to ``path`` (PNG)."""
    runs = data["runs"]
    labels = [f"{r['index']} {r['method']}" for r in runs]
    charts = []
    for name in data["metrics"]:
        values = [r["metrics"].get(name) for r in runs]
        shown = [(v if v is not None else 0.0) for v in values]
        intervals = [r["intervals"].get(name) for r in runs]
        arrow = data["directions"].get(name, "")
        charts.append(bar_chart(shown, labels, intervals=intervals, title=f"{name} {arrow}".strip()))
    columns = min(3, len(charts))
    title = f"steer eval compare: {data['task']} (bars: runs, whiskers: 95% bootstrap intervals)"
    return save(panels(charts, title, columns=columns), path)
