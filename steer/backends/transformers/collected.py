"""Storing what a :class:`~steer.edits.kinds.Collect` reads: which positions it keeps and where it goes."""

from __future__ import annotations

from typing import Any

import torch

from steer.edits.context import EditContext
from steer.edits.facts import last_positions
from steer.edits.kinds import Collect


def select(x: torch.Tensor, how: str, ectx: EditContext) -> torch.Tensor:
    """The positions of [B, T, ...] a collect keeps: ``"all"``, each row's ``"last"`` real token (the call's
    padding; the last column without one), or the positions lm_head projects (``"kept"``)."""
    if how == "last":
        padding = ectx.forward.padding_mask
        if padding is not None and padding.shape[1] == x.shape[1]:
            last = last_positions(padding).to(x.device)
            return x[torch.arange(x.shape[0], device=x.device), last]
        return x[:, -1]
    if how == "kept":
        keep: Any = ectx.forward.logits_to_keep
        if isinstance(keep, int):
            return x if keep == 0 else x[:, -keep:].clone()
        return x[:, keep.to(x.device)]  # a tensor of positions, as transformers' slice_indices
    return x


def store(edit: Collect, ectx: EditContext, value: torch.Tensor) -> None:
    """Run the collect's function on the selected ``value`` and keep the result for this call."""
    stored = edit.fn(value, ectx) if edit.fn is not None else value
    ectx.forward.call.collected.setdefault((edit.owner, edit.name), {})[ectx.layer] = stored


__all__ = ["select", "store"]
