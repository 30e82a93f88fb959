"""Per-forward state: phase, image-token positions per sample, padding.

A forward pre-hook on the model's top-level module fills a :class:`ForwardContext` before every call
(prefill or decode step), because `generate()` accepts no extra keyword arguments and the attention
function receives no image positions. Positions are *sequence indices* (== key index in a dynamic KV
cache, left padding included), never RoPE positions.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class ForwardContext:
    """What the current forward call is about.

    - ``phase``: ``"prefill"`` (empty cache) or ``"decode"``;
    - ``past_length``: keys already in the cache before this call; the call's query rows are the
      sequence indices ``past_length .. past_length + query_len - 1``;
    - ``prompt_ids`` [B, T]: the prompt of the current generation (kept across decode steps);
    - ``image_mask`` [B, T] bool: prompt positions that hold image tokens (None when unknown, e.g. a
      call with ``inputs_embeds`` only);
    - ``image_spans``: per sample, the (start, end) of each image's token run, in order;
    - ``padding_mask`` [B, L] bool: the 2-D attention mask of this call (True = real token);
    - ``inputs``: the other model inputs of the prefill (``image_grid_thw``, ``image_sizes``...);
    - ``scratch``: per-call state of the installed edits, cleared at every prefill.
    """

    phase: str = "prefill"
    batch_size: int = 0
    query_len: int = 0
    past_length: int = 0
    prompt_ids: torch.Tensor | None = None
    image_mask: torch.Tensor | None = None
    image_spans: list[list[tuple[int, int]]] | None = None
    padding_mask: torch.Tensor | None = None
    inputs: dict[str, Any] = field(default_factory=dict)
    scratch: dict[Any, dict[str, Any]] = field(default_factory=dict)
    forward_index: int = 0

    @property
    def is_prefill(self) -> bool:
        return self.phase == "prefill"

    def query_positions(self, device: torch.device | None = None) -> torch.Tensor:
        """Sequence indices of this call's query rows, [Lq]."""
        return torch.arange(self.past_length, self.past_length + self.query_len, device=device)

    def key_image_mask(self, key_len: int, device: torch.device | None = None) -> torch.Tensor | None:
        """Image-token flags for ``key_len`` keys (decoded keys are never image tokens), [B, key_len]."""
        if self.image_mask is None:
            return None
        mask = self.image_mask.to(device) if device is not None else self.image_mask
        length = mask.shape[1]
        if key_len <= length:
            return mask[:, :key_len]
        pad = torch.zeros(mask.shape[0], key_len - length, dtype=torch.bool, device=mask.device)
        return torch.cat([mask, pad], dim=1)

    def rows_after_first_image(self, device: torch.device | None = None) -> torch.Tensor | None:
        """bool [B, Lq]: query rows that are text *after* the sample's first image token.

        Prefill: non-image rows whose index is greater than the first image position; decode: every new
        row of a sample that has an image.
        """
        if self.image_mask is None:
            return None
        mask = self.image_mask.to(device) if device is not None else self.image_mask
        has_image = mask.any(dim=1)
        first = torch.where(has_image, mask.float().argmax(dim=1), torch.full_like(has_image, 0, dtype=torch.long))
        q = self.query_positions(mask.device)
        after = q[None, :] > first[:, None]
        key_mask = self.key_image_mask(self.past_length + self.query_len, mask.device)
        assert key_mask is not None  # image_mask is set
        is_image = key_mask[:, q]
        return after & ~is_image & has_image[:, None]
