"""LLaVA-1.5 (`LlavaForConditionalGeneration`): CLIP tower, MLP projector, one square grid of tokens per image."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from steer.adapters.base import Adapter, ImageInfo
from steer.adapters.pruning import PruningAdapter
from steer.adapters.scores import cls_attention
from steer.edits.facts import ImageBlock


class ClipScoring:
    """Visual-token scores of a CLIP tower: the [CLS] row of the scoring layer (recomputed, O(N))."""

    def score_hook(self, scores: list[Tensor], encoder: dict[str, Any]) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            x = args[0] if args else kwargs["hidden_states"]
            scores.append(cls_attention(x.detach(), module))

        return hook


class LlavaAdapter(ClipScoring, PruningAdapter, Adapter):
    """`LlavaForConditionalGeneration`: every image gives (image_size / patch_size)^2 tokens in raster order."""

    family = "llava-1.5"
    model_classes = ("LlavaForConditionalGeneration",)

    @property
    def tokens_per_crop(self) -> int | None:
        vision = self.config.vision_config
        return (int(vision.image_size) // int(vision.patch_size)) ** 2

    @property
    def tokens_per_image_fixed(self) -> int | None:
        """(image_size / patch_size)^2 tokens per image (+1 with the "full" strategy, which keeps [CLS])."""
        n = self.tokens_per_crop or 0
        return n + 1 if self.config.vision_feature_select_strategy == "full" else n

    def images_from_inputs(self, inputs: dict[str, Any]) -> list[ImageInfo] | None:
        pixel_values = inputs.get("pixel_values")
        if not isinstance(pixel_values, torch.Tensor):
            return None
        return [(self.tokens_per_image_fixed or 0, None)] * pixel_values.shape[0]

    def image_blocks(self, count: int, meta: Any) -> tuple[ImageBlock, ...]:
        """One ``sqrt(V) x sqrt(V)`` raster grid."""
        g = math.isqrt(count)
        if g * g != count:
            return (
                ImageBlock(
                    0, count,
                    problem=f"an image block of {count} tokens is not a square grid and the model gives no grid for "
                    "it; LLaVA-1.5 needs sqrt(V) x sqrt(V) image tokens per image "
                    "(vision_feature_select_strategy='default', one image per <image> placeholder)",
                ),
            )  # fmt: skip
        return (ImageBlock(0, count, "image", (g, g)),)

    def chat_prompt(self, question: str, n_images: int = 1) -> str:
        """Vicuna style: ``"USER: <image>\\n{question} ASSISTANT:"``."""
        return "USER: " + "<image>\n" * n_images + f"{question} ASSISTANT:"


__all__ = ["ClipScoring", "LlavaAdapter"]
