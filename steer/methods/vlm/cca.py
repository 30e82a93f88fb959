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
  (bidirectional inside a ring, all outer rings, inner rings hidden), otherwise the ordinary causal
  ``k <= q`` with k not padding (different blocks: causal between them). Installed as an
  :class:`~steer.edits.kinds.AttentionMask` with ``mode="replace"`` on every decoder layer at prefill; decode
  rows are text rows and keep the model's mask.
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

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch

from steer.edits.artifacts import PrunedLayout
from steer.edits.context import EditContext
from steer.edits.facts import ImageBlock, ImageLayout, runs
from steer.edits.kinds import AttentionMask, Edit, Positions
from steer.errors import ImageLayoutError
from steer.registry import Method, param, register

STOCK_WEIGHTS_WARNING = (
    "CCA was trained into its checkpoint; on stock weights it is an experimental ablation "
    "(pass trained_checkpoint=True if these weights were trained with CCA)"
)


#: The image tokens of a prompt cannot be laid out as CCA's grids (`steer.errors.ImageLayoutError`).
CCALayoutError = ImageLayoutError


# --------------------------------------------------------------------------------------------------
# pure functions


def rings(h: int, w: int) -> torch.Tensor:
    """Ring index of every cell of an ``h x w`` grid: ``ring(i, j) = min(i, j, h-1-i, w-1-j)``; [h, w] long.

    The outer border is ring 0, the centre the largest ring ``R - 1`` with ``R = ceil(min(h, w) / 2)``.
    """
    if h < 1 or w < 1:
        raise ValueError(f"a grid needs positive sides, got {h} x {w}")
    i = torch.arange(h)[:, None]
    j = torch.arange(w)[None, :]
    return torch.minimum(torch.minimum(i, j), torch.minimum(h - 1 - i, w - 1 - j))


def num_rings(h: int, w: int) -> int:
    """``R = ceil(min(h, w) / 2)``."""
    return math.ceil(min(h, w) / 2)


def ring_sizes(h: int, w: int) -> list[int]:
    """Tokens per ring, outer to inner: ``2(h-2r) + 2(w-2r) - 4`` while both sides are >= 2, else the rest."""
    return torch.bincount(rings(h, w).flatten(), minlength=num_rings(h, w)).tolist()


@dataclass(frozen=True)
class RingBlock:
    """One ringed image block of a row: ``[start, start + len(ring))`` in sequence indices.

    ``ring`` holds the ring of each token in sequence order ([V] long); ``grid`` the (H, W) it comes
    from; ``R`` the number of rings; ``kind`` is ``"image"`` (LLaVA-1.5, Qwen), ``"base"`` or
    ``"highres"`` (LLaVA-NeXT).

    A block FasterVLM pruned holds only its kept tokens: ``kept`` are their indices in the block's stock
    (unpruned) token run and ``ring`` their rings at their original (i, j); ``R`` stays the original grid's.
    With FasterVLM's ``positions="original"`` the block still covers ``span`` stock positions (its stock
    length) and its first kept token sits ``lead`` positions after the block's stock start.
    """

    start: int
    grid: tuple[int, int]
    ring: torch.Tensor
    R: int
    kind: str = "image"
    kept: torch.Tensor | None = None
    span: int | None = None
    lead: int = 0

    @property
    def length(self) -> int:
        return int(self.ring.numel())

    @property
    def end(self) -> int:
        return self.start + self.length

    @property
    def shift(self) -> int:
        """What the block adds to Delta: ``V - R`` (V = the positions the block covers)."""
        return (self.length if self.span is None else self.span) - self.R

    def describe(self) -> dict[str, Any]:
        out = {"start": self.start, "grid": self.grid, "R": self.R, "tokens": self.length, "kind": self.kind}
        if self.kept is not None:
            out["kept"] = self.kept.tolist()
        return out


def grid_block(start: int, h: int, w: int, kind: str = "image") -> RingBlock:
    """A block of ``h x w`` tokens in raster order."""
    return RingBlock(start, (h, w), rings(h, w).flatten(), num_rings(h, w), kind)


def newline_grid_block(start: int, h: int, w: int, kind: str = "highres") -> RingBlock:
    """A raster ``h x w`` grid with one newline token after each row (LLaVA-NeXT's high-res part).

    The newline of row i takes the ring of the row's last token, ``ring(i, w - 1)``.
    """
    grid = rings(h, w)
    with_newline = torch.cat([grid, grid[:, -1:]], dim=1)
    return RingBlock(start, (h, w), with_newline.flatten(), num_rings(h, w), kind)


def concentric_positions(
    pos0: torch.Tensor, blocks: Sequence[RingBlock], real: torch.Tensor | None = None
) -> tuple[torch.Tensor, list[int]]:
    """Concentric 1-D position ids of one row, and the shift Delta after each block.

    ``pos0`` [T]: the row's stock position ids. Tokens before a block get ``pos0 - Delta``; block tokens
    get ``(pos0[start] - Delta) + ring``; then ``Delta += V - R``; tokens after the last block get
    ``pos0 - Delta_total`` (decoded tokens too: see :meth:`CCA`). Padding (``real`` False) keeps ``pos0``.
    A pruned block (:class:`RingBlock` ``kept``) uses ``V = `` its kept count, or its stock ``span`` with the
    block's stock start ``pos0[start] - lead`` as base when the positions keep the pruned gaps.
    Returns ``(positions [T], [Delta after block 1, Delta after block 2, ...])``.
    """
    new = pos0.clone()
    deltas: list[int] = []
    delta = 0
    cursor = 0
    for block in sorted(blocks, key=lambda b: b.start):
        if block.start < cursor:
            raise CCALayoutError(f"image blocks overlap at sequence index {block.start}")
        new[cursor : block.start] = pos0[cursor : block.start] - delta
        base = pos0[block.start] - block.lead - delta
        new[block.start : block.end] = base + block.ring.to(pos0.device, pos0.dtype)
        delta += block.shift
        deltas.append(delta)
        cursor = block.end
    new[cursor:] = pos0[cursor:] - delta
    if real is not None:
        new = torch.where(real.to(new.device).bool(), new, pos0)
    return new, deltas


def concentric_mask(
    length: int,
    blocks: Sequence[RingBlock],
    real: torch.Tensor | None = None,
    key_len: int | None = None,
    device: torch.device | None = None,
) -> torch.Tensor:
    """The concentric causal mask of one row: bool [length, key_len] (True = may attend).

    Query and key in the same block: ``ring(k) <= ring(q)``; otherwise causal ``k <= q`` with k real
    (``real`` [length], default all real). Keys beyond ``length`` (empty static-cache slots) are hidden.
    """
    key_len = length if key_len is None else key_len
    q = torch.arange(length, device=device)[:, None]
    k = torch.arange(key_len, device=device)[None, :]
    allowed = k <= q
    if real is not None:
        keys = torch.zeros(key_len, dtype=torch.bool, device=device)
        keys[:length] = real.to(device).bool()[:length]
        allowed = allowed & keys[None, :]
    for block in blocks:
        r = block.ring.to(device)
        allowed[block.start : block.end, block.start : block.end] = r[None, :] <= r[:, None]
    return allowed


# --------------------------------------------------------------------------------------------------
# layouts: where each row's blocks are


def block_rings(block: ImageBlock) -> torch.Tensor:
    """The ring of every token of a stock block in sequence order (newline slots take their row's last ring)."""
    assert block.grid is not None
    h, w = block.grid
    grid = rings(h, w)
    if block.newline:
        grid = torch.cat([grid, grid[:, -1:]], dim=1)
    return grid.flatten()


def ring_block(block: ImageBlock) -> RingBlock:
    """A stock block of the image layout as a :class:`RingBlock` (sequence indices)."""
    assert block.grid is not None
    h, w = block.grid
    if block.newline:
        return newline_grid_block(block.start, h, w, kind=block.kind)
    return grid_block(block.start, h, w, kind=block.kind)


def kept_block(start: int, h: int, w: int, kept: torch.Tensor, kind: str = "image", gaps: bool = False) -> RingBlock:
    """The kept tokens of a pruned ``h x w`` raster block: ``kept`` are their stock raster indices
    (increasing); each keeps the ring of its original (i, j) and R stays the full grid's. ``gaps``: positions
    keep the pruned gaps (stock ids), so the block spans its ``h * w`` stock positions."""
    kept = kept.long().cpu()
    ring = rings(h, w).flatten()[kept]
    return RingBlock(
        start, (h, w), ring, num_rings(h, w), kind, kept=kept,
        span=h * w if gaps else None, lead=int(kept[0]) if gaps and kept.numel() else 0,
    )  # fmt: skip


def _split_runs(
    runs: list[tuple[int, int]], queue: list[tuple[int, Any]]
) -> list[tuple[int, int, Any]]:
    """Split runs of image tokens into per-image spans ``(start, end, item)``, consuming ``queue`` in order."""
    spans: list[tuple[int, int, Any]] = []
    for start, end in runs:
        pos = start
        while pos < end:
            if not queue:
                raise CCALayoutError(
                    "CCA: the prompt holds more image tokens than the images passed with it describe "
                    "(image placeholders and images do not match)"
                )
            n, item = queue.pop(0)
            if pos + n > end:
                raise CCALayoutError(
                    f"CCA: an image of {n} tokens does not fit the run of image tokens [{start}, {end}) "
                    "(image placeholders and images do not match)"
                )
            spans.append((pos, pos + n, item))
            pos += n
    return spans


# --------------------------------------------------------------------------------------------------
# the method


@register
class CCA(Method):
    """Concentric Causal Attention as declarations (equations in the module docstring).

    Edits: a :class:`~steer.edits.kinds.Positions` edit (concentric 1-D ids, or Qwen ``ring_t`` /
    ``ring_all``) and an :class:`~steer.edits.kinds.AttentionMask` (``mode="replace"``, prefill, all layers).
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
            out.append(AttentionMask(layers="all", mask=self._mask, mode="replace", phase="prefill"))
        return out

    # ---- which image is where -------------------------------------------------------------------
    def blocks_for(self, layout: ImageLayout) -> list[list[RingBlock]]:
        """The ringed blocks of every row of an unpruned prompt (sequence indices), from the image layout."""
        out = []
        for row in layout.rows:
            blocks: list[RingBlock] = []
            for image in row:
                for block in image.blocks:
                    if block.kind not in self.ringed_kinds:
                        continue
                    if block.problem is not None or block.grid is None:
                        raise CCALayoutError(
                            f"CCA: {block.problem} (image tokens [{block.start}, {block.end}))"
                        )
                    blocks.append(ring_block(block))
            out.append(blocks)
        return out

    def pruned_blocks_for(self, input_ids: torch.Tensor, image_mask: torch.Tensor, layout: PrunedLayout) -> list[list[RingBlock]]:
        """The ringed blocks of a pruned prompt: each image run holds its ``sent`` tokens, and the ringed ones
        keep the rings of their original (i, j). Rows of ``input_ids`` may be the layout's rows expanded (beams)."""
        samples = layout.images
        rows = input_ids.shape[0]
        if not samples or rows % len(samples):
            raise CCALayoutError(
                f"CCA: the prompt has {rows} rows but the pruning kept images for {len(samples)}; cannot match them"
            )
        repeat = rows // len(samples)
        gaps = layout.positions == "original" and not self.uses_mrope
        out = []
        for r in range(rows):
            queue = [(int(image.sent), image) for image in samples[r // repeat]]
            blocks: list[RingBlock] = []
            for start, _end, image in _split_runs(runs(image_mask[r]), queue):
                for kept in image.blocks:
                    block = kept.block
                    if block.kind not in self.ringed_kinds:
                        continue
                    if block.problem is not None or block.grid is None:
                        raise CCALayoutError(f"CCA next_blocks='all' needs a grid here: {block.problem}; use next_blocks='base'")
                    ring = block_rings(block)[kept.kept.long().cpu()]
                    h, w = block.grid
                    blocks.append(
                        RingBlock(
                            start + kept.sent_start, (h, w), ring, num_rings(h, w), block.kind, kept=kept.kept.long().cpu(),
                            span=block.length if gaps else None, lead=int(kept.kept[0]) if gaps and kept.kept.numel() else 0,
                        )
                    )  # fmt: skip
            if queue:
                raise CCALayoutError("CCA: the pruning kept more images than the pruned prompt holds")
            out.append(blocks)
        return out

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
    def _mask(self, ectx: EditContext) -> torch.Tensor | None:
        """[B, 1, Lq, Lk] bool: ``ring(k) <= ring(q)`` inside a block, causal with real keys elsewhere."""
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
        return memo[key]


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
