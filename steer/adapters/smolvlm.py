"""SmolVLM (`SmolVLMForConditionalGeneration`, the Idefics3 family): sub-images plus a global image.

Facts. An image is split into ``rows x cols`` sub-images of the tower's size plus a global (downscaled)
image; the processor writes, per sub-image, ``<fake_token_around_image><row_r_col_c>`` and m ``<image>``
tokens, a newline after each row of sub-images, then ``\\n<fake_token_around_image><global-img>`` and the
global image's m tokens and a closing ``<fake_token_around_image>`` (an unsplit image: the global part
only). m = (image_size / patch)^2 / scale_factor^2 (64: 32 x 32 patches, pixel shuffle 4 -> 8 x 8). Every
run of m tokens is one encoded image (sub-image or global), a square raster grid and one block (CCA rings
each). The language model is ``model.model.text_model`` (Llama); positions are 1-D.

What is new:

* **Row/column markers**: the config holds only the ``<image>`` id; the marker tokens are the two tokens
  before each run (``<fake_token_around_image>`` and ``<row_r_col_c>`` / ``<global-img>``) and the closing
  ``<fake_token_around_image>`` after an image's last run, which the text-only variant drops with the runs
  (the newlines between rows of sub-images stay: they are text).
* **Pixel shuffle** (``scale_factor``): a token's score is the mean of its s x s patches' scores.
* No [CLS] (SigLIP-like tower): mean received attention in the last layer, padding patches hidden.
* The encoder output holds one tensor per prompt row (all its sub-images); pruning keeps the same count of
  every sub-image and regroups them per row.
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


class SmolVLMAdapter(PatchScoring, PruningAdapter, Adapter):
    """`SmolVLMForConditionalGeneration`."""

    family = "smolvlm"
    model_classes = ("SmolVLMForConditionalGeneration",)
    vision_score = "received"
    vision_has_cls = False

    # ---- sites that differ -------------------------------------------------------------------------
    @property
    def text_model(self) -> nn.Module:
        return cast(nn.Module, cast(Any, self.model).model.text_model)

    @property
    def vision_tower(self) -> nn.Module:
        return cast(nn.Module, cast(Any, self.model).model.vision_model)

    @property
    def projector(self) -> nn.Module:
        return cast(nn.Module, cast(Any, self.model).model.connector)

    @property
    def feature_layer(self) -> int:
        """The connector reads the tower's last layer (after its post-layernorm)."""
        return len(self.vision_layers) - 1

    @property
    def score_pool(self) -> int:
        return int(self.config.scale_factor)

    # ---- image layout ------------------------------------------------------------------------------
    @property
    def tokens_per_crop(self) -> int | None:
        vision = self.config.vision_config
        side = int(vision.image_size) // int(vision.patch_size)
        return side * side // int(self.config.scale_factor) ** 2

    @property
    def tokens_per_image_fixed(self) -> int | None:
        """The tokens of one sub-image (or the global image)."""
        return self.tokens_per_crop

    def image_related_mask(self, input_ids: Tensor) -> Tensor:
        """The ``<image>`` runs, the two marker tokens before each run and the closing fake token after one."""
        image = self.image_token_mask(input_ids)
        out = image.clone()
        width = out.shape[1]
        for b, row in enumerate(image.cpu()):
            for start, end in runs(row):
                out[b, max(start - 2, 0) : start] = True
                if start >= 2 and end < width and int(input_ids[b, end]) == int(input_ids[b, start - 2]):
                    out[b, end] = True  # the closing <fake_token_around_image>
        return out

    def image_blocks(self, count: int, meta: Any) -> tuple[ImageBlock, ...]:
        return square_block(count, "SmolVLM")

    # ---- pruning: per sub-image, regrouped per prompt row ------------------------------------------------
    def image_features(self, out: Any) -> list[Tensor]:
        m = int(self.tokens_per_crop or 0)
        self._per_row = [int(f.shape[0]) // m for f in out.pooler_output]
        return [chunk for f in out.pooler_output for chunk in torch.split(f, m)]

    def set_image_features(self, out: Any, kept: list[Tensor], images: list[PrunedImage]) -> None:
        grouped, i = [], 0
        for n in self._per_row:
            grouped.append(torch.cat(kept[i : i + n], dim=0))
            i += n
        out.pooler_output = grouped

    def chat_prompt(self, question: str, n_images: int = 1) -> str:
        """SmolVLM's template: ``"<|im_start|>User:<image>{question}<end_of_utterance>\\nAssistant:"``."""
        return "<|im_start|>User:" + "<image>" * n_images + f"{question}<end_of_utterance>\nAssistant:"


__all__ = ["SmolVLMAdapter"]
