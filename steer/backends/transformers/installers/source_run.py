"""``SourceRun`` (site ``lm.inputs``): an auxiliary pass of the language model before the caller's prefill, or
(``follow=True``) a branch that follows decoding with its own cache (`steer.backends.transformers.branches`).

A pre-hook on the language model runs, once per call at prefill, the model's text stack on the run's inputs
(no cache, no gradients) with the current run set to the run's key, so only the edits that list it act
(e.g. a :class:`~steer.edits.kinds.Collect`). The pre-hook runs before the language model's own forward
begins, so the auxiliary call never re-enters a half-finished forward; it sees the inputs after the
position and input edits of other methods (they are installed earlier).

Inputs (`steer.edits.kinds.SourceRun`): ``"same"`` (the prefill's own inputs), ``"text_only"`` (the adapter's
text-only variant of the prompt), ``"distorted"`` (the prefill's inputs with distorted images), or several
stacked along the batch.

Image features that reach the language model besides its embeddings (the adapter's ``lm_visual_inputs``:
Qwen3-VL's DeepStack features and their row mask) stay in a ``"same"`` run and are absent from a
``"text_only"`` run; stacked rows extend them with image-free rows. A model whose own mask treats image
tokens specially (Gemma 3's bidirectional images) gets the mask built by the adapter for stacked rows
(``Adapter.lm_attention_mask``); a ``"same"`` run passes the prefill's own mask through.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from steer.backends.transformers.branches import (
    distorted_embeddings,
    distorted_visual_inputs,
    explicit_positions,
    install_branch,
    install_distortion,
    stacked_visual_inputs,
)
from steer.backends.transformers.installers.registry import installer
from steer.backends.transformers.masks import padding_of, prompt_mask
from steer.backends.transformers.runs import run_key
from steer.edits.context import ForwardFacts
from steer.edits.kinds import MAIN, SourceRun

if TYPE_CHECKING:
    from steer.backends.transformers.runtime import Runtime

_KEYS = ("input_ids", "inputs_embeds", "attention_mask", "position_ids")


Inputs = dict[str, Any]


def same_inputs(
    runtime: Runtime, kwargs: dict, args: tuple, ctx: ForwardFacts, length: int | None = None
) -> tuple[Inputs, torch.Tensor | None]:
    """The prefill's own language-model inputs (a static cache's mask cut to the prompt) and their padding."""
    keys = (*_KEYS, *runtime.adapter.lm_visual_inputs)
    inputs = {k: kwargs[k] for k in keys if kwargs.get(k) is not None}
    if args and "inputs_embeds" not in inputs:  # positional input_ids
        inputs.setdefault("input_ids", args[0])
    reference = inputs.get("inputs_embeds", inputs.get("input_ids"))
    assert reference is not None  # the language model always gets embeddings or ids
    batch, width = reference.shape[:2]
    if "attention_mask" in inputs:
        inputs["attention_mask"] = prompt_mask(inputs["attention_mask"], width)
    padding = padding_of(inputs.get("attention_mask"), batch, width)
    if padding is None and ctx.padding_mask is not None:
        padding = padding_of(ctx.padding_mask, batch, width)
    return inputs, padding


def text_only_inputs(
    runtime: Runtime, kwargs: dict, args: tuple, ctx: ForwardFacts, length: int | None = None
) -> tuple[Inputs, torch.Tensor | None]:
    """The adapter's text-only variant of the call's prompt (left padded, to ``length`` when given). The
    prompt's padding comes from the call, or from the prefill's mask when the call's does not cover the prompt
    (a static cache hands the model a 4-D mask)."""
    ids = ctx.prompt_ids
    assert ids is not None  # auxiliary runs need input_ids; the runtime refuses embeddings-only calls first
    real = ctx.padding_mask
    if real is None or tuple(real.shape) != tuple(ids.shape):
        _, padding = same_inputs(runtime, kwargs, args, ctx)
        real = padding.bool() if padding is not None and tuple(padding.shape) == tuple(ids.shape) else None
    with runtime.running(None):  # other methods' position edits stay off while the rows are built
        inputs = runtime.adapter.text_only_inputs(ids, real, length)
    return inputs, inputs["attention_mask"].bool()


def distorted_inputs(
    runtime: Runtime, kwargs: dict, args: tuple, ctx: ForwardFacts, length: int | None = None, edit: Any = None
) -> tuple[Inputs, torch.Tensor | None]:
    """The prefill's own inputs with the image features recomputed from the distorted pixels
    (`steer.backends.transformers.branches.distorted_embeddings`)."""
    inputs, padding = same_inputs(runtime, kwargs, args, ctx)
    embeds = inputs.pop("inputs_embeds", None)
    if embeds is None:
        embeds = runtime.adapter.embed_tokens(inputs.pop("input_ids"))
    inputs.pop("input_ids", None)
    inputs["inputs_embeds"] = distorted_embeddings(runtime, edit, embeds, ctx)
    inputs.update(distorted_visual_inputs(runtime, edit, ctx, kwargs))  # DeepStack features of the distorted images
    return inputs, padding


#: How each part of a SourceRun's inputs is built (tests substitute entries).
BUILDERS: dict[str, Callable[..., tuple[Inputs, torch.Tensor | None]]] = {
    "same": same_inputs,
    "text_only": text_only_inputs,
    "distorted": distorted_inputs,
}


def _build(part: str, runtime: Runtime, kwargs: dict, args: tuple, ctx: ForwardFacts, length: int | None, edit: SourceRun) -> tuple[Inputs, torch.Tensor | None]:
    if part == "distorted":
        return BUILDERS[part](runtime, kwargs, args, ctx, length, edit=edit)
    return BUILDERS[part](runtime, kwargs, args, ctx, length)


def stacked_inputs(
    runtime: Runtime, parts: tuple[str, ...], kwargs: dict, args: tuple, ctx: ForwardFacts, edit: SourceRun | None = None
) -> tuple[Inputs, torch.Tensor]:
    """The parts' rows stacked along the batch: embeddings, 2-D masks and explicit positions, the later parts
    left padded to the first part's width (M-RoPE: [3, B, T] and [4, B, T] positions keep t/h/w). The
    adapter's image-feature inputs are extended with the image-free rows, and the mask is the one the adapter
    builds for the stacked rows."""
    adapter = runtime.adapter
    rows: list[Inputs] = []
    width: int | None = None
    for part in parts:
        inputs, padding = (
            _build(part, runtime, kwargs, args, ctx, width, edit) if edit is not None
            else BUILDERS[part](runtime, kwargs, args, ctx, width)
        )  # fmt: skip
        embeds = inputs.get("inputs_embeds")
        if embeds is None:
            embeds = adapter.embed_tokens(inputs["input_ids"])
        batch, width = embeds.shape[0], embeds.shape[1]
        mask = inputs.get("attention_mask")
        if not (isinstance(mask, torch.Tensor) and mask.dim() == 2):
            mask = padding if padding is not None else torch.ones(batch, width, dtype=torch.long)
        positions = explicit_positions(runtime, inputs.get("position_ids"), batch, width, embeds.device)
        image = ctx.image_mask if part in ("same", "distorted") else None
        if image is None or tuple(image.shape) != (batch, width):
            image = torch.zeros(batch, width, dtype=torch.bool)
        row = {"inputs_embeds": embeds, "attention_mask": mask.to(embeds.device).long(), "position_ids": positions}
        row["image"] = image.to(embeds.device)
        row.update({k: inputs[k] for k in adapter.lm_visual_inputs if inputs.get(k) is not None})
        rows.append(row)
    if adapter.position_scheme == "mrope" and len({r["position_ids"].shape[0] for r in rows}) > 1:
        for r in rows:
            r["position_ids"] = r["position_ids"][-3:]  # [3, B, T] with [4, B, T]: keep t/h/w
    first = rows[0]["inputs_embeds"]
    stacked = {
        "inputs_embeds": torch.cat([r["inputs_embeds"].to(first.dtype) for r in rows], dim=0),
        "attention_mask": torch.cat([r["attention_mask"].to(first.device) for r in rows], dim=0),
        "position_ids": torch.cat([r["position_ids"] for r in rows], dim=-2),
    }
    stacked.update(stacked_visual_inputs(adapter.lm_visual_inputs, rows))
    padding = stacked["attention_mask"].bool()
    image = torch.cat([r["image"] for r in rows], dim=0)
    stacked["attention_mask"] = adapter.lm_attention_mask(stacked["attention_mask"], image, stacked["inputs_embeds"])
    return stacked, padding


@installer(SourceRun, rank=30)
def install_source_run(runtime: Runtime, edit: SourceRun) -> None:
    if edit.follow:
        install_branch(runtime, edit)
        return
    parts = edit.parts()
    key = run_key(edit.owner, edit.name)
    if "distorted" in parts:
        install_distortion(runtime, edit)

    def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
        if runtime.run != MAIN:
            return None
        ctx = runtime.context
        if not edit.active_in(ctx.phase):
            return None
        done = ctx.call.backend.setdefault("source_runs", {})
        if key in done:
            return None
        done[key] = True
        if len(parts) == 1:
            inputs, padding = _build(parts[0], runtime, kwargs, args, ctx, None, edit)
        else:
            inputs, padding = stacked_inputs(runtime, parts, kwargs, args, ctx, edit)
        reference = inputs.get("inputs_embeds", inputs.get("input_ids"))
        assert reference is not None  # every builder gives embeddings or ids
        facts = dataclasses.replace(
            ctx, batch_size=int(reference.shape[0]), query_len=int(reference.shape[1]), past_length=0,
            padding_mask=padding, logits_to_keep=0, derived={},
        )  # fmt: skip
        with runtime.running(key, facts), torch.no_grad():
            module(**inputs, use_cache=False)
        return None

    runtime.add_hook(runtime.adapter.text_model.register_forward_pre_hook(hook, with_kwargs=True))


__all__ = [
    "BUILDERS",
    "distorted_inputs",
    "explicit_positions",
    "install_source_run",
    "same_inputs",
    "stacked_inputs",
    "stacked_visual_inputs",
    "text_only_inputs",
]
