"""Save recorded per-token attention maps as an image grid (rows: images, columns: concepts).

    h = steer.apply(pipe, "astar", tokens=["cat", "dog"])
    h.pipe("a cat and a dog", num_inference_steps=50)
    h.save_attention_maps("maps.png")                   # the last updated step
    save_attention_grid(h.state["astar"]["maps"][10], "step10.png", labels=[["cat", "dog"]])

Each map is min–max normalised on its own and coloured with matplotlib's colormap when matplotlib is installed
(``cmap``, default ``"viridis"``), else drawn in grey; cells are upscaled with nearest neighbours to ``cell``
pixels. Only PIL is required.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, Union

import numpy as np
import torch
from PIL import Image, ImageDraw

MapsLike = Union[torch.Tensor, Sequence[torch.Tensor]]


def _rows(maps: MapsLike) -> list[list[np.ndarray]]:
    """[K, h, w] (one image), [B, K, h, w], or a list (per image) of [K, h, w] → rows of 2-D arrays."""
    if isinstance(maps, torch.Tensor):
        if maps.dim() == 2:
            maps = maps[None, None]
        elif maps.dim() == 3:
            maps = maps[None]
        if maps.dim() != 4:
            raise ValueError(f"maps must be [K, h, w] or [B, K, h, w], got shape {tuple(maps.shape)}")
        items: Sequence[torch.Tensor] = list(maps)
    else:
        items = list(maps)
    return [[m.detach().float().cpu().numpy() for m in image] for image in items]


def _colorize(a: np.ndarray, cmap: str | None) -> np.ndarray:
    lo, hi = float(a.min()), float(a.max())
    norm = (a - lo) / (hi - lo) if hi > lo else np.zeros_like(a)
    if cmap:
        try:
            from matplotlib import colormaps

            return (colormaps[cmap](norm)[..., :3] * 255).astype(np.uint8)
        except ImportError:
            pass
    grey = (norm * 255).astype(np.uint8)
    return np.stack([grey] * 3, axis=-1)


def attention_grid(
    maps: MapsLike,
    labels: Sequence[Sequence[str]] | Sequence[str] | None = None,
    cell: int = 128,
    cmap: str | None = "viridis",
    pad: int = 4,
) -> Image.Image:
    """The grid as a PIL image (white background, one labelled cell per map)."""
    rows = _rows(maps)
    if labels is not None and labels and isinstance(labels[0], str):
        labels = [[str(x) for x in labels]] * len(rows)
    n_cols = max(len(r) for r in rows)
    text_h = 14 if labels is not None else 0
    width = n_cols * (cell + pad) + pad
    height = len(rows) * (cell + text_h + pad) + pad
    canvas = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(canvas)
    for r, row in enumerate(rows):
        for c, a in enumerate(row):
            h, w = a.shape
            scale = cell / max(h, w)
            tile = Image.fromarray(_colorize(a, cmap)).resize(
                (max(1, round(w * scale)), max(1, round(h * scale))), Image.Resampling.NEAREST
            )
            x = pad + c * (cell + pad)
            y = pad + r * (cell + text_h + pad)
            if labels is not None and r < len(labels) and c < len(labels[r]):
                draw.text((x, y), str(labels[r][c])[: max(4, cell // 7)], fill="black")
            canvas.paste(tile, (x, y + text_h))
    return canvas


def save_attention_grid(
    maps: MapsLike,
    path: str | Path,
    labels: Sequence[Sequence[str]] | Sequence[str] | None = None,
    **kwargs: Any,
) -> Path:
    """Write :func:`attention_grid` to ``path`` (format from the suffix, e.g. ``.png``) and return the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    attention_grid(maps, labels=labels, **kwargs).save(path)
    return path


__all__ = ["attention_grid", "save_attention_grid"]
