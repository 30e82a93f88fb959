"""Reading padding out of the masks transformers hands around (2-D padding masks, 4-D static-cache masks)."""

from __future__ import annotations

from typing import Any

import torch

from steer.edits.facts import last_positions


def padding_from_mask(mask: Any, length: int) -> torch.Tensor | None:
    """bool [B, length] (True = real token) from the model's attention mask: 2-D as given; a 4-D mask
    (StaticCache generation passes one) is read off its last query row, which is a real token."""
    if not isinstance(mask, torch.Tensor):
        return None
    if mask.dim() == 2:
        return mask.bool()
    if mask.dim() == 4:
        last = mask[:, 0, -1, :length]
        return last if last.dtype == torch.bool else last > torch.finfo(last.dtype).min / 2
    return None


def prompt_mask(mask: Any, width: int) -> Any:
    """The prefill's attention mask restricted to the prompt's ``width`` keys (a static cache's 2-D or 4-D
    mask spans the whole cache); other masks (None, dicts) are returned unchanged."""
    if isinstance(mask, torch.Tensor) and mask.dim() in (2, 4) and mask.shape[-1] > width:
        return mask[..., :width]
    return mask


def padding_of(mask: Any, batch: int, width: int) -> torch.Tensor | None:
    """bool [B, T] (True = real token) from a prefill mask: a 2-D padding mask as is; a 4-D mask (bool =
    may attend, float = 0 where allowed) from its last query row, which sees every real prompt token."""
    if not isinstance(mask, torch.Tensor):
        return None
    if mask.dim() == 2 and tuple(mask.shape) == (batch, width):
        return mask.bool()
    if mask.dim() == 4 and mask.shape[-1] == width and mask.shape[0] in (1, batch):
        allowed = mask if mask.dtype == torch.bool else mask == 0
        return allowed[:, 0, -1, :].expand(batch, width)
    return None


__all__ = ["last_positions", "padding_from_mask", "padding_of", "prompt_mask"]
