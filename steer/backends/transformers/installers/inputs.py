"""``InputEdit`` (site ``lm.inputs``): a pre-hook on the language model that may rewrite its keyword arguments."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from torch import nn

from steer.backends.transformers.installers.registry import installer
from steer.edits.kinds import InputEdit

if TYPE_CHECKING:
    from steer.backends.transformers.runtime import Runtime


@installer(InputEdit, rank=20)
def install_input_edit(runtime: Runtime, edit: InputEdit) -> None:
    def hook(module: nn.Module, args: tuple, kwargs: dict) -> Any:
        if not runtime.active(edit, runtime.context.phase):
            return None
        new = edit.fn(dict(kwargs), runtime.edit_context(edit))
        return None if new is None else (args, new)

    runtime.add_hook(runtime.adapter.text_model.register_forward_pre_hook(hook, with_kwargs=True))


__all__ = ["install_input_edit"]
