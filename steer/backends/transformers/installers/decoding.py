"""``BeamLookahead`` (site ``generate``): a beam search whose step scores a method's policy sets.

A wrapper of ``model.generate`` (an instance attribute, removed on ``remove()``) hands ``generate`` a
``custom_generate`` callable; ``generate`` prepares everything as usual and runs the loop of
`steer.backends.transformers.beam_loop`. The candidates' attention rows come from steer's attention function
(a ``Collect`` of ``layer.attn.probs`` on the policy's layer, decode forwards only).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from steer.backends.transformers.beam_loop import install_beam_lookahead
from steer.backends.transformers.installers.registry import installer
from steer.edits.kinds import BeamLookahead

if TYPE_CHECKING:
    from steer.backends.transformers.runtime import Runtime


@installer(BeamLookahead, rank=60)
def install_decoding(runtime: Runtime, edit: BeamLookahead) -> None:
    install_beam_lookahead(runtime, edit)


__all__ = ["install_decoding"]
