"""Attention edits (``layer.attn.scores``, ``layer.attn.head_out``): run by steer's attention function.

The installer only records which edits each decoder layer runs (and a head-output :class:`Collect`); the
runtime then switches the text attention to ``"steer"`` and tags the edited layers
(`steer.backends.transformers.attention`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from steer.backends.transformers.installers.registry import installer
from steer.edits.kinds import AttentionMask, GroupReweight, HeadOutputEdit, HeadScale, LayerEdit

if TYPE_CHECKING:
    from steer.backends.transformers.runtime import Runtime


@installer(AttentionMask, GroupReweight, HeadScale, HeadOutputEdit)
def install_attention(runtime: Runtime, edit: LayerEdit) -> None:
    for layer in edit.resolve_layers(runtime.adapter.num_layers):
        runtime.add_attention_edit(layer, edit)


__all__ = ["install_attention"]
