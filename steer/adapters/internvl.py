"""InternVL (`InternVLForConditionalGeneration`): InternViT with [CLS], pixel shuffle, tiles plus a thumbnail.

Facts. Each image is ``<img> <IMG_CONTEXT> x (m * tiles) </img>``: the processor cuts it into up to
``max_patches`` tiles of the tower's size and, when there is more than one, adds a thumbnail of the whole
image (last); every tile (one row of ``pixel_values``) gives m = (image_size / patch)^2 * downsample^2 tokens
(256: 32 x 32 patches, pixel shuffle 0.5 -> 16 x 16), a square raster grid. The layout splits a run of image
tokens into tiles of m tokens, each tile one block (CCA rings every tile and the thumbnail). Positions are 1-D.

What is new:

* **Pixel shuffle**: token (i, j) concatenates the 2 x 2 patches (2i.., 2j..) of the tile; a token's score is
  the mean of its patches' scores.
* **[CLS]**: InternViT keeps a [CLS] token (dropped before the projector), so FasterVLM uses its [CLS] row
  (``vision_score = "cls"``) in the layer feeding the projector, with the q/k norms of the layer when it has
  them.
* **Delimiters**: the config holds only the ``<IMG_CONTEXT>`` id; ``<img>`` / ``</img>`` are the tokens around
  each run (what the processor writes), which the text-only variant drops with the run.
* Pruning keeps the same count of every tile (the projector gives a [tiles, m, D] tensor, which stays one).
"""

from __future__ import annotations

from typing import Any, cast

import torch
from torch import Tensor, nn

from steer.adapters.base import Adapter
from steer.adapters.gemma3 import square_block
from steer.adapters.pruning import PruningAdapter
from steer.adapters.scoring import PatchScoring
from steer.edits.artifacts import PrunedImage
from steer.edits.facts import ImageBlock, runs


class InternVLAdapter(PatchScoring, PruningAdapter, Adapter):
    """`InternVLForConditionalGeneration`."""

    family = "internvl"
    model_classes = ("InternVLForConditionalGeneration",)
    vision_score = "cls"
    vision_has_cls = True

    @property
    def vision_layers(self) -> nn.ModuleList:
        return cast(nn.ModuleList, cast(Any, self.vision_tower).encoder.layer)

    def vision_attention(self, layer: int) -> nn.Module:
        return cast(nn.Module, self.vision_layers[layer].attention)

    @property
    def score_pool(self) -> int:
        return round(1 / float(self.config.downsample_ratio))

    @property
    def tokens_per_crop(self) -> int | None:
        vision = self.config.vision_config
        size, patch = vision.image_size, vision.patch_size
        side = int(size[0] if isinstance(size, (list, tuple)) else size) // int(
            patch[0] if isinstance(patch, (list, tuple)) else patch
        )
        return int(side * side * float(self.config.downsample_ratio) ** 2)

    @property
    def tokens_per_image_fixed(self) -> int | None:
        """The tokens of one tile (a run of image tokens holds the tiles of one image)."""
        return self.tokens_per_crop

    def image_related_mask(self, input_ids: Tensor) -> Tensor:
        """The ``<IMG_CONTEXT>`` runs and the one token on each side of a run (``<img>``, ``</img>``)."""
        image = self.image_token_mask(input_ids)
        out = image.clone()
        for b, row in enumerate(image.cpu()):
            for start, end in runs(row):
                out[b, max(start - 1, 0)] = True
                if end < out.shape[1]:
                    out[b, end] = True
        return out

    def image_blocks(self, count: int, meta: Any) -> tuple[ImageBlock, ...]:
        return square_block(count, "InternVL")

    def set_image_features(self, out: Any, kept: list[Tensor], images: list[PrunedImage]) -> None:
        """The projector's output is one [tiles, m, D] tensor: the kept tokens stay one tensor (one budget)."""
        out.pooler_output = torch.stack(kept) if kept else out.pooler_output[:, :0]

    def chat_prompt(self, question: str, n_images: int = 1) -> str:
        """ChatML with ``<IMG_CONTEXT>`` placeholders (the processor writes ``<img>...</img>`` around them)."""
        return "<|im_start|>user\n" + "<IMG_CONTEXT>\n" * n_images + f"{question}<|im_end|>\n<|im_start|>assistant\n"


__all__ = ["InternVLAdapter"]
