"""CCA's geometry as pure functions (specs/cca.md): concentric rings of a token grid, ringed blocks, the
concentric position ids of a row and its concentric causal mask. Used by `steer.methods.vlm.cca`."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from steer.edits.artifacts import PrunedLayout
from steer.edits.facts import ImageBlock, ImageLayout, runs
from steer.errors import ImageLayoutError

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
            raise ImageLayoutError(f"image blocks overlap at sequence index {block.start}")
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


def block_region(
    length: int, blocks: Sequence[RingBlock], key_len: int | None = None, device: torch.device | None = None
) -> torch.Tensor:
    """bool [length, key_len]: query and key are in the same block (where CCA's ring rule applies)."""
    key_len = length if key_len is None else key_len
    region = torch.zeros(length, key_len, dtype=torch.bool, device=device)
    for block in blocks:
        region[block.start : block.end, block.start : block.end] = True
    return region


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


def split_runs(runs_: list[tuple[int, int]], queue: list[tuple[int, Any]]) -> list[tuple[int, int, Any]]:
    """Split runs of image tokens into per-image spans ``(start, end, item)``, consuming ``queue`` in order."""
    spans: list[tuple[int, int, Any]] = []
    for start, end in runs_:
        pos = start
        while pos < end:
            if not queue:
                raise ImageLayoutError(
                    "CCA: the prompt holds more image tokens than the images passed with it describe "
                    "(image placeholders and images do not match)"
                )
            n, item = queue.pop(0)
            if pos + n > end:
                raise ImageLayoutError(
                    f"CCA: an image of {n} tokens does not fit the run of image tokens [{start}, {end}) "
                    "(image placeholders and images do not match)"
                )
            spans.append((pos, pos + n, item))
            pos += n
    return spans


def layout_blocks(layout: ImageLayout, kinds: tuple[str, ...]) -> list[list[RingBlock]]:
    """Per row, the ringed blocks of the image layout whose kind is in ``kinds``; a block without a grid is
    an :class:`~steer.errors.ImageLayoutError` naming why."""
    out = []
    for row in layout.rows:
        blocks: list[RingBlock] = []
        for image in row:
            for block in image.blocks:
                if block.kind not in kinds:
                    continue
                if block.problem is not None or block.grid is None:
                    raise ImageLayoutError(f"CCA: {block.problem} (image tokens [{block.start}, {block.end}))")
                blocks.append(ring_block(block))
        out.append(blocks)
    return out


def pruned_blocks(
    input_ids: torch.Tensor, image_mask: torch.Tensor, layout: PrunedLayout, kinds: tuple[str, ...], gaps: bool
) -> list[list[RingBlock]]:
    """The ringed blocks of a pruned prompt: each image run holds its ``sent`` tokens and the kept tokens of a
    stock block keep the rings of their original (i, j), R the full grid's. ``gaps``: the positions keep the
    pruned gaps (a block spans its stock length, its first kept token ``lead`` after its stock start). Rows of
    ``input_ids`` may be the layout's rows expanded (beams)."""
    samples = layout.images
    rows = input_ids.shape[0]
    if not samples or rows % len(samples):
        raise ImageLayoutError(
            f"CCA: the prompt has {rows} rows but the pruning kept images for {len(samples)}; cannot match them"
        )
    repeat = rows // len(samples)
    out = []
    for r in range(rows):
        queue: list[tuple[int, Any]] = [(int(image.sent), image) for image in samples[r // repeat]]
        blocks: list[RingBlock] = []
        for start, _end, image in split_runs(runs(image_mask[r]), queue):
            for kept in image.blocks:
                block = kept.block
                if block.kind not in kinds:
                    continue
                if block.problem is not None or block.grid is None:
                    raise ImageLayoutError(
                        f"CCA next_blocks='all' needs a grid here: {block.problem}; use next_blocks='base'"
                    )
                indices = kept.kept.long().cpu()
                h, w = block.grid
                blocks.append(
                    RingBlock(
                        start + kept.sent_start, (h, w), block_rings(block)[indices], num_rings(h, w), block.kind,
                        kept=indices, span=block.length if gaps else None,
                        lead=int(indices[0]) if gaps and indices.numel() else 0,
                    )
                )  # fmt: skip
        if queue:
            raise ImageLayoutError("CCA: the pruning kept more images than the pruned prompt holds")
        out.append(blocks)
    return out


__all__ = [
    "RingBlock",
    "block_region",
    "block_rings",
    "concentric_mask",
    "concentric_positions",
    "grid_block",
    "kept_block",
    "layout_blocks",
    "pruned_blocks",
    "split_runs",
    "newline_grid_block",
    "num_rings",
    "ring_block",
    "ring_sizes",
    "rings",
]
