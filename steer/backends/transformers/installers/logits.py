"""``LogitsTransform`` (site ``logits``): a forward hook on ``lm_head``."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from steer.backends.transformers.installers.registry import installer
from steer.edits.kinds import LogitsTransform

if TYPE_CHECKING:
    from steer.backends.transformers.runtime import Runtime


@installer(LogitsTransform)
def install_logits(runtime: Runtime, edit: LogitsTransform) -> None:
    def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> Any:
        if not runtime.active(edit, runtime.context.phase):
            return None
        return edit.fn(output, runtime.edit_context(edit))

    runtime.add_hook(runtime.adapter.lm_head.register_forward_hook(hook))


__all__ = ["install_logits"]
