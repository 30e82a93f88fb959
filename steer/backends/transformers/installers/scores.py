"""``ScoreEdit`` (site ``layer.attn.scores``): explicit pre-softmax scores for a few rows, run by steer's attention
function (`steer.backends.transformers.attention.run_score_edit`: the fused kernel over the other keys and an
explicit block over the selected ones, merged by log-sum-exp; ``impl="reference"`` materialises the row)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from steer.backends.transformers.installers.registry import installer
from steer.edits.kinds import ScoreEdit

if TYPE_CHECKING:
    from steer.backends.transformers.runtime import Runtime


@installer(ScoreEdit)
def install_score_edit(runtime: Runtime, edit: ScoreEdit) -> None:
    for layer in edit.resolve_layers(runtime.adapter.num_layers):
        runtime.add_attention_edit(layer, edit)


__all__ = ["install_score_edit"]
