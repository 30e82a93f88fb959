"""Facts of a steered diffusers pipeline, as plain data: what a pipeline method may know (no module, no pipeline).

:class:`PipelineInfo` is static (one per steered pipeline; the backend's adapter builds it). Layer depths:
the depth of a cross-attention (``attn2``) layer is the number of downsamplings above it: ``down_blocks[k]``
sits at depth k, ``up_blocks[k]`` at ``n_up − 1 − k``, ``mid_block`` at ``n_down − 1``. Its query grid for a
latent of (h_lat, w_lat) is :func:`grid_at` (stride-2 convolutions with padding 1 round up).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any


def grid_at(h_lat: int, w_lat: int, depth: int) -> tuple[int, int]:
    """The query grid of a layer at ``depth`` for a latent of (h_lat, w_lat): (⌈h_lat / 2^d⌉, ⌈w_lat / 2^d⌉),
    height first."""
    f = 2**depth
    return math.ceil(h_lat / f), math.ceil(w_lat / f)


@dataclass(frozen=True)
class TokenizerInfo:
    """The prompt tokenizer (the first one of SDXL's two) as pure functions of text.

    - ``model_max_length``: the padded prompt length (77 for CLIP); ``eos_token_id``: the end-of-text id;
    - ``encode(text)``: the ids of ``text`` without special tokens (how a word of the prompt is tokenised);
    - ``prompt_ids(prompt)``: the ids exactly as ``encode_prompt`` builds them (start token, the prompt,
      end token, padded / truncated to ``model_max_length``);
    - ``tokens(ids)``: the token strings of ``ids`` (``convert_ids_to_tokens``; CLIP ends words with ``</w>``).
    """

    model_max_length: int
    eos_token_id: int
    encode: Callable[[str], list[int]]
    prompt_ids: Callable[[str], list[int]]
    tokens: Callable[[Sequence[int]], list[str]]


@dataclass(frozen=True)
class PipelineInfo:
    """Static facts of a steered Stable Diffusion pipeline.

    - ``family``: ``"sd"`` (`StableDiffusionPipeline`, SD 1.x / 2.x) or ``"sdxl"``;
    - ``variant``: ``"sd1"`` (text width 768, or a tiny test pipeline), ``"sd2"`` (1024) or ``"sdxl"``;
    - ``pipeline_class``: the class name of the pipeline steered;
    - ``depths``: every cross-attention layer (its ``unet.attn_processors`` key) → its depth, in the order of
      ``unet.attn_processors``;
    - ``tokenizer``: the prompt tokenizer (:class:`TokenizerInfo`).
    """

    family: str
    variant: str
    pipeline_class: str
    tokenizer: TokenizerInfo
    depths: Mapping[str, int] = field(default_factory=dict)

    def available_depths(self) -> list[int]:
        """The depths that hold at least one ``attn2`` layer, increasing."""
        return sorted(set(self.depths.values()))

    def layers_at(self, depths: Sequence[int]) -> list[str]:
        """The ``attn2`` layers at ``depths``, in ``unet.attn_processors`` order."""
        wanted = set(depths)
        return [name for name, d in self.depths.items() if d in wanted]

    def describe(self) -> dict[str, Any]:
        """A summary for error messages."""
        return {"family": self.family, "variant": self.variant, "class": self.pipeline_class,
                "attn2_depths": self.available_depths()}


__all__ = ["PipelineInfo", "TokenizerInfo", "grid_at"]
