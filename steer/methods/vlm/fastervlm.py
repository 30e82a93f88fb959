"""FasterVLM: [CLS]-attention visual token pruning (Zhang et al., arXiv 2412.01818 v1). Spec: specs/fastervlm.md.

Rank an image's patch tokens by the attention the vision encoder's [CLS] token gives them, keep the top
ones and drop the rest before the LLM, which then runs unchanged on a shorter sequence (smaller KV cache).

* **score layer** (CLIP: LLaVA-1.5, LLaVA-NeXT): the layer whose output feeds the projector,
  ``k = (f mod (L_v + 1)) - 1`` for ``f = vision_feature_layer`` (its last entry if a list).
* **[CLS] row, recomputed** from that layer's attention input ``x`` [crops, 1+N, D] (already
  ``layer_norm1``-ed) in fp32, per head h::

      q0 = x_0 W_q^T + b_q,   K = x W_k^T + b_k,
      a_h = softmax_j(q0_h . K_h,j^T * d^-1/2)  over all 1+N keys,
      s_j = mean_h a_h[1 + j]                    (CLS column dropped, no renormalisation: sum_j s_j < 1)

  The tower keeps its fused attention (no ``output_attentions``); the row costs O(N).
* **budget**: ``T = round(N (1 - reduction))`` (round half to even) or ``num_tokens``; ``T < 1`` is an error.
* **selection**: ``kept = sort(topk(s, T))`` (raster order kept); image features = projector output at
  ``kept`` (the projector is token-wise, so ``proj(X)[kept] == proj(X[kept])``). No text conditioning.
* **sequence**: each image's run of placeholder tokens is shortened to its kept count and re-padded on
  the left. ``positions="contiguous"`` (official): ordinary positions of the shorter sequence;
  ``"original"``: every kept token and every text token keeps its stock position, i.e. position
  ``p' = p + gap`` where ``gap`` counts the pruned tokens before it (prefill) and ``gap = sum_i (N_i - T_i)``
  for every decoded token.
* **LLaVA-NeXT**, ``next_layout="stock"``: per crop its own [CLS] row; the base crop keeps its top T; tile c
  keeps ``K_c = min(T, valid_c)`` of its tokens that survive unpadding; packed as stock (base, then each
  unpadded row's kept tokens left to right and one newline), so the count per image is
  ``T + sum_c K_c + rows_unpadded``. ``"spatial"`` (official FasterVLM layout): no unpadding, no newlines,
  every crop keeps T, tiles in stitched-grid raster order: ``T (1 + nh nw)`` tokens.
* **Qwen2-VL / Qwen2.5-VL** (no [CLS]; the authors' VisPruner recipe, our wiring, unvalidated): mean
  received attention in the last (full-attention) vision block, per image chunk::

      g_j = mean_h mean_q softmax_k(q . k^T * d^-1/2)_{q j}

  computed in query chunks; the 4 patches of a merge unit are averaged (``N' = t (h/2) (w/2)``) and, on
  Qwen2.5-VL, un-permuted with ``argsort(window_index)``; ``T_i = round(N'_i (1 - reduction))`` per image.
  Positions are always original: ``get_rope_index`` runs on the unpruned sequence, the pruned columns
  are dropped and ``rope_deltas = max_pos + 1 - new_len`` per row.

Edits: one :class:`~steer.edits.kinds.PruneVisionTokens` with this method's keep rule (budget and top-T);
the backend encodes, scores (the adapter's [CLS] row or mean received attention), shortens the prompt and
publishes a :class:`~steer.edits.artifacts.PrunedLayout` (CCA lays out the kept tokens by it). ``generate``
returns the caller's prompt (unpruned) followed by the new tokens, so ``out[:, input_ids.shape[1]:]`` still
slices the answer. Other methods see the pruned sequence.
``Steering.state["fastervlm"]["score"]`` says which visual-token score the family's tower gives (the model's
``vision_score`` fact): ``"cls"`` (the [CLS] row, the paper's) or ``"received"`` (mean received attention, the
fallback of towers without [CLS]: Qwen, SigLIP). ``["samples"]``: per sample, per image: ``kept`` indices, ``N``, ``T``, ``sent``
(tokens sent to the LLM), ``stock`` (tokens the unpruned model gets) and ``offsets`` (each sent token's index
in the image's stock run); on LLaVA-NeXT ``kept`` / ``T`` per crop under ``crops``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor

from steer.edits.artifacts import PrunedLayout
from steer.edits.kinds import Edit, PruneVisionTokens
from steer.errors import InvalidParameterError, VisionPruningError
from steer.registry import Method, param, register

__all__ = ["FasterVLM", "FasterVLMError", "budget", "select_top"]

#: The prompt's image placeholders do not match the images, or the inputs cannot be pruned.
FasterVLMError = VisionPruningError


# --------------------------------------------------------------------------------------------------
# pure functions


def budget(n: int, reduction: float, num_tokens: int | None = None) -> int:
    """Tokens kept out of ``n``: ``num_tokens`` if given, else ``round(n (1 - reduction))`` (half to even).

    Raises :class:`InvalidParameterError` when the result is below 1 or ``num_tokens > n``.
    """
    if num_tokens is not None:
        if num_tokens > n:
            raise InvalidParameterError(
                f"fastervlm: num_tokens={num_tokens} is more than the {n} visual tokens of an image (crop); "
                f"use 1 <= num_tokens <= {n}"
            )
        t = int(num_tokens)
    else:
        t = round(round(n * (1.0 - reduction), 9))
    if t < 1:
        raise InvalidParameterError(
            f"fastervlm: reduction={reduction} keeps T = round({n} * (1 - {reduction})) = {t} of {n} visual "
            "tokens; T must be at least 1 (lower the reduction or pass num_tokens)"
        )
    return t


def select_top(scores: Tensor, k: int, valid: Tensor | None = None) -> Tensor:
    """``sort(topk(scores, k).indices)``: the k best indices in increasing (raster) order; ``valid`` (bool)
    excludes tokens from the choice."""
    if valid is not None:
        scores = scores.masked_fill(~valid.to(scores.device), float("-inf"))
    return torch.sort(torch.topk(scores, k).indices).values


# --------------------------------------------------------------------------------------------------
# the method


@register
class FasterVLM(Method):
    """[CLS]-attention visual token pruning as one declaration (equations in the module docstring)."""

    name = "fastervlm"
    description = (
        "FasterVLM: keep the visual tokens the vision [CLS] token attends to most (top-k, raster order) and "
        "drop the rest before the LLM (Qwen: mean received attention)."
    )
    stage = "vision"
    needs_image_tokens = False
    provides = (PrunedLayout,)

    @dataclass
    class Params:
        reduction: float = param(
            0.75, help="fraction of visual tokens dropped per image (per crop on LLaVA-NeXT)", range=(0.0, 1.0)
        )
        num_tokens: int | None = param(
            None, help="keep exactly this many tokens per image (crop); overrides reduction", range=(1, None)
        )
        positions: Literal["contiguous", "original"] = param(
            "contiguous",
            help="positions of the shorter sequence (official) or the stock ones (Qwen: always original)",
            choices=("contiguous", "original"),
        )
        next_layout: Literal["stock", "spatial"] = param(
            "stock",
            help="LLaVA-NeXT packing: stock unpad + newlines, or the official FasterVLM spatial layout",
            choices=("stock", "spatial"),
        )
        score_layer: int | None = param(
            None, help="vision layer (block) whose attention scores the tokens; None = the spec's choice"
        )

    # ---- configuration --------------------------------------------------------------------------
    @property
    def tiled(self) -> bool:
        """Images come as a base crop plus high-res tiles (LLaVA-NeXT), so ``next_layout`` applies."""
        return "highres" in self.model.image_block_kinds

    @property
    def score_layer(self) -> int:
        """The scoring vision layer: the parameter (negative from the end) or the family's default (the layer
        feeding the projector; Qwen: the last full-attention block)."""
        layer = self.params.score_layer
        if layer is None:
            return int(self.model.default_score_layer)
        return layer + self.model.vision_layers if layer < 0 else layer

    def check(self) -> None:
        p = self.params
        if not 0.0 <= p.reduction < 1.0:
            raise InvalidParameterError(f"fastervlm: reduction={p.reduction} must be in [0, 1)")
        n_layers = self.model.vision_layers
        if p.score_layer is not None and not -n_layers <= p.score_layer < n_layers:
            raise InvalidParameterError(
                f"fastervlm: score_layer={p.score_layer} does not exist; the vision tower has {n_layers} layers "
                f"(valid: 0..{n_layers - 1}, or negative from the end)"
            )
        full = self.model.vision_full_attention_layers
        if full and p.score_layer is not None and self.score_layer not in full:
            raise InvalidParameterError(
                f"fastervlm: score_layer={p.score_layer} is a window-attention block; use a full-attention block "
                f"({list(full)})"
            )
        if self.model.sends_cls:
            raise InvalidParameterError(
                "fastervlm: vision_feature_select_strategy='full' sends the [CLS] token to the LLM; FasterVLM "
                "supports 'default' (CLS dropped) only"
            )
        crop = self.model.image_tokens_per_crop
        if crop is not None and not self.is_noop():
            budget(crop, p.reduction, p.num_tokens)
        if self.tiled and p.next_layout == "spatial" and p.positions == "original":
            raise InvalidParameterError(
                "fastervlm: positions='original' needs the kept tokens to be a subset of the stock sequence; "
                "next_layout='spatial' is not (no unpadding, no newlines): use next_layout='stock' or "
                "positions='contiguous'"
            )

    def is_noop(self) -> bool:
        return self.params.reduction == 0.0 and self.params.num_tokens is None

    def initial_state(self) -> dict[str, Any]:
        p = self.params
        return {
            "reduction": p.reduction,
            "num_tokens": p.num_tokens,
            "positions": "original" if self.model.position_scheme == "mrope" else p.positions,
            "next_layout": p.next_layout if self.tiled else None,
            "score_layer": self.score_layer,
            "score": self.model.vision_score,
            "samples": [],
        }

    def edits(self) -> list[Edit]:
        p = self.params
        return [
            PruneVisionTokens(
                keep=self.keep,
                layer=self.score_layer,
                positions=p.positions,
                layout=p.next_layout,
                on_pruned=self._record,
            )
        ]

    # ---- the keep rule and the state ----------------------------------------------------------------
    def keep(self, scores: Tensor, valid: Tensor | None = None) -> Tensor:
        """The kept tokens of one image (crop): ``T = budget(N)`` (at most the ``valid`` count), top-T by
        ``scores``, in raster order."""
        p = self.params
        t = budget(int(scores.numel()), p.reduction, p.num_tokens)
        k = t if valid is None else min(t, int(valid.sum()))
        if k <= 0:
            return torch.zeros(0, dtype=torch.long)
        return select_top(scores, k, valid)

    def _record(self, layout: PrunedLayout) -> None:
        self.state["samples"] = [[image.record for image in row] for row in layout.images]
