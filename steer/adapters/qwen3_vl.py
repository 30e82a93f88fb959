"""Qwen3-VL (`Qwen3VLForConditionalGeneration`): Qwen2-VL's layout with DeepStack and interleaved M-RoPE.

Facts, as Qwen2-VL (`steer.adapters.qwen2_vl`): each image is ``<|vision_start|> <|image_pad|> x n
<|vision_end|>`` with n = t*h*w / merge^2 from ``image_grid_thw`` (patch 16, merge 2), its tokens the merged
``h/merge x w/merge`` raster grid; M-RoPE (t, h, w) ids from the model's ``get_rope_index`` (images carry no
timestamps: those separate video frames only). The tower has no [CLS]: visual tokens are scored by the mean
attention they receive in the last block, averaged over each merge unit (no window permutation).

What is new:

* **Interleaved M-RoPE** (``mrope_interleaved``): the t/h/w frequencies are interleaved across the rotary
  dimensions instead of split in sections. Only the rotary embedding differs; position ids keep their
  meaning (three rows t, h, w; ``rope_deltas``), so position edits (CCA's rings) are unchanged.
* **DeepStack**: features of some vision blocks (``deepstack_visual_indexes``) are added to the residual
  stream of the image tokens after decoder layers 0..k-1 (``deepstack_layers``). They reach the language
  model as ``visual_pos_masks`` and ``deepstack_visual_embeds`` (``lm_visual_inputs``): an auxiliary run on the
  prompt itself keeps them, a text-only run has none (it has no image tokens), stacked rows extend the mask
  with image-free rows. Pruning keeps the same tokens of every DeepStack feature as of the main features.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

from steer.adapters.qwen2_vl import Qwen2VLAdapter
from steer.edits.artifacts import PrunedImage


class Qwen3VLAdapter(Qwen2VLAdapter):
    """`Qwen3VLForConditionalGeneration`."""

    family = "qwen3-vl"
    model_classes = ("Qwen3VLForConditionalGeneration",)
    lm_visual_inputs = {"visual_pos_masks": "row_mask", "deepstack_visual_embeds": "features"}

    @property
    def deepstack_layers(self) -> tuple[int, ...]:
        """DeepStack adds vision block ``deepstack_visual_indexes[i]``'s features after decoder layer i."""
        indexes = getattr(self.config.vision_config, "deepstack_visual_indexes", None) or ()
        return tuple(range(len(indexes)))

    def set_image_features(self, out: Any, kept: list[Tensor], images: list[PrunedImage]) -> None:
        """The kept main features, and the same tokens of every DeepStack feature (one list per layer)."""
        out.pooler_output = kept
        deepstack = getattr(out, "deepstack_features", None)
        if deepstack:
            out.deepstack_features = [
                [feature[image.offsets.to(feature.device)] for feature, image in zip(layer, images)]
                for layer in deepstack
            ]


__all__ = ["Qwen3VLAdapter"]
