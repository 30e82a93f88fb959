"""CCA: Concentric Causal Attention (Xing, Li, Laptev, Lu, NeurIPS 2024; arXiv 2410.15926). Spec: specs/cca.md.

RoPE's long-term decay makes instruction tokens attend less to visual tokens that sit far away in the
1-D sequence. CCA re-indexes each image's tokens by concentric rings and replaces the raster causal mask
inside each image block by a ring-based one. With an image block of ``V = H x W`` tokens in raster order
starting at sequence index ``s``:

* **rings**: ``ring(i, j) = min(i, j, H-1-i, W-1-j)``; ``R = max ring + 1 = ceil(min(H, W) / 2)``. Ring r is
  the border of the ``(H-2r) x (W-2r)`` rectangle (``2(H-2r) + 2(W-2r) - 4`` tokens when both sides >= 2).
* **positions** (1-D RoPE, LLaVA-1.5 / LLaVA-NeXT): from the stock ids ``pos0`` of a row, walk its blocks
  in order with a shift ``Delta = 0``: tokens before a block get ``pos0 - Delta``; block tokens get
  ``(pos0[s] - Delta) + ring(i, j)``; then ``Delta += V - R``. Tokens after the last block and every
  decoded token get ``pos0 - Delta_total``. A :class:`~steer.edits.kinds.Positions` edit (the backend
  carries the last token's shift to the decoded tokens).
* **mask** (prefill): ``allowed[q, k] = ring(k) <= ring(q)`` when q and k are in the same block
  (bidirectional inside a ring, all outer rings, inner rings hidden), otherwise the model's own mask (causal
  ``k <= q`` with k not padding on a causal model; different blocks: causal between them). Installed as two
  :class:`~steer.edits.kinds.AttentionMask` edits on every decoder layer at prefill that compose with the
  model's mask: ``mode="and"`` hides the inner-ring keys of a block, then ``mode="or"`` lets its outer-ring
  keys in. Inside a block the ring rule thus replaces the model's rule (raster causal, or Gemma 3's
  bidirectional image); outside, the model's mask stays as it is (padding, sliding windows). On a causal
  model this is exactly the concentric causal mask of the paper. Decode rows are text rows and keep the
  model's mask.
* **Qwen2-VL / Qwen2.5-VL** (M-RoPE; our design): on the merged grid ``H' x W'`` an image at text
  position ``p0`` has stock ids ``t = p0, h = p0 + i, w = p0 + j`` and the next text at
  ``p0 + max(H', W')``. ``mrope="ring_t"``: ``t = p0 + ring`` (h, w, later text and ``rope_deltas``
  unchanged, since ``R <= max(H', W')``); ``"ring_all"``: ``t = h = w = p0 + ring``, later tokens shift by
  ``max(H', W') - R`` (text resumes at ``p0 + R``) and ``rope_deltas = max_pos + 1 - seq_len``;
  ``"mask_only"``: stock ids. The same :class:`~steer.edits.kinds.Positions` edit (the backend recomputes
  ``rope_deltas``). Video tokens are untouched.
* **LLaVA-NeXT** (our extrapolation): ``next_blocks="base"`` rings only the base block (the first
  ``(image_size / patch)^2`` tokens of each image); the high-res grid and its newline tokens keep raster
  order (shifted by Delta) and the causal mask. ``"all"`` makes the unpadded high-res grid
  ``Hhr x Whr`` a second ringed block (``V = Hhr * (Whr + 1)`` with the newlines); each newline token takes
  the ring of the last token of its row.

* **Pruned prompts** (a :class:`~steer.edits.artifacts.PrunedLayout` from a pruning method, e.g. FasterVLM):
  each image run holds only the kept tokens; they keep the rings of their original (i, j) in the stock grids,
  R stays the full grid's, ``Delta += V_kept - R`` and the mask is ``ring(k) <= ring(q)`` among the kept
  tokens. When the pruned positions keep the stock ids (``positions="original"``, 1-D), a block still covers
  its stock length and its first kept token sits ``lead`` positions after its stock start, so the walk gives
  the ids of the unpruned prompt at the kept columns. Qwen: the same rules on the kept tokens' ids.

Masks, positions and Delta are computed per row (batches, left padding, beams). CCA was trained into its
published checkpoint; on stock weights it is an experimental ablation (a ``UserWarning`` says so unless
``trained_checkpoint=True``).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch

from steer.edits.artifacts import PrunedLayout
from steer.edits.context import EditContext
from steer.edits.facts import ImageLayout
from steer.edits.kinds import AttentionMask, Edit, Positions
from steer.errors import ImageLayoutError
from steer.methods.vlm.cca.rings import (
    RingBlock,
    block_region,
    block_rings,
    concentric_mask,
    concentric_positions,
    grid_block,
    kept_block,
    layout_blocks,
    newline_grid_block,
    num_rings,
    pruned_blocks,
    ring_block,
    ring_sizes,
    rings,
)
from steer.registry import Method, param, register

STOCK_WEIGHTS_WARNING = (
    "CCA was trained into its checkpoint; on stock weights it is an experimental ablation "
    "(pass trained_checkpoint=True if these weights were trained with CCA)"
)


#: The image tokens of a prompt cannot be laid out as CCA's grids (`steer.errors.ImageLayoutError`).
CCALayoutError = ImageLayoutError


# --------------------------------------------------------------------------------------------------
# the method


@register
class CCA(Method):
    """Concentric Causal Attention as declarations (equations in the module docstring).

    Edits: a :class:`~steer.edits.kinds.Positions` edit (concentric 1-D ids, or Qwen ``ring_t`` /
    ``ring_all``) and two :class:`~steer.edits.kinds.AttentionMask` edits (``mode="and"`` then ``"or"``,
    prefill, all layers) that compose the ring rule with the model's own mask.
    The grids come from the image layout fact; on a pruned prompt from the
    :class:`~steer.edits.artifacts.PrunedLayout` artifact.

    ``Steering.state["cca"]``: ``variant`` (``"1d"``, ``"1d/base"``, ``"1d/all"``, ``"ring_t"``,
    ``"ring_all"``, ``"mask_only"``), ``switches`` (positions, mask as installed) and ``samples``: per row
    of the last prompt (1-D: rows of the prefill, beams included; Qwen positions: rows as the model's
    ``get_rope_index`` saw them, before beam expansion) a dict with ``blocks`` (start, grid, R, tokens,
    kind), ``deltas`` (Delta after each block), ``position_range`` (min, max id of the real tokens) and
    ``position_ids`` (the ids of the real tokens; [3, T] for Qwen). A pruned block also lists ``kept`` (its
    tokens' indices in the stock block) and ``tokens`` is the kept count (pruned or not, Qwen rows are the
    rows ``get_rope_index`` saw).
    """

    name = "cca"
    description = (
        "Concentric Causal Attention: concentric position ids and a ring-based 2-D causal mask for image "
        "tokens (trained method; experimental on stock weights)."
    )
    stage = "input"
    needs_image_tokens = False  # text-only rows keep stock positions and mask (spec: Decisions)
    whole_prefill = True  # an image block must not be split over prefill calls
    consumes = (PrunedLayout,)  # lays out pruned tokens by their original (i, j)
    uses = ("image_grid",)

    @dataclass
    class Params:
        positions: bool = param(True, help="concentric position ids for image tokens")
        mask: bool = param(True, help="concentric causal mask among image tokens (prefill)")
        mrope: Literal["mask_only", "ring_t", "ring_all"] = param(
            "ring_t",
            help="Qwen M-RoPE variant when positions is on",
            choices=("mask_only", "ring_t", "ring_all"),
        )
        next_blocks: Literal["base", "all"] = param(
            "base",
            help="LLaVA-NeXT blocks to ring: the base image only, or also the high-res grid",
            choices=("base", "all"),
        )
        trained_checkpoint: bool = param(
            False, help="the weights were trained with CCA (silences the stock-weights warning)"
        )

    # ---- switches -------------------------------------------------------------------------------
    @property
    def uses_mrope(self) -> bool:
        """The model builds M-RoPE ids (else 1-D RoPE)."""
        return self.model.position_scheme == "mrope"

    @property
    def positions_on(self) -> bool:
        p = self.params
        return bool(p.positions) and not (self.uses_mrope and p.mrope == "mask_only")

    @property
    def ringed_kinds(self) -> tuple[str, ...]:
        """The block kinds CCA rings: every kind, or without the high-res grid (``next_blocks="base"``)."""
        return ("image", "base", "highres") if self.params.next_blocks == "all" else ("image", "base")

    @property
    def variant(self) -> str:
        if self.uses_mrope:
            return self.params.mrope if self.positions_on else "mask_only"
        if "highres" in self.model.image_block_kinds:
            return f"1d/{self.params.next_blocks}"
        return "1d"

    def is_noop(self) -> bool:
        return not self.positions_on and not self.params.mask

    def initial_state(self) -> dict[str, Any]:
        if not self.params.trained_checkpoint:
            warnings.warn(STOCK_WEIGHTS_WARNING, UserWarning, stacklevel=4)
        return {
            "variant": self.variant,
            "switches": {"positions": self.positions_on, "mask": bool(self.params.mask)},
            "samples": [],
        }

    def edits(self) -> list[Edit]:
        out: list[Edit] = []
        if self.positions_on:
            out.append(Positions(fn=self._positions))
        if self.params.mask:
            out.append(AttentionMask(layers="all", mask=self._hide, mode="and", phase="prefill"))
            out.append(AttentionMask(layers="all", mask=self._allow, mode="or", phase="prefill"))
        return out

    # ---- which image is where -------------------------------------------------------------------
    def blocks_for(self, layout: ImageLayout) -> list[list[RingBlock]]:
        """The ringed blocks of every row of an unpruned prompt (sequence indices), from the image layout."""
        return layout_blocks(layout, self.ringed_kinds)

    def pruned_blocks_for(
        self, input_ids: torch.Tensor, image_mask: torch.Tensor, layout: PrunedLayout
    ) -> list[list[RingBlock]]:
        """The ringed blocks of a pruned prompt (kept tokens at the rings of their original (i, j))."""
        gaps = layout.positions == "original" and not self.uses_mrope
        return pruned_blocks(input_ids, image_mask, layout, self.ringed_kinds, gaps)

    def _layout(self, ectx: EditContext, cache: bool = True) -> list[list[RingBlock]] | None:
        """The call's ringed blocks per row (cached for the call), or None when the prompt has no image."""
        memo = ectx.memo
        if cache and "blocks" in memo:
            return memo["blocks"]
        ctx = ectx.forward
        blocks = None
        pruned = ectx.artifact(PrunedLayout)
        if ctx.prompt_ids is not None and ctx.image_layout is not None:
            if pruned is not None:
                blocks = self.pruned_blocks_for(ctx.prompt_ids, ctx.image_layout.mask, pruned)
            else:
                blocks = self.blocks_for(ctx.image_layout)
            if not any(blocks):
                blocks = None
        if cache:
            memo["blocks"] = blocks
            if blocks is not None and not self.positions_on:
                self._record([_sample(row) for row in blocks])
        return blocks

    def _record(self, samples: list[dict[str, Any]]) -> None:
        self.state["samples"] = samples

    # ---- positions ------------------------------------------------------------------------------
    def _positions(self, pos: torch.Tensor, ectx: EditContext) -> torch.Tensor | None:
        """The concentric ids of the prompt: 1-D [B, T] or M-RoPE [3, B, T]."""
        if pos.dim() == 3:
            blocks = self._layout(ectx, cache=False)
            return None if blocks is None else self._mrope(pos, blocks, ectx)
        blocks = self._layout(ectx)
        return None if blocks is None else self._concentric(pos, blocks, ectx)

    def _concentric(self, pos0: torch.Tensor, blocks: list[list[RingBlock]], ectx: EditContext) -> torch.Tensor:
        """1-D RoPE: walk each row's blocks (Delta); padding keeps its ids."""
        real = ectx.forward.padding_mask
        length = pos0.shape[1]
        rows, samples = [], []
        for b in range(pos0.shape[0]):
            r = real[b, -length:] if real is not None else None
            new, deltas = concentric_positions(pos0[b], blocks[b], r)
            rows.append(new)
            used = new[r.to(new.device)] if r is not None else new
            samples.append(_sample(blocks[b], deltas, used))
        self._record(samples)
        return torch.stack(rows)

    def _mrope(self, position_ids: torch.Tensor, blocks: list[list[RingBlock]], ectx: EditContext) -> torch.Tensor:
        """M-RoPE: each block's ids (``ring_t``: t; ``ring_all``: t, h, w and the later tokens' shift)."""
        position_ids = position_ids.clone()
        real = ectx.forward.padding_mask
        assert real is not None  # the backend passes the row's real tokens
        ring_all = self.params.mrope == "ring_all"
        samples = []
        for b, row_blocks in enumerate(blocks):
            shift = 0
            shifts = []
            for blk in row_blocks:
                p0 = position_ids[0, b, blk.start]
                ring = blk.ring.to(position_ids.device, position_ids.dtype)
                if ring_all:
                    position_ids[:, b, blk.start : blk.end] = p0 + ring
                    step = max(blk.grid) - blk.R
                    after = real[b].clone()
                    after[: blk.end] = False
                    position_ids[:, b, after] -= step
                    shift += step
                else:
                    position_ids[0, b, blk.start : blk.end] = p0 + ring
                shifts.append(shift)
            samples.append(_sample(row_blocks, shifts, position_ids[:, b, real[b]]))
        self._record(samples)
        return position_ids

    # ---- the mask -------------------------------------------------------------------------------
    def _mask(self, ectx: EditContext) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The call's concentric causal mask [B, 1, Lq, Lk] (``ring(k) <= ring(q)`` inside a block, causal with
        real keys elsewhere: what a causal model attends with) and the same-block region, memoized."""
        if ectx.phase != "prefill":
            return None
        blocks = self._layout(ectx)
        if blocks is None:
            return None
        ctx = ectx.forward
        q_len = ectx.query_len or ctx.query_len
        k_len = ectx.key_len or q_len
        key = ("mask", q_len, k_len)
        memo = ectx.memo
        if key not in memo:
            real = ctx.padding_mask
            rows = [
                concentric_mask(q_len, blocks[b], real[b, -q_len:] if real is not None else None, k_len)
                for b in range(len(blocks))
            ]
            memo[key] = torch.stack(rows)[:, None]
            memo[("region", q_len, k_len)] = torch.stack([block_region(q_len, row, k_len) for row in blocks])[:, None]
        return memo[key], memo[("region", q_len, k_len)]

    def _hide(self, ectx: EditContext) -> torch.Tensor | None:
        """AND-mask: False on the keys of a block that the ring rule hides (inner rings); True elsewhere."""
        masks = self._mask(ectx)
        return None if masks is None else ~(masks[1] & ~masks[0])

    def _allow(self, ectx: EditContext) -> torch.Tensor | None:
        """OR-mask: True on the keys of a block that the ring rule lets in (its own and outer rings)."""
        masks = self._mask(ectx)
        return None if masks is None else masks[1] & masks[0]


def _sample(
    blocks: Sequence[RingBlock], deltas: list[int] | None = None, used: torch.Tensor | None = None
) -> dict[str, Any]:
    """One row of ``Steering.state["cca"]["samples"]``."""
    return {
        "blocks": [b.describe() for b in blocks],
        "deltas": list(deltas or []),
        "position_range": (int(used.min()), int(used.max())) if used is not None and used.numel() else None,
        "position_ids": used.detach().cpu() if used is not None else None,
    }


__all__ = [
    "CCA",
    "STOCK_WEIGHTS_WARNING",
    "CCALayoutError",
    "RingBlock",
    "concentric_mask",
    "concentric_positions",
    "grid_block",
    "kept_block",
    "newline_grid_block",
    "num_rings",
    "ring_block",
    "ring_sizes",
    "rings",
    "block_rings",
]
