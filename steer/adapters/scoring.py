"""Visual-token scoring for towers whose attention layers take ``[B, N, D]`` (CLIP, SigLIP, InternViT).

The score hook (a forward pre-hook on the scoring vision attention module, `steer.adapters.pruning`) recomputes
from the layer's input either the [CLS] row (``vision_score == "cls"``) or the mean attention each patch
receives (``"received"``: the fallback of towers without [CLS]), in fp32, one row per encoded image (crop, tile,
sub-image). Where the model merges ``s x s`` patches into one language-model token (Gemma 3's average
pooling, InternVL's and SmolVLM's pixel shuffle), the patch scores are averaged over each token's patches
(:func:`~steer.adapters.scores.pool_scores`), so there is one score per token, in the tokens' raster order.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from steer.adapters.scores import cls_attention, pool_scores, received_attention_dense


def key_padding(mask: Any) -> Tensor | None:
    """bool [B, N] (True = real patch) from a vision attention mask (4-D bool or additive float), else None."""
    if not isinstance(mask, Tensor) or mask.dim() != 4:
        return None
    row = mask[:, 0, 0, :]
    return row if row.dtype == torch.bool else row > torch.finfo(row.dtype).min / 2


class PatchScoring:
    """Mixin: the score hook of a [B, N, D] tower, pooled to the language model's tokens."""

    vision_score: ClassVar[str]
    vision_has_cls: ClassVar[bool]

    @property
    def score_pool(self) -> int:
        """Patches per token side that the model merges into one language-model token (1: none)."""
        return 1

    def score_hook(self, scores: list[Tensor], encoder: dict[str, Any]) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            x = args[0] if args else kwargs["hidden_states"]
            x = x.detach()
            if self.vision_score == "cls":
                patch = cls_attention(x, module)
            else:
                mask = kwargs.get("attention_mask", args[1] if len(args) > 1 else None)
                patch = received_attention_dense(x, module, key_padding(mask))
                if self.vision_has_cls:
                    patch = patch[:, 1:]
            size = self.score_pool
            if size > 1:
                side = math.isqrt(int(patch.shape[1]))
                patch = pool_scores(patch, side, size)
            scores.append(patch)

        return hook


__all__ = ["PatchScoring", "key_padding"]
