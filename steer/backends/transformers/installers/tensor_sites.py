"""Tensor edits and collects at per-layer sites: ``layer.in``, ``layer.out``, ``layer.mlp.out``, the logit
lens (``layer.logits``, ``layer.logits.normed``), the final ``logits`` and, through the attention function,
``layer.attn.head_out``, ``layer.attn.probs`` and ``layer.attn.probs.edited``.

Every edit on one module point runs from one hook, in apply order (`steer.backends.transformers.runtime`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from steer.backends.transformers.collected import select, store
from steer.backends.transformers.installers.registry import installer
from steer.edits.kinds import Collect, TensorEdit

if TYPE_CHECKING:
    from steer.backends.transformers.runtime import Runtime


@installer(TensorEdit)
def install_transform(runtime: Runtime, edit: TensorEdit) -> None:
    for layer in edit.resolve_layers(runtime.adapter.num_layers):
        site = runtime.tensor_site(edit.site, layer)

        def op(x: torch.Tensor, phase: str, layer: int = layer) -> torch.Tensor | None:
            if not runtime.active(edit, phase) or not edit.acts_at(phase):
                return None
            return edit.apply(x, runtime.edit_context(edit, layer))

        site.ops.append(op)


@installer(Collect)
def install_collect(runtime: Runtime, edit: Collect) -> None:
    if edit.site == "logits":
        _install_logits_collect(runtime, edit)
        return
    layers = edit.resolve_layers(runtime.adapter.num_layers)
    if edit.site in ("layer.attn.head_out", "layer.attn.probs", "layer.attn.probs.edited"):
        for layer in layers:
            runtime.add_attention_edit(layer, edit)
        return
    lens = edit.site in ("layer.logits", "layer.logits.normed")
    normed = edit.site == "layer.logits.normed"
    for layer in layers:
        site = runtime.tensor_site(edit.site, layer)

        def op(x: torch.Tensor, phase: str, layer: int = layer) -> None:
            if not runtime.active(edit, phase):
                return None
            ectx = runtime.edit_context(edit, layer)
            value = select(x, edit.select, ectx)
            if lens:
                with runtime.running(None):  # steer's own projection: no edit of any method applies
                    value = runtime.adapter.lm_head(runtime.adapter.final_norm(value) if normed else value)
            store(edit, ectx, value)
            return None

        site.ops.append(op)


def _install_logits_collect(runtime: Runtime, edit: Collect) -> None:
    """``Collect(site="logits")``: the final logits of the runs it lists (a hook on ``lm_head``; stored under layer
    None). Runs before the logits edits of the same call (installed later)."""

    def hook(module: torch.nn.Module, args: tuple, output: torch.Tensor) -> None:
        if not runtime.active(edit, runtime.context.phase):
            return None
        ectx = runtime.edit_context(edit)
        store(edit, ectx, select(output, edit.select, ectx))
        return None

    runtime.add_hook(runtime.adapter.lm_head.register_forward_hook(hook))


__all__ = ["install_collect", "install_transform"]
