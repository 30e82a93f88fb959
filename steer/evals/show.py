"""``steer show``: one picture of what a method did on one input, drawn from ``Steering.state`` only.

    steer show --model builtin:demo --image scene.png --method fastervlm --out fastervlm.png
    from steer.evals.show import show
    shown = show("builtin:demo", "scene.png", "vhr")          # shown.picture (PIL), shown.state, shown.answers

:func:`show` loads the model, asks the CHAIR prompt about the image without and with the method (greedy, a few
tokens), keeps the method's ``Steering.state`` and draws it with :func:`draw`; :func:`draw` alone turns a state
that a caller already has (``handle.state[name]``) into the picture. What each method's state shows:

* ``fastervlm``: the kept visual tokens over the image (pruned tokens darkened), ``T`` of ``N``;
* ``vhr``: the vision-aware head divergence per layer and head, the chosen heads marked;
* ``cca``: the concentric position ids over the image grid (each cell: its id relative to the block's first);
* ``vista``: the steering vector's norm per layer;
* ``var``: the visual sink tokens over the image grid (in how many layers each token is a sink) and the rows
  whose attention was redistributed per layer;
* ``var`` and ``image_attention``: the attention of the prompt's last row over the image grid, before and after
  (mean over layers and heads; collected by :func:`show` with a ``Collect`` of ``layer.attn.probs.edited``, the
  probabilities each layer's output is made of: steer's own edit, no extra model code).

Only what the state holds is drawn; the image grid is found from the prompt's image tokens (the first
``(image_size / patch_size)^2`` of them for CLIP towers: LLaVA's grid, LLaVA-NeXT's base image) or from the
state's own grid (Qwen).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw

from steer.errors import EvalInputError
from steer.evals import plots

__all__ = ["ATTENTION_DRAWN", "DRAWN", "Shown", "draw", "image_attention_row", "show"]

DRAWN = ("fastervlm", "vhr", "cca", "vista", "var", "image_attention")
"""The methods whose state :func:`draw` can picture."""

ATTENTION_DRAWN = ("var", "image_attention")
"""The methods pictured by the last row's attention over the image, before and after."""


def image_attention_row(model: Any, inputs: Mapping[str, Any], positions: Sequence[int], method: Any = None) -> list[float]:
    """The prompt's last row's attention to each of ``positions`` (prefill, mean over layers and heads), with
    ``method`` (``{name: params}``, as `steer.apply` takes it) applied, or on the plain model. Read with a ``Collect`` of
    ``layer.attn.probs.edited`` (the probabilities each layer's output is made of)."""
    import torch

    import steer  # the public API only (steer.edits through it: the evals import downwards)

    rows: list[Any] = []

    def keep(probs: Any, ectx: Any) -> None:
        rows.append(probs[0, :, -1].float().mean(0))  # one prompt, left-padded: its last column
        return None

    collect = steer.edits.Collect(name="show", site="layer.attn.probs.edited", phase="prefill", fn=keep)
    handles = [steer.apply(model, method)] if method else []
    try:
        handles.append(steer.apply(model, [collect]))
        with torch.no_grad():
            model(**inputs)
    finally:
        for handle in reversed(handles):
            handle.remove()
    if not rows:
        raise EvalInputError("no attention rows were collected (does the model run steer's attention function?)")
    mean = torch.stack(rows).mean(0)
    return [float(mean[p]) for p in positions]


@dataclass
class Shown:
    """What :func:`show` made: the ``picture``, the method's ``state``, the ``answers`` without and with the
    method, and the ``path`` it was written to (when asked)."""

    method: str
    picture: Image.Image
    state: dict[str, Any]
    answers: dict[str, str] = field(default_factory=dict)
    path: Path | None = None


def _values(x: Any) -> list[Any]:
    """A tensor, array or sequence as a plain list."""
    if hasattr(x, "tolist"):
        out = x.tolist()
        return out if isinstance(out, list) else [out]
    return list(x)


def _square(n: int) -> tuple[int, int]:
    side = math.isqrt(n)
    if side * side == n:
        return side, side
    for h in range(side, 0, -1):
        if n % h == 0:
            return h, n // h
    return 1, n


def _cells(grid: tuple[int, int], fill: Any = None) -> list[list[Any]]:
    return [[fill] * grid[1] for _ in range(grid[0])]


def _text_panel(lines: Sequence[str], width: int = 640) -> Image.Image:
    import textwrap

    wrapped = [
        part for line in lines for part in textwrap.wrap(plots._plain(line), max(width // 7, 40)) or [""]
    ]
    panel = Image.new("RGB", (width, 16 * len(wrapped) + 8), "white")
    draw = ImageDraw.Draw(panel)
    for i, line in enumerate(wrapped):
        draw.text((6, 4 + 16 * i), line, fill="black", font=plots._font(12))
    return panel


def _fastervlm(state: Mapping[str, Any], image: Image.Image) -> list[Image.Image]:
    samples = state.get("samples") or []
    if not samples or not samples[0]:
        raise EvalInputError("fastervlm: the state holds no pruned image (did the prompt have one?)")
    record = samples[0][0]
    if "crops" in record:  # LLaVA-NeXT: the base crop
        record = record["crops"][0]
    n, kept = int(record["N"]), {int(k) for k in _values(record["kept"])}
    meta = record.get("grid")
    if isinstance(meta, (list, tuple)) and len(meta) == 3:
        grid = (int(meta[1]), int(meta[2]))
        if grid[0] * grid[1] != n:
            grid = _square(n)
    else:
        grid = _square(n)
    values = _cells(grid, 1.0)
    dim = [[(r * grid[1] + c) not in kept for c in range(grid[1])] for r in range(grid[0])]
    title = f"kept {len(kept)} of {n} visual tokens (dark: pruned)"
    return [plots.overlay_grid(image, [[None] * grid[1] for _ in values], dim=dim, title=title)]


def _vhr(state: Mapping[str, Any], image: Image.Image) -> list[Image.Image]:
    heads, vhd = (state.get("heads") or [None])[0], (state.get("vhd") or [None])[0]
    if not heads or not vhd:
        raise EvalInputError("vhr: the state holds no head selection (no prefill with the method on)")
    layers = sorted(int(k) for k in vhd)
    matrix = [[float(v) for v in vhd[layer]] for layer in layers]
    marks = {(r, int(h)) for r, layer in enumerate(layers) for h in heads.get(layer, [])}
    n_heads = max(len(row) for row in matrix)
    chosen = sum(len(heads.get(layer, [])) for layer in layers)
    heat = plots.heatmap(
        matrix,
        row_labels=[f"L{layer}" for layer in layers],
        col_labels=[str(h) for h in range(n_heads)],
        marks=marks,
        title=f"VHD per layer x head; dots: the {chosen} chosen heads (alpha {state.get('alpha')})",
        size=(max(360, 40 + 22 * n_heads), max(240, 40 + 18 * len(layers))),
    )
    return [plots.overlay_grid(image, [[None]], title="input"), heat]


def _cca(state: Mapping[str, Any], image: Image.Image) -> list[Image.Image]:
    samples = state.get("samples") or []
    if not samples:
        raise EvalInputError("cca: the state holds no image block (did the prompt have an image?)")
    sample = samples[0]
    block = sample["blocks"][0]
    h, w = (int(x) for x in block["grid"])
    ids = sample.get("position_ids")
    if ids is None:
        labels = _cells((h, w), "")
        values = _cells((h, w), None)
        title = f"{state.get('variant')}: stock positions (the state holds the ring mask only)"
    else:
        flat = _values(ids)
        if flat and isinstance(flat[0], list):  # M-RoPE [3, T]: the temporal row carries the rings (ring_t)
            flat = flat[0]
        start, tokens = int(block["start"]), int(block["tokens"])
        span = [int(v) for v in flat[start : start + tokens]]
        if len(span) < h * w:
            raise EvalInputError("cca: the state's position ids do not cover the image block")
        base = min(span)
        values = [[float(span[r * w + c]) for c in range(w)] for r in range(h)]
        labels = [[str(span[r * w + c] - base) for c in range(w)] for r in range(h)]
        title = f"{state.get('variant')}: concentric position ids (minus {base}), {block['R']} rings"
    return [plots.overlay_grid(image, values, labels=labels, title=title)]


def _vista(state: Mapping[str, Any], image: Image.Image) -> list[Image.Image]:
    norms = state.get("norms")
    if norms is None:
        raise EvalInputError("vista: the state holds no steering vector (VSV off, or no prefill)")
    row = _values(norms[0]) if hasattr(norms, "__getitem__") else []
    chart = plots.bar_chart(
        [float(v) for v in row],
        [str(i) for i in range(len(row))],
        title=f"steering vector norm per layer (lam {state.get('lam')}, mode {state.get('mode')})",
        size=(max(360, 40 + 26 * len(row)), 280),
        colors=[(31, 119, 180)] * len(row),
    )
    return [plots.overlay_grid(image, [[None]], title="input"), chart]


def _var(
    state: Mapping[str, Any], image: Image.Image, image_positions: Sequence[int], grid: tuple[int, int]
) -> list[Image.Image]:
    samples = state.get("samples") or []
    if not samples or not samples[0]:
        raise EvalInputError("var: the state holds no sink detection (no prefill with the method on)")
    sample = samples[0]
    index = {pos: i for i, pos in enumerate(image_positions[: grid[0] * grid[1]])}
    counts = _cells(grid, 0.0)
    for entry in sample.values():
        for pos in entry.get("visual_sinks", []):
            if pos in index:
                r, c = divmod(index[pos], grid[1])
                counts[r][c] += 1
    layers = sorted(sample)
    selected = [float(sum(_values(sample[layer]["selected_rows"]))) for layer in layers]
    labels = [[str(int(v)) if v else "" for v in row] for row in counts]
    over = plots.overlay_grid(
        image,
        [[v or None for v in row] for row in counts],
        labels=labels,
        title="visual sinks: layers per token",
    )
    chart = plots.bar_chart(
        selected,
        [str(layer) for layer in layers],
        title="rows redistributed per layer (summed over heads)",
        size=(max(360, 40 + 26 * len(layers)), 280),
        colors=[(214, 39, 40)] * len(layers),
    )
    return [over, chart]


def _attention(
    attention: tuple[Sequence[float], Sequence[float]], image: Image.Image, grid: tuple[int, int]
) -> list[Image.Image]:
    """The last row's attention over the image grid, before and after, on one colour scale."""
    cells = grid[0] * grid[1]
    before, after = (list(a)[:cells] for a in attention)
    if len(before) < cells or len(after) < cells:
        raise EvalInputError("the attention rows do not cover the image grid")
    top = max(max(before), max(after)) or 1.0
    parts = []
    for name, row in (("before", before), ("after", after)):
        values = [[row[r * grid[1] + c] / top for c in range(grid[1])] for r in range(grid[0])]
        title = f"last row -> image, {name}: mass {sum(row):.3f}"
        parts.append(plots.overlay_grid(image, values, title=title))
    return parts


def draw(
    method: str,
    state: Mapping[str, Any],
    image: Image.Image,
    *,
    image_positions: Sequence[int] = (),
    grid: tuple[int, int] | None = None,
    notes: Sequence[str] = (),
    attention: tuple[Sequence[float], Sequence[float]] | None = None,
) -> Image.Image:
    """The picture of ``state`` (``Steering.state[method]``) over ``image``. VAR also needs the sequence
    positions of the image tokens (``image_positions``) and their ``grid`` (rows, columns). ``attention``:
    the last prompt row's attention to each image token without and with the method (``var``,
    ``image_attention``; :func:`show` collects it).

    Raises:
        EvalInputError: a method whose state has nothing to draw, or a state without the call's data.
    """
    if method == "fastervlm":
        parts = _fastervlm(state, image)
    elif method == "vhr":
        parts = _vhr(state, image)
    elif method == "cca":
        parts = _cca(state, image)
    elif method == "vista":
        parts = _vista(state, image)
    elif method == "var":
        parts = _var(state, image, image_positions, grid or _square(len(image_positions) or 1))
    elif method == "image_attention":
        parts = []
    else:
        raise EvalInputError(f"{method}: no picture for this method (steer show draws {', '.join(DRAWN)})")
    if method in ATTENTION_DRAWN:
        if attention is None:
            raise EvalInputError(f"{method}: draw needs the attention rows without and with the method (show collects them)")
        parts += _attention(attention, image, grid or _square(len(attention[0]) or 1))
    picture = plots.panels(parts, f"steer show: {method}")
    if notes:
        picture = plots.stack([picture, _text_panel(notes, max(picture.width, 640))])
    return picture


def _grid(model: Any, n_image_tokens: int) -> tuple[int, int]:
    """The base image grid: ``(image_size / patch_size)`` squared for CLIP-style towers, else the square
    nearest to the number of image tokens."""
    vision = getattr(model.config, "vision_config", None)
    size, patch = getattr(vision, "image_size", None), getattr(vision, "patch_size", None)
    if isinstance(size, int) and isinstance(patch, int) and patch and (size // patch) ** 2 <= n_image_tokens:
        return size // patch, size // patch
    return _square(n_image_tokens)


def show(
    model: str | Any,
    image: str | Path | Image.Image,
    method: str,
    *,
    params: Mapping[str, Any] | None = None,
    prompt: str | None = None,
    out: str | Path | None = None,
    max_new_tokens: int = 16,
) -> Shown:
    """Run ``method`` on one image and draw its ``Steering.state`` (see the module docstring).

    ``model``: a model folder, hub id or ``builtin:demo`` (loaded as ``steer eval`` loads it), or an already
    loaded `steer.evals.loading.LoadedModel`. ``params``: the method's parameters. ``prompt``: the user text
    (default: the CHAIR prompt). ``out``: where to write the PNG.
    """
    import steer
    from steer.evals import builtin, generation
    from steer.evals.loading import LoadedModel, load_model
    from steer.evals.prompts import build_prompt, resolve_template
    from steer.protocols import CHAIR_PROMPT

    if method not in DRAWN:
        draw(method, {}, Image.new("RGB", (1, 1)))  # raises the explanation
    loaded = model if isinstance(model, LoadedModel) else load_model(str(model))
    if isinstance(image, Image.Image):
        picture_in, name = image.convert("RGB"), "image"
    else:
        path = Path(image)
        if not path.is_file():
            raise EvalInputError(f"--image: file not found: {path}")
        try:
            picture_in = generation.open_image(path)
        except Exception as err:
            raise EvalInputError(f"--image: cannot read {path} ({type(err).__name__}: {err})") from None
        name = path.name
    template = "plain" if isinstance(model, str) and builtin.is_builtin(model) else "auto"
    template = resolve_template(template, loaded.model_type, loaded.processor)
    text = build_prompt(prompt or CHAIR_PROMPT, template, loaded.model_type, loaded.processor)
    settings = {"max_new_tokens": max_new_tokens, "do_sample": False, "num_beams": 1}
    before = generation.generate_batch(loaded, [text], [picture_in], settings)[0][0]
    handle = steer.apply(loaded.model, method, **dict(params or {}))
    try:
        after = generation.generate_batch(loaded, [text], [picture_in], settings)[0][0]
        state = dict(handle.state.get(method, {}))
        resolved = handle.params.get(method, {})
    finally:
        handle.remove()
    inputs = loaded.processor(text=[text], images=[picture_in], return_tensors="pt")
    ids = inputs["input_ids"][0].tolist()
    image_token = getattr(loaded.model.config, "image_token_id", None)
    positions = [i for i, t in enumerate(ids) if t == image_token]
    notes = [
        f"{name}; {method} {resolved}",
        f"without: {before!r}",
        f"with:    {after!r}",
    ]
    attention = None
    if method in ATTENTION_DRAWN and positions:
        attention = (
            image_attention_row(loaded.model, inputs, positions),
            image_attention_row(loaded.model, inputs, positions, {method: dict(params or {})}),
        )
    picture = draw(
        method,
        state,
        picture_in,
        image_positions=positions,
        grid=_grid(loaded.model, len(positions)) if positions else None,
        notes=notes,
        attention=attention,
    )
    shown = Shown(method, picture, state, {"without": before, "with": after})
    if out is not None:
        shown.path = plots.save(picture, out)
    return shown
