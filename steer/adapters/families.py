"""The four supported families: LLaVA-1.5, LLaVA-NeXT, Qwen2-VL, Qwen2.5-VL."""

from __future__ import annotations

from typing import Any, cast

import torch
from torch import nn

from steer.adapters.base import Adapter


class LlavaAdapter(Adapter):
    """`LlavaForConditionalGeneration`: CLIP tower, MLP projector, one run of image tokens per image."""

    family = "llava-1.5"
    model_classes = ("LlavaForConditionalGeneration",)

    @property
    def tokens_per_image_fixed(self) -> int | None:
        """Every LLaVA-1.5 image gives (image_size / patch_size)^2 tokens (+1 with the "full" strategy)."""
        vision = self.config.vision_config
        n = (vision.image_size // vision.patch_size) ** 2
        return n + 1 if self.config.vision_feature_select_strategy == "full" else n

    def tokens_per_image(self, inputs: dict[str, Any]) -> list[int] | None:
        pixel_values = inputs.get("pixel_values")
        if not isinstance(pixel_values, torch.Tensor):
            return None
        return [self.tokens_per_image_fixed or 0] * pixel_values.shape[0]


class LlavaNextAdapter(Adapter):
    """`LlavaNextForConditionalGeneration`: anyres crops packed with image-newline tokens into one run per image.

    The newline placeholders are image tokens too (they carry ``image_token_id``). Adjacent ``<image>``
    placeholders with no text between them form one run and one span.
    """

    family = "llava-next"
    model_classes = ("LlavaNextForConditionalGeneration",)


class Qwen2VLAdapter(Adapter):
    """`Qwen2VLForConditionalGeneration`: patch-merger tower without [CLS]; M-RoPE positions.

    Each image is ``<|vision_start|> <|image_pad|> x n <|vision_end|>`` with n = t*h*w / merge^2
    from ``image_grid_thw``.
    """

    family = "qwen2-vl"
    model_classes = ("Qwen2VLForConditionalGeneration",)
    position_scheme = "mrope"

    @property
    def image_related_token_ids(self) -> tuple[int, ...]:
        c = self.config
        return (int(c.image_token_id), int(c.vision_start_token_id), int(c.vision_end_token_id))

    def tokens_per_image(self, inputs: dict[str, Any]) -> list[int] | None:
        grid = inputs.get("image_grid_thw")
        if grid is None:
            return None
        merge = int(self.config.vision_config.spatial_merge_size)
        return [int(t * h * w) // merge**2 for t, h, w in grid.tolist()]

    @property
    def vision_tower(self) -> nn.Module:
        return cast(Any, self.model).model.visual

    @property
    def vision_layers(self) -> nn.ModuleList:
        return cast(nn.ModuleList, self.vision_tower.blocks)

    def vision_attention(self, layer: int) -> nn.Module:
        return cast(nn.Module, self.vision_layers[layer].attn)

    @property
    def projector(self) -> nn.Module:
        return cast(nn.Module, self.vision_tower.merger)

    @property
    def feature_layer(self) -> int:
        return len(self.vision_layers) - 1

    @property
    def rope_index_owner(self) -> nn.Module:
        """The module whose ``get_rope_index`` builds M-RoPE ids (wrapped by position edits)."""
        return cast(nn.Module, self.model.model)


class Qwen2_5_VLAdapter(Qwen2VLAdapter):
    """`Qwen2_5_VLForConditionalGeneration`: as Qwen2-VL, with windowed vision attention."""

    family = "qwen2.5-vl"
    model_classes = ("Qwen2_5_VLForConditionalGeneration",)


ADAPTERS: tuple[type[Adapter], ...] = (LlavaAdapter, LlavaNextAdapter, Qwen2VLAdapter, Qwen2_5_VLAdapter)
