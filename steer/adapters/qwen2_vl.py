"""Qwen2-VL and Qwen2.5-VL: patch-merger tower without [CLS]; M-RoPE positions.

Each image is ``<|vision_start|> <|image_pad|> x n <|vision_end|>`` with n = t*h*w / merge^2 from
``image_grid_thw``; its tokens form the merged ``h/merge x w/merge`` raster grid. Positions are M-RoPE
(t, h, w) ids built by the model's ``get_rope_index``; Qwen2.5-VL's tower has windowed attention with a few
full-attention blocks (``fullatt_block_indexes``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, cast

import torch
from torch import Tensor, nn

from steer.adapters.base import Adapter, ImageInfo
from steer.adapters.pruning import PruningAdapter
from steer.adapters.scores import received_attention
from steer.edits.facts import ImageBlock

QWEN_VISION = "<|vision_start|><|image_pad|><|vision_end|>"


class Qwen2VLAdapter(PruningAdapter, Adapter):
    """`Qwen2VLForConditionalGeneration`."""

    family = "qwen2-vl"
    model_classes = ("Qwen2VLForConditionalGeneration",)
    position_scheme = "mrope"
    vision_score = "received"
    vision_has_cls = False
    per_token_inputs = ("mm_token_type_ids",)

    @property
    def merge(self) -> int:
        """The spatial merge size (patches per merged token side)."""
        return int(self.config.vision_config.spatial_merge_size)

    @property
    def image_related_token_ids(self) -> tuple[int, ...]:
        c = self.config
        return (int(c.image_token_id), int(c.vision_start_token_id), int(c.vision_end_token_id))

    def images_from_inputs(self, inputs: dict[str, Any]) -> list[ImageInfo] | None:
        grid = inputs.get("image_grid_thw")
        if not isinstance(grid, torch.Tensor):
            return None
        merge = self.merge
        return [(int(t * h * w) // merge**2, (t, h, w)) for t, h, w in grid.tolist()]

    def image_blocks(self, count: int, meta: Any) -> tuple[ImageBlock, ...]:
        """One block on the merged ``h/merge x w/merge`` grid of ``image_grid_thw`` (t = 1 for a still image)."""
        if meta is None:
            return (ImageBlock(0, count, problem="the image grid needs image_grid_thw (from the processor)"),)
        t, h, w = (int(x) for x in meta)
        hh, ww = h // self.merge, w // self.merge
        if t != 1 or hh * ww != count:
            return (
                ImageBlock(
                    0, count, frames=t,
                    problem=f"an image run of {count} tokens does not match its grid (t={t}, {hh} x {ww} merged); "
                    "still images (t = 1) only, one grid per run of image tokens",
                ),
            )  # fmt: skip
        return (ImageBlock(0, count, "image", (hh, ww), frames=t),)

    # ---- preprocessed pixels per image ---------------------------------------------------------------
    def _patch_shape(self) -> tuple[int, int, int]:
        vision = self.config.vision_config
        channels = int(getattr(vision, "in_channels", None) or getattr(vision, "in_chans", None) or 3)
        return channels, int(vision.temporal_patch_size), int(vision.patch_size)

    def image_pixels(self, inputs: dict[str, Any]) -> list[Tensor]:
        """``pixel_values`` [sum N_i, C·t·p·p] (each row one patch laid out (C, t, p, p), the t temporal copies of
        a still image identical): each image's N_i patches as [N_i, C, p, p] (the first temporal copy)."""
        pixels, grid = inputs["pixel_values"], inputs.get("image_grid_thw")
        if not isinstance(grid, Tensor):
            raise ValueError("Qwen image pixels need image_grid_thw (from the processor)")
        c, t, p = self._patch_shape()
        out, start = [], 0
        for n in grid.prod(-1).tolist():
            patches = pixels[start : start + n].reshape(n, c, t, p, p)
            out.append(patches[:, :, 0])
            start += n
        return out

    def with_image_pixels(self, inputs: dict[str, Any], images: list[Tensor]) -> Tensor:
        """The inverse of :meth:`image_pixels`: each image's [N_i, C, p, p] broadcast over the t temporal copies."""
        pixels = inputs["pixel_values"]
        c, t, p = self._patch_shape()
        rows = [x[:, :, None].expand(x.shape[0], c, t, p, p).reshape(x.shape[0], -1) for x in images]
        return torch.cat(rows, dim=0).to(pixels.dtype)

    # ---- vision sites -------------------------------------------------------------------------------
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
    def default_score_layer(self) -> int:
        return len(self.vision_layers) - 1

    # ---- positions (M-RoPE) -------------------------------------------------------------------------
    @property
    def rope_index_owner(self) -> nn.Module:
        """The module whose ``get_rope_index`` builds M-RoPE ids (wrapped by position edits)."""
        return cast(nn.Module, cast(Any, self.model).model)

    def text_positions(self, ids: Tensor, mask: Tensor) -> Tensor:
        """[4, B, L]: the text row (``cumsum(mask) - 1``), then the model's M-RoPE t/h/w ids of a text-only prompt."""
        text = super().text_positions(ids, mask)
        owner: Any = self.rope_index_owner
        mrope, _ = owner.get_rope_index(ids, mm_token_type_ids=torch.zeros_like(ids), attention_mask=mask)
        return torch.cat([text[None], mrope.to(text.device)], dim=0)

    def chat_prompt(self, question: str, n_images: int = 1) -> str:
        """ChatML without a system turn, one vision block per image before the question."""
        return f"<|im_start|>user\n{QWEN_VISION * n_images}{question}<|im_end|>\n<|im_start|>assistant\n"

    # ---- pruning: mean received attention per merge unit --------------------------------------------
    def score_hook(self, scores: list[Tensor], encoder: dict[str, Any]) -> Callable[..., None]:
        grid = encoder.get("image_grid_thw")

        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            x = args[0] if args else kwargs["hidden_states"]
            cu = kwargs.get("cu_seqlens", args[1] if len(args) > 1 else None)
            rope = kwargs.get("position_embeddings", args[2] if len(args) > 2 else None)
            assert cu is not None and rope is not None  # a Qwen vision block passes both to its attention
            patch = received_attention(x.detach(), module, cu, rope)
            merged = patch.view(-1, self.merge**2).mean(dim=-1)
            scores.append(self.unpermute(merged, grid))

        return hook

    def unpermute(self, merged: Tensor, grid: Tensor | None) -> Tensor:
        """Merge-unit scores in raster order (Qwen2.5-VL permutes them into windows; Qwen2-VL does not)."""
        return merged

    def split_scores(self, scores: Tensor, features: list[Tensor]) -> list[Tensor]:
        return list(torch.split(scores, [int(f.shape[0]) for f in features]))

    def image_meta(self, encoder: dict[str, Any], index: int) -> Any:
        grid = encoder.get("image_grid_thw")
        return tuple(int(v) for v in grid[index].tolist()) if grid is not None else None


class Qwen2_5_VLAdapter(Qwen2VLAdapter):
    """`Qwen2_5_VLForConditionalGeneration`: as Qwen2-VL, with windowed vision attention."""

    family = "qwen2.5-vl"
    model_classes = ("Qwen2_5_VLForConditionalGeneration",)

    @property
    def vision_full_attention_layers(self) -> tuple[int, ...] | None:
        full = getattr(self.config.vision_config, "fullatt_block_indexes", None)
        return tuple(int(b) for b in full) if full else None

    @property
    def default_score_layer(self) -> int:
        full = self.vision_full_attention_layers
        return int(max(full)) if full else len(self.vision_layers) - 1

    def unpermute(self, merged: Tensor, grid: Tensor | None) -> Tensor:
        assert grid is not None  # Qwen images always come with image_grid_thw
        return merged[torch.argsort(self.window_index(grid).to(merged.device))]

    def window_index(self, grid: Tensor) -> Tensor:
        """The merge-unit window permutation for ``image_grid_thw``, from the model's own function."""
        visual = cast(Any, self.vision_tower)
        own = getattr(visual, "get_window_index", None)
        if own is not None:
            return own(grid)[0]
        from transformers.vision_utils import get_vision_window_index

        return get_vision_window_index(
            grid,
            spatial_merge_size=int(visual.spatial_merge_size),
            window_size=int(visual.window_size),
            patch_size=int(visual.patch_size),
        )[0]


__all__ = ["QWEN_VISION", "Qwen2VLAdapter", "Qwen2_5_VLAdapter"]
