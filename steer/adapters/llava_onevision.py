"""LLaVA-OneVision (`LlavaOnevisionForConditionalGeneration`): anyres-max tiling on a SigLIP tower.

Facts. An image alone in its prompt gives, like LLaVA-NeXT, a base crop of ``n x n`` tokens (n = image_size /
patch, no [CLS]: SigLIP) followed by the unpadded high-res grid of its tiles with one image-newline token after
each row; several images in one prompt (``batch_num_images`` > 1) give the base crop only, followed by one
newline token. The newline placeholders are image tokens too. Positions are 1-D.

What is new:

* **anyres-max** (``vision_aspect_ratio = "anyres_max_9"``): when the unpadded grid holds more than ~9 base
  crops (``ratio = sqrt(H W / (9 n^2)) > 1.1``), the model interpolates it bilinearly to
  ``(floor(H / ratio), floor(W / ratio))`` before adding the newlines; the layout fact follows it (a high-res
  grid of the interpolated size, raster order, newline slots).
* **no [CLS]**: the tower supports the mean received attention per crop (``vision_score = "received"``, the
  fallback FasterVLM states in its state); ``vision_feature_select_strategy = "full"`` sends every patch,
  no [CLS] (``sends_cls`` is False).
* Pruning packs per crop as on LLaVA-NeXT (stock unpadding + newlines, or the spatial layout). An interpolated
  grid has no token that is a crop's token, so its stock packing is refused (typed error) and the spatial
  layout is the one that works.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import torch
from torch import Tensor

from steer.adapters.base import ImageInfo
from steer.adapters.llava_next import LlavaNextAdapter, anyres_grid
from steer.adapters.pruning import Keep
from steer.adapters.scoring import PatchScoring
from steer.edits.artifacts import KeptBlock, PrunedImage
from steer.edits.facts import ImageBlock
from steer.errors import VisionPruningError


def max_patches(config: Any) -> int:
    """The ``N`` of ``anyres_max_N`` (9 for the released checkpoints)."""
    ratio = str(getattr(config, "vision_aspect_ratio", "anyres_max_9"))
    return int(ratio.removeprefix("anyres_max_"))


def onevision_image_layout(config: Any, image_size: Sequence[int]) -> tuple[int, int, tuple[int, int], bool]:
    """An image alone in its prompt, of ``image_size`` (H, W): (token count, base tokens n*n, high-res grid
    (Hhr, Whr) after unpadding and the anyres-max interpolation, whether it was interpolated); the count is
    ``n*n + Hhr * (Whr + 1)``."""
    vision = config.vision_config
    _, _, n, cells = anyres_grid(image_size, config.image_grid_pinpoints, int(vision.image_size), int(vision.patch_size))
    hh, ww = int(cells.shape[0]), int(cells.shape[1])
    ratio = math.sqrt(hh * ww / (max_patches(config) * n * n))
    interpolated = ratio > 1.1
    if interpolated:
        hh, ww = int(hh // ratio), int(ww // ratio)
    return n * n + hh * (ww + 1), n * n, (hh, ww), interpolated


class LlavaOnevisionAdapter(PatchScoring, LlavaNextAdapter):
    """`LlavaOnevisionForConditionalGeneration`: base crop + anyres-max high-res grid with newlines per image."""

    family = "llava-onevision"
    model_classes = ("LlavaOnevisionForConditionalGeneration",)
    vision_score = "received"
    vision_has_cls = False

    @property
    def tokens_per_crop(self) -> int | None:
        vision = self.config.vision_config
        return (int(vision.image_size) // int(vision.patch_size)) ** 2

    def images_from_inputs(self, inputs: dict[str, Any]) -> list[ImageInfo] | None:
        sizes = inputs.get("image_sizes")
        if not isinstance(sizes, torch.Tensor):
            return None
        counts = inputs.get("batch_num_images")
        per_row = counts.tolist() if isinstance(counts, torch.Tensor) else [1] * int(sizes.shape[0])
        multi = [n != 1 for n in per_row for _ in range(n)]
        n_tok = self.tokens_per_crop or 0
        out: list[ImageInfo] = []
        for size, several in zip(sizes.tolist(), multi):
            count = n_tok + 1 if several else onevision_image_layout(self.config, size)[0]
            out.append((count, tuple(size)))
        return out

    def image_blocks(self, count: int, meta: Any) -> tuple[ImageBlock, ...]:
        """The base ``n x n`` grid; then, for an image alone in its prompt, the anyres-max high-res grid with
        newline slots (an image among several has one newline after its base grid, in no block)."""
        vision = self.config.vision_config
        n = int(vision.image_size) // int(vision.patch_size)
        if count < n * n:
            return (ImageBlock(0, count, "base", problem=f"an image of {count} tokens is smaller than its {n} x {n} base grid"),)
        blocks = [ImageBlock(0, n * n, "base", (n, n))]
        if count <= n * n + 1:
            return tuple(blocks)
        if meta is None:
            blocks.append(
                ImageBlock(n * n, count, "highres", problem="the high-res grid needs each image's size "
                           "(image_sizes from the LLaVA-OneVision processor)")
            )  # fmt: skip
            return tuple(blocks)
        expected, base, (hh, ww), _ = onevision_image_layout(self.config, meta)
        if expected != count:
            blocks.append(
                ImageBlock(
                    n * n, count, "highres",
                    problem=f"a LLaVA-OneVision image of {count} tokens does not match its high-res grid {hh} x {ww} "
                    f"({base} base + {hh} x ({ww} + newline) = {expected})",
                )
            )  # fmt: skip
        else:
            blocks.append(ImageBlock(n * n, count, "highres", (hh, ww), newline=True))
        return tuple(blocks)

    def chat_prompt(self, question: str, n_images: int = 1) -> str:
        """Qwen2 ChatML as the OneVision checkpoints use it: ``"<|im_start|>user <image>\\n{question}<|im_end|>..."``."""
        return "<|im_start|>user " + "<image>\n" * n_images + f"{question}<|im_end|>\n<|im_start|>assistant\n"

    # ---- pruning: per crop, as LLaVA-NeXT; an interpolated grid only in the spatial layout ------------------
    def _pack_one(
        self, feature: Tensor, score: Tensor, size: list[int], newline: Tensor | None, keep: Keep, layout: str
    ) -> tuple[Tensor, PrunedImage]:
        interpolated = False
        count = 0
        if feature.shape[0] > 1:
            count, _, grid, interpolated = onevision_image_layout(self.config, size)
            if interpolated and layout != "spatial":
                raise VisionPruningError(
                    f"LLaVA-OneVision interpolates the high-res grid of an image of size {tuple(size)} (anyres_max_"
                    f"{max_patches(self.config)}: to {grid[0]} x {grid[1]}); its tokens are no subset of the crops' "
                    "tokens, so the stock packing cannot keep them. Use next_layout='spatial' (every crop keeps its "
                    "top T, tiles in raster order), or a smaller image."
                )
        tokens, image = super()._pack_one(feature, score, size, newline, keep, layout)
        if interpolated:  # spatial layout: the stock run is the interpolated one
            image.stock = count
            image.record["stock"] = count
            image.blocks = [
                kept if kept.block.grid is not None else KeptBlock(replace(kept.block, end=count), kept.sent_start, kept.kept)
                for kept in image.blocks
            ]
        return tokens, image


__all__ = ["LlavaOnevisionAdapter", "max_patches", "onevision_image_layout"]
