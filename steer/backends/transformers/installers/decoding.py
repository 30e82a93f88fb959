"""``BeamLookahead`` (site ``generate``): a beam search whose step scores a method's policy sets.

A wrapper of ``model.generate`` (an instance attribute, removed on ``remove()``) hands ``generate`` a
``custom_generate`` callable; ``generate`` prepares everything as usual and runs the loop of
`steer.backends.transformers.beam_loop`. The candidates' attention rows come from steer's attention function
(a ``Collect`` of ``layer.attn.probs`` on the policy's layer, decode forwards only).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from steer.backends.transformers.beam_loop import install_beam_lookahead
from steer.backends.transformers.installers.registry import installer
from steer.edits.kinds import BeamLookahead
from steer.errors import UnsupportedModelError

if TYPE_CHECKING:
    from steer.backends.transformers.runtime import Runtime


def check_decoding(adapter: Any, edit: BeamLookahead) -> None:
    """The look-ahead and the rollbacks cut the KV cache back to an earlier length; a sliding-window layer's
    cache keeps only its last keys (Gemma 3), so it cannot be cut back once the window is full: refused."""
    config = adapter.text_config
    types = tuple(getattr(config, "layer_types", None) or ())
    if "sliding_attention" in types:
        who = getattr(edit, "owner", None) or "BeamLookahead"
        window = getattr(config, "sliding_window", None)
        raise UnsupportedModelError(
            f"{who} cuts the KV cache back for its look-ahead and rollbacks, but {type(adapter.model).__name__} has "
            f"sliding-window layers (window {window}) whose cache keeps only the last keys and cannot be cut back; "
            "use plain beam search (num_beams=5) or vcd / pai on this model, or opera on a model whose layers all "
            "attend to the full sequence"
        )


@installer(BeamLookahead, rank=60, check=check_decoding)
def install_decoding(runtime: Runtime, edit: BeamLookahead) -> None:
    install_beam_lookahead(runtime, edit)


__all__ = ["check_decoding", "install_decoding"]
