"""Gemma 3 (`Gemma3ForConditionalGeneration`): SigLIP tower, average-pooled tokens, a non-causal image mask.

Facts. Each image (and, with pan-and-scan, each of its crops: the processor writes the full image, then "and
here are some crops" and one block per crop) is ``\\n\\n<start_of_image> <image_soft_token> x m
<end_of_image>\\n\\n`` with m = ``mm_tokens_per_image`` (256: the 64 x 64 SigLIP patches average-pooled 4 x 4),
the tokens a square ``sqrt(m) x sqrt(m)`` raster grid. Every run of m image tokens is one encoded image (one
row of ``pixel_values``); a run's grid is one block (so CCA rings every crop). Positions are 1-D.

What is new:

* **Bidirectional image attention** (``image_attention = "bidirectional"``): the model's mask lets every token
  of one image see the whole image (``token_type_ids`` -> block ids), causal elsewhere. steer's attention
  function receives that mask; mask edits compose with it (``and`` / ``or``; CCA's ring rule replaces it inside
  a block only). Auxiliary runs on the prompt itself reuse the model's own mask; stacked rows get the mask
  built the way the model builds it (:meth:`Gemma3Adapter.lm_attention_mask`); text-only rows are causal.
* **Sliding-window layers** (``layer_types``): their mask is the window AND (causal OR same image); edits see
  it as the model's mask, so nothing attends outside the window that the model would not.
* **Pan-and-scan crops**: more encoded images than placeholders in the prompt text; the layout counts runs
  of m tokens, so crops are ordinary images of the layout. The words the processor writes around the crops
  ("Here is the original image ... and here are some crops to help you see better") are text: the text-only
  variant keeps them (it drops the image tokens and ``<start_of_image>`` / ``<end_of_image>``).
* No [CLS]: the tower supports the mean received attention (``vision_score = "received"``) in its last layer,
  averaged over each token's pooled patches; pruning keeps the same count of every crop (the projector
  gives a [crops, m, D] tensor, which stays one tensor). ``token_type_ids`` are shortened with the prompt.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from steer.adapters.base import Adapter
from steer.adapters.pruning import PruningAdapter
from steer.adapters.scoring import PatchScoring
from steer.edits.artifacts import PrunedImage
from steer.edits.facts import ImageBlock


def square_block(count: int, family: str) -> tuple[ImageBlock, ...]:
    """One ``sqrt(count) x sqrt(count)`` raster grid (a problem when ``count`` is not a square)."""
    g = math.isqrt(count)
    if g * g != count:
        return (ImageBlock(0, count, problem=f"an image run of {count} tokens is not the square grid {family} gives"),)
    return (ImageBlock(0, count, "image", (g, g)),)


class Gemma3Adapter(PatchScoring, PruningAdapter, Adapter):
    """`Gemma3ForConditionalGeneration`."""

    family = "gemma-3"
    model_classes = ("Gemma3ForConditionalGeneration",)
    vision_score = "received"
    vision_has_cls = False
    image_attention = "bidirectional"
    per_token_inputs = ("token_type_ids",)

    @property
    def tokens_per_crop(self) -> int | None:
        return int(self.config.mm_tokens_per_image)

    @property
    def tokens_per_image_fixed(self) -> int | None:
        return int(self.config.mm_tokens_per_image)

    @property
    def image_related_token_ids(self) -> tuple[int, ...]:
        c = self.config
        return (int(c.image_token_id), int(c.boi_token_id), int(c.eoi_token_id))

    @property
    def feature_layer(self) -> int:
        """The projector reads the tower's last layer (after its post-layernorm)."""
        return len(self.vision_layers) - 1

    @property
    def score_pool(self) -> int:
        projector: Any = self.projector
        return int(projector.kernel_size)

    def image_blocks(self, count: int, meta: Any) -> tuple[ImageBlock, ...]:
        return square_block(count, "Gemma 3")

    def lm_attention_mask(self, mask: Tensor, image_mask: Tensor, embeds: Tensor) -> Any:
        """The model's own mask mapping for the rows (full and sliding-window layers), each run of image tokens
        one bidirectional block, as ``Gemma3Model.forward`` builds it from ``token_type_ids``."""
        from transformers.models.gemma3 import modeling_gemma3 as gemma3

        block_ids = gemma3.get_block_sequence_ids_for_mask(image_mask.long(), device=embeds.device)
        return gemma3.create_masks_for_vision_model(
            config=self.text_config,
            inputs_embeds=embeds,
            attention_mask=mask,
            cache=None,
            position_ids=None,
            block_sequence_ids=block_ids,
        )

    def set_image_features(self, out: Any, kept: list[Tensor], images: list[PrunedImage]) -> None:
        """The projector's output is one [crops, m, D] tensor: the kept tokens stay one tensor (one budget)."""
        out.pooler_output = torch.stack(kept) if kept else out.pooler_output[:, :0]

    def chat_prompt(self, question: str, n_images: int = 1) -> str:
        """Gemma turns: ``"<start_of_turn>user\\n<start_of_image>{question}<end_of_turn>\\n<start_of_turn>model\\n"``."""
        return "<start_of_turn>user\n" + "<start_of_image>" * n_images + f"{question}<end_of_turn>\n<start_of_turn>model\n"


__all__ = ["Gemma3Adapter", "square_block"]
