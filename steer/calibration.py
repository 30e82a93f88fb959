"""Calibration of model-specific constants: VAR's sink channels D_sink (``steer calibrate sinks``).

Procedure (specs/var.md, "Calibration"; ours, unvalidated):

1. The first ``n`` images of a folder (sorted names), the family's chat prompt with
   "Please describe this image in detail.", one prefill each; forward pre-hooks on decoder layers 2..L−1
   capture each layer's input x in fp32.
2. Per token and channel ``z = |x| / sqrt(mean_d x² + 1e-6)`` (the φ of VAR, step 1). Anchor = the first
   non-pad token (BOS, or Qwen's first ``<|im_start|>``).
3. For each channel d, ``count_d`` = number of (image, layer) pairs with ``z_anchor[d] > τ``. Candidates:
   ``count_d ≥ 0.75·n·(L−2)``, ranked by the median of ``z_anchor[d]`` over the pairs; at most 4 are kept.
4. Per channel: count, median and max z; with the chosen set, the mean fraction of visual tokens that VAR
   would flag as sinks, per layer (a warning when it is 0 or above 25%).
5. ``sink_dims`` with provenance (model path, n, date, statistics) goes into a recipe file as a recipe
   ``var-calibrated-<model>`` whose ``sink_dims_for`` entry VAR looks up by (model_type, hidden_size, layers).

Note: ``z ≤ sqrt(hidden_size)`` for every token, so on tiny models (hidden 64) τ must be below 8.
"""

from __future__ import annotations

import datetime as _dt
import math
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import typer

if TYPE_CHECKING:  # torch, PIL and the model code load when a command runs (the CLI starts fast)
    import torch
    from PIL import Image
    from torch import nn

__all__ = [
    "ChannelStats",
    "SinkCalibration",
    "calibrate_app",
    "calibrate_sinks",
    "image_files",
    "write_recipe",
]

PROMPT = "Please describe this image in detail."
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")
CANDIDATE_SHARE = 0.75  # a candidate exceeds τ in at least this share of the (image, layer) pairs
MAX_DIMS = 4
MAX_VISUAL_FRACTION = 0.25
#: steer family -> zoo family (the key of `steer.zoo.chat_prompt` / `make_inputs`)
ZOO_FAMILY = {
    "llava-1.5": "llava",
    "llava-next": "llava_next",
    "qwen2-vl": "qwen2_vl",
    "qwen2.5-vl": "qwen2_5_vl",
}


@dataclass
class ChannelStats:
    """One channel's anchor statistics over the (image, layer) pairs."""

    channel: int
    count: int
    median_z: float
    max_z: float


@dataclass
class SinkCalibration:
    """The result of :func:`calibrate_sinks`."""

    sink_dims: list[int]
    channels: list[ChannelStats]
    visual_sink_fraction: dict[int, float]
    warnings: list[str]
    model: str
    family: str
    model_type: str
    text_model_type: str
    hidden_size: int
    num_layers: int
    n: int
    tau: float
    images: list[str] = field(default_factory=list)
    date: str = ""


class _Stop(Exception):
    """Raised by the last capture hook: nothing after the last captured layer input is needed."""


def image_files(folder: str | Path, n: int) -> list[Path]:
    """The first ``n`` image files of ``folder`` by sorted name."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} is not a folder of images")
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise FileNotFoundError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in {folder}")
    return files[:n]


def _first_real(attention_mask: torch.Tensor | None, length: int) -> int:
    if attention_mask is None:
        return 0
    row = attention_mask[0].bool()
    return int(row.float().argmax()) if bool(row.any()) else 0


def calibrate_sinks(
    model: nn.Module,
    processor: Any,
    images: Sequence[Image.Image | str | Path],
    tau: float = 20.0,
    max_dims: int = MAX_DIMS,
    progress: bool = True,
    model_name: str = "",
) -> SinkCalibration:
    """Find the massive-activation channels D_sink of ``model`` (specs/var.md, "Calibration").

    One prefill per image with the family's chat prompt; returns the chosen channels (≤ ``max_dims``),
    per-channel statistics and the per-layer fraction of visual tokens VAR would flag with them.
    """
    import torch

    with torch.no_grad():
        return _calibrate_sinks(model, processor, images, tau, max_dims, progress, model_name)


def _calibrate_sinks(
    model: nn.Module,
    processor: Any,
    images: Sequence[Image.Image | str | Path],
    tau: float,
    max_dims: int,
    progress: bool,
    model_name: str,
) -> SinkCalibration:
    import torch
    from PIL import Image
    from tqdm.auto import tqdm

    from steer.adapters import adapter_for
    from steer.methods.vlm.var import sink_scores

    adapter = adapter_for(model)
    family = ZOO_FAMILY[adapter.family]
    from steer import zoo

    num_layers = adapter.num_layers
    layers = list(range(2, num_layers))
    if not layers:
        raise ValueError(f"the model has {num_layers} decoder layers; VAR needs at least 3")
    first = next(model.parameters())
    device, dtype = first.device, first.dtype
    prompt = zoo.chat_prompt(family, PROMPT)
    hidden = adapter.hidden_size

    anchors: list[torch.Tensor] = []  # per image: [len(layers), D]
    # per image and layer: (visual token index, channel) pairs with z > τ, and the visual-token count
    exceed: list[list[torch.Tensor]] = []
    n_visual: list[int] = []
    current: dict[str, Any] = {}

    def capture(index: int, layer: int):
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            x = args[0] if args else kwargs["hidden_states"]
            z = sink_scores(x[0])  # [T, D]
            current["anchor"][index] = z[current["anchor_pos"]].cpu()
            zv = z[current["visual"].to(z.device)]
            current["exceed"][index] = (zv > tau).nonzero().to(torch.int32).cpu()
            if layer == layers[-1]:
                raise _Stop

        return hook

    handles = [
        adapter.decoder_layers[layer].register_forward_pre_hook(capture(i, layer), with_kwargs=True)
        for i, layer in enumerate(layers)
    ]
    names: list[str] = []
    try:
        for item in tqdm(list(images), desc="calibrate sinks", unit="image", disable=not progress):
            image = Image.open(item).convert("RGB") if isinstance(item, (str, Path)) else item.convert("RGB")
            names.append(str(item) if isinstance(item, (str, Path)) else f"<image {len(names)}>")
            batch = zoo.make_inputs(processor, family, [prompt], [[image]])
            inputs = {
                k: v.to(device=device, dtype=dtype) if v.is_floating_point() else v.to(device)
                for k, v in batch.items()
                if isinstance(v, torch.Tensor)
            }
            visual = adapter.image_token_mask(inputs["input_ids"])[0]
            if not bool(visual.any()):
                raise ValueError("the processor produced no image tokens; is this a supported VLM processor?")
            current.update(
                anchor=[None] * len(layers),
                exceed=[None] * len(layers),
                visual=visual,
                anchor_pos=_first_real(inputs.get("attention_mask"), inputs["input_ids"].shape[1]),
            )
            try:
                model(**inputs, use_cache=False)
            except _Stop:
                pass
            anchors.append(torch.stack(current["anchor"]))
            exceed.append(list(current["exceed"]))
            n_visual.append(int(visual.sum()))
    finally:
        for handle in handles:
            handle.remove()

    z_anchor = torch.stack(anchors).float()  # [n, L-2, D]
    n = z_anchor.shape[0]
    pairs = z_anchor.reshape(-1, hidden)
    counts = (pairs > tau).sum(0)
    medians = torch.quantile(pairs, 0.5, dim=0)
    maxima = pairs.amax(0)
    needed = CANDIDATE_SHARE * n * len(layers)
    candidates = [d for d in range(hidden) if counts[d] >= needed]
    candidates.sort(key=lambda d: -float(medians[d]))
    chosen = sorted(candidates[:max_dims])

    def stats(d: int) -> ChannelStats:
        return ChannelStats(int(d), int(counts[d]), round(float(medians[d]), 4), round(float(maxima[d]), 4))

    shown = candidates if candidates else [int(d) for d in torch.argsort(counts, descending=True)[:max_dims]]
    channels = [stats(d) for d in shown]

    fractions: dict[int, float] = {}
    chosen_t = torch.tensor(chosen, dtype=torch.int32)
    for i, layer in enumerate(layers):
        per_image = []
        for k in range(n):
            hits = exceed[k][i]
            flagged = hits[torch.isin(hits[:, 1], chosen_t), 0].unique().numel() if chosen else 0
            per_image.append(flagged / max(n_visual[k], 1))
        fractions[layer] = round(sum(per_image) / n, 6)

    warnings: list[str] = []
    if not chosen:
        top = ", ".join(
            f"{c.channel} (count {c.count}/{n * len(layers)}, median z {c.median_z:g})" for c in channels
        )
        warnings.append(
            f"no channel exceeds tau={tau:g} at the anchor token in {CANDIDATE_SHARE:.0%} of the (image, layer) pairs; "
            f"top channels by count: {top}. z is at most sqrt(hidden_size) = {math.sqrt(hidden):.1f}."
        )
    else:
        zero = [layer for layer, f in fractions.items() if f == 0.0]
        high = [layer for layer, f in fractions.items() if f > MAX_VISUAL_FRACTION]
        if zero:
            warnings.append(f"no visual token is flagged as a sink with {chosen} in layer(s) {zero}")
        if high:
            warnings.append(
                f"more than {MAX_VISUAL_FRACTION:.0%} of the visual tokens are flagged as sinks in layer(s) {high}; "
                "the channels or tau may be wrong"
            )
    config = adapter.config
    return SinkCalibration(
        sink_dims=chosen,
        channels=channels,
        visual_sink_fraction=fractions,
        warnings=warnings,
        model=model_name or str(getattr(config, "_name_or_path", "") or type(model).__name__),
        family=adapter.family,
        model_type=str(config.model_type),
        text_model_type=str(getattr(adapter.text_config, "model_type", "")),
        hidden_size=hidden,
        num_layers=num_layers,
        n=n,
        tau=float(tau),
        images=names,
        date=_dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
    )


# --------------------------------------------------------------------------------------------------
# recipe file


def _slug(text: str) -> str:
    slug = re.sub(r"[^a-z0-9]+", "-", Path(text.rstrip("/")).name.lower()).strip("-")
    return slug or "model"


def recipe_entry(result: SinkCalibration) -> tuple[str, dict[str, Any]]:
    """The recipe ``var-calibrated-<model>`` that records ``result`` (name, body)."""
    name = f"var-calibrated-{_slug(result.model)}"
    body = {
        "description": f"VAR with the sink channels found by `steer calibrate sinks` on {result.model}",
        "source": "steer calibrate sinks (our procedure, unvalidated; specs/var.md)",
        "methods": {"var": {"sink_dims": list(result.sink_dims), "tau": result.tau}},
        "sink_dims_for": [
            {
                "model_type": result.model_type,
                "text_model_type": result.text_model_type,
                "hidden_size": result.hidden_size,
                "num_layers": result.num_layers,
                "sink_dims": list(result.sink_dims),
                "status": f"calibrated {result.date}",
            }
        ],
        "calibration": {
            "model": result.model,
            "n": result.n,
            "tau": result.tau,
            "date": result.date,
            "channels": [asdict(c) for c in result.channels],
            "visual_sink_fraction": dict(result.visual_sink_fraction),
            "warnings": list(result.warnings),
        },
    }
    return name, body


def _last_top_level_key(text: str) -> str | None:
    last = None
    for line in text.splitlines():
        match = re.match(r"^([A-Za-z_][\w.-]*)\s*:", line)
        if match:
            last = match.group(1)
    return last


def write_recipe(result: SinkCalibration, path: str | Path) -> str:
    """Add (or replace) the calibration recipe in the recipe file ``path``; returns the recipe name.

    A new entry is appended as text under ``recipes:`` when that is the file's last top-level key, so the
    rest of the file (and its comments) stays as it was; otherwise the file is rewritten.
    """
    import yaml

    path = Path(path)
    name, body = recipe_entry(result)
    block = yaml.safe_dump(
        {name: body}, sort_keys=False, default_flow_style=None, width=120, allow_unicode=True
    )
    block = "".join("  " + line if line.strip() else line for line in block.splitlines(keepends=True))
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(f"family: {result.family}\nrecipes:\n{block}")
    else:
        text = path.read_text()
        data = yaml.safe_load(text) or {}
        recipes = data.get("recipes") or {}
        if name not in recipes and _last_top_level_key(text) == "recipes":
            if text and not text.endswith("\n"):
                text += "\n"
            if data.get("recipes") is None and re.search(r"^recipes:\s*\{\}\s*$", text, re.M):
                text = re.sub(r"^recipes:\s*\{\}\s*$", "recipes:", text, flags=re.M)
            path.write_text(text + block)
        else:
            data.setdefault("family", result.family)
            data["recipes"] = {**recipes, name: body}
            path.write_text(yaml.safe_dump(data, sort_keys=False, default_flow_style=None, width=120))
    check = yaml.safe_load(path.read_text()) or {}
    if name not in (check.get("recipes") or {}):  # pragma: no cover - defensive
        raise RuntimeError(f"writing {path} failed: recipe {name!r} not found after writing")
    return name


# --------------------------------------------------------------------------------------------------
# CLI

calibrate_app = typer.Typer(
    help="Find model-specific constants (e.g. VAR's sink channels).", no_args_is_help=True
)


@calibrate_app.callback()
def _calibrate() -> None:
    """Calibration commands."""


def _load_model(path: str, device: str, dtype: str) -> tuple[nn.Module, Any]:
    """Load a saved model folder: `steer.zoo.load` (any supported family), else the Auto classes."""
    import torch

    from steer import zoo

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if dtype == "auto":
        torch_dtype = torch.float16 if device.startswith("cuda") else torch.float32
    else:
        torch_dtype = getattr(torch, dtype)
    try:
        zoo.family_of(path)
    except (ValueError, FileNotFoundError, KeyError):
        from transformers import AutoModelForImageTextToText, AutoProcessor

        model: nn.Module = AutoModelForImageTextToText.from_pretrained(path, dtype=torch_dtype)
        processor = AutoProcessor.from_pretrained(path)
        processor.tokenizer.padding_side = "left"
        return model.to(device).eval(), processor
    model, processor = zoo.load(path, dtype=torch_dtype)
    # mypy reads PreTrainedModel.to (typed through functools.wraps) as unbound; type the call as Module.to
    return cast(nn.Module, model).to(device).eval(), processor


def _default_out(family: str) -> Path:
    from steer.recipe_files import recipes_dir

    return recipes_dir() / f"{family}.yaml"


@calibrate_app.command("sinks")
def sinks(
    model: str = typer.Option(
        ..., "--model", help="Saved model folder (a checkpoint or a steer zoo folder)."
    ),
    images: Path = typer.Option(
        ..., "--images", help="Folder of images; the first n by sorted name are used."
    ),
    n: int = typer.Option(16, "--n", min=1, help="Number of images."),
    tau: float = typer.Option(
        20.0, "--tau", min=0.0, help="Threshold on z = |x| / RMS(x) at the anchor token."
    ),
    out: Path | None = typer.Option(
        None,
        "--out",
        help="Recipe file to write into (default: the family's file in steer's recipes folder).",
    ),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda, cuda:1..."),
    dtype: str = typer.Option(
        "auto", "--dtype", help="auto (fp16 on CUDA, fp32 on CPU), float32, bfloat16..."
    ),
) -> None:
    """Find VAR's sink channels D_sink of a model and record them in a recipe file."""
    from rich.console import Console
    from rich.table import Table

    console = Console()
    files = image_files(images, n)
    if len(files) < n:
        console.print(f"[yellow]only {len(files)} images in {images} (asked for {n})[/yellow]")
    net, processor = _load_model(model, device, dtype)
    result = calibrate_sinks(net, processor, files, tau=tau, model_name=model)
    table = Table(
        title=f"sink channels of {model} (n={result.n}, tau={tau:g}, {result.num_layers - 2} layers)"
    )
    for column in ("channel", "count", "median z", "max z", "chosen"):
        table.add_column(column)
    for c in result.channels:
        table.add_row(
            str(c.channel),
            str(c.count),
            f"{c.median_z:.2f}",
            f"{c.max_z:.2f}",
            "yes" if c.channel in result.sink_dims else "",
        )
    console.print(table)
    fractions = ", ".join(f"{layer}: {f:.3f}" for layer, f in result.visual_sink_fraction.items())
    console.print(f"visual tokens flagged as sinks, per layer: {fractions}")
    for warning in result.warnings:
        console.print(f"[yellow]warning:[/yellow] {warning}")
    if not result.sink_dims:
        console.print("[red]no sink channels found; nothing written[/red]")
        raise typer.Exit(code=1)
    target = out if out is not None else _default_out(result.family)
    name = write_recipe(result, target)
    console.print(f"sink_dims = {result.sink_dims} -> recipe {result.family}/{name} in {target}")
