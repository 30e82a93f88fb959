"""Facts: what an adapter knows about a model and about one prompt, as plain data.

Methods read facts; they never see the module tree. :class:`ModelInfo` is static (one per steered model);
:class:`ImageLayout` is per prompt (where each image's tokens sit and what grid they form). Adapters
(`steer.adapters`) build both; the backend hands them to edit callbacks through the edit context.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass(frozen=True)
class ModelInfo:
    """Static facts of a steered vision-language model.

    - ``family`` (``"llava-1.5"``...), ``model_class``, ``model_type`` / ``text_model_type`` (config types);
    - decoder: ``num_layers``, ``num_heads``, ``num_kv_heads``, ``head_dim``, ``hidden_size``;
    - ``position_scheme``: ``"1d"`` (RoPE on one index) or ``"mrope"`` (Qwen's t/h/w positions);
    - ``image_token_id``; ``image_tokens_per_crop``: the token count of one image (LLaVA-1.5) or one crop
      (LLaVA-NeXT) when it does not depend on the image, else None;
    - vision tower: ``vision_layers``; ``vision_full_attention_layers`` (the blocks with full attention when
      the tower also has windowed ones, else None); ``vision_score``: the visual-token score the tower
      supports (``"cls"``: the [CLS] row; ``"received"``: mean received attention); ``default_score_layer``;
      ``sends_cls``: the [CLS] token is sent to the language model (LLaVA's ``"full"`` feature strategy);
    - ``image_block_kinds``: the kinds of grid an image's tokens form (`ImageBlock.kind`): ``("image",)``, or
      ``("base", "highres")`` for a base image followed by a high-res grid with newline tokens;
    - ``image_attention``: how the model's own mask treats the tokens of one image: ``"causal"`` (raster order,
      like text) or ``"bidirectional"`` (Gemma 3); mask edits are composed with the model's mask, never
      rebuilt as plain causal;
    - ``deepstack_layers``: decoder layers whose output gets image features added (Qwen3-VL's DeepStack).
    """

    family: str
    model_class: str
    model_type: str
    text_model_type: str
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    hidden_size: int
    position_scheme: str
    image_token_id: int
    image_tokens_per_crop: int | None = None
    vision_layers: int = 0
    vision_full_attention_layers: tuple[int, ...] | None = None
    vision_score: str = "cls"
    default_score_layer: int = -1
    sends_cls: bool = False
    image_block_kinds: tuple[str, ...] = ("image",)
    image_attention: str = "causal"
    deepstack_layers: tuple[int, ...] = ()

    def describe(self) -> dict[str, Any]:
        """A summary for error messages and the CLI."""
        return {
            "family": self.family,
            "class": self.model_class,
            "layers": self.num_layers,
            "heads": self.num_heads,
            "kv_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "hidden_size": self.hidden_size,
            "positions": self.position_scheme,
        }


@dataclass(frozen=True)
class ImageBlock:
    """One raster grid of an image's tokens, in sequence indices ``[start, end)``.

    ``kind``: ``"image"`` (LLaVA-1.5, Qwen), ``"base"`` or ``"highres"`` (LLaVA-NeXT's base image and its
    unpadded high-res grid). ``grid`` = (rows, cols) of the token grid (Qwen: the merged grid), or None when
    it cannot be known (``problem`` says why); ``newline``: each grid row ends with one newline token (so the
    block holds ``rows * (cols + 1)`` tokens); ``frames``: temporal patches (Qwen; 1 for a still image).
    """

    start: int
    end: int
    kind: str = "image"
    grid: tuple[int, int] | None = None
    newline: bool = False
    frames: int = 1
    problem: str | None = None

    @property
    def length(self) -> int:
        return self.end - self.start

    def shifted(self, offset: int) -> ImageBlock:
        """The same block ``offset`` positions later (e.g. from image-relative to sequence indices)."""
        return ImageBlock(
            self.start + offset, self.end + offset, self.kind, self.grid, self.newline, self.frames, self.problem
        )


@dataclass(frozen=True)
class ImageSpan:
    """One image's run of tokens in a row: ``[start, end)``, its index in the batch's image order and its
    blocks (grids) in sequence indices."""

    start: int
    end: int
    image: int
    blocks: tuple[ImageBlock, ...] = ()

    @property
    def length(self) -> int:
        return self.end - self.start


@dataclass
class ImageLayout:
    """Where the images of a prompt are: ``mask`` bool [B, T] (image tokens: placeholders the model fills
    with image features) and, per row, its images in prompt order (:class:`ImageSpan`)."""

    mask: torch.Tensor
    rows: list[list[ImageSpan]] = field(default_factory=list)

    @property
    def spans(self) -> list[list[tuple[int, int]]]:
        """Per row, the ``(start, end)`` of each image's tokens."""
        return [[(image.start, image.end) for image in row] for row in self.rows]


def runs(row: torch.Tensor) -> list[tuple[int, int]]:
    """``[start, end)`` of each run of True in a 1-D bool tensor, in order (image-token runs)."""
    flags = row.to("cpu", torch.bool)
    if not bool(flags.any()):
        return []
    padded = torch.cat([torch.tensor([False]), flags, torch.tensor([False])]).int()
    diff = padded[1:] - padded[:-1]
    starts = (diff == 1).nonzero().flatten().tolist()
    ends = (diff == -1).nonzero().flatten().tolist()
    return list(zip(starts, ends))


def last_positions(mask: torch.Tensor) -> torch.Tensor:
    """Index of the last real token per row of a 2-D mask [B, T] (the query that predicts the first new token)."""
    width = mask.shape[1]
    return (width - 1) - mask.bool().flip(dims=[1]).long().argmax(dim=1)


__all__ = ["ImageBlock", "ImageLayout", "ImageSpan", "ModelInfo", "last_positions", "runs"]
