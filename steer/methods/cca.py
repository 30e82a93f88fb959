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
  decoded token get ``pos0 - Delta_total``. Installed as an :class:`~steer.edits.InputEdit` on the
  language model's ``position_ids`` (prefill and decode).
* **mask** (prefill): ``allowed[q, k] = ring(k) <= ring(q)`` when q and k are in the same block
  (bidirectional inside a ring, all outer rings, inner rings hidden), otherwise the ordinary causal
  ``k <= q`` with k not padding (different blocks: causal between them). Installed as an
  :class:`~steer.edits.AttentionMask` with ``mode="replace"`` on every decoder layer at prefill; decode
  rows are text rows and keep the model's mask.
* **Qwen2-VL / Qwen2.5-VL** (M-RoPE; our design): on the merged grid ``H' x W'`` an image at text
  position ``p0`` has stock ids ``t = p0, h = p0 + i, w = p0 + j`` and the next text at
  ``p0 + max(H', W')``. ``mrope="ring_t"``: ``t = p0 + ring`` (h, w, later text and ``rope_deltas``
  unchanged, since ``R <= max(H', W')``); ``"ring_all"``: ``t = h = w = p0 + ring``, later tokens shift by
  ``max(H', W') - R`` (text resumes at ``p0 + R``) and ``rope_deltas = max_pos + 1 - seq_len``;
  ``"mask_only"``: stock ids. Installed by wrapping the model's ``get_rope_index``
  (:class:`~steer.edits.MethodWrap`). Video tokens are untouched.
* **LLaVA-NeXT** (our extrapolation): ``next_blocks="base"`` rings only the base block (the first
  ``(image_size / patch)^2`` tokens of each image); the high-res grid and its newline tokens keep raster
  order (shifted by Delta) and the causal mask. ``"all"`` makes the unpadded high-res grid
  ``Hhr x Whr`` a second ringed block (``V = Hhr * (Whr + 1)`` with the newlines); each newline token takes
  the ring of the last token of its row.

* **FasterVLM** (pruned blocks): each image run holds only FasterVLM's kept tokens; they keep the rings of
  their original (i, j) (``kept`` / ``offsets`` of the record FasterVLM leaves in
  ``forward.scratch["fastervlm"]``), R stays the full grid's, ``Delta += V_kept - R`` and the mask is
  ``ring(k) <= ring(q)`` among the kept tokens. LLaVA-NeXT: the base block's kept tokens (``"all"``: also the
  kept high-res tokens, stock layout only). With FasterVLM ``positions="original"`` the walk runs on the
  stock (gapped) ids with ``Delta += N - R`` and FasterVLM's gap is taken off again (it adds it after this
  edit), so the LLM gets CCA's ids of the unpruned prompt at the kept columns (for LLaVA-1.5 the same ids as
  ``"contiguous"``). Qwen: FasterVLM's ``get_rope_index`` wrapper runs CCA's on the unpruned prompt and keeps
  the kept columns, which gives the same rule; CCA lays out the mask and the state from the record.

Masks, positions and Delta are computed per row (batches, left padding, beams). CCA was trained into its
published checkpoint; on stock weights it is an experimental ablation (a ``UserWarning`` says so unless
``trained_checkpoint=True``).
"""

from __future__ import annotations

import inspect
import math
import warnings
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, cast

import torch

from steer.edits import AttentionMask, Edit, EditContext, InputEdit, MethodWrap, ModuleHook
from steer.errors import SteerError
from steer.registry import Method, param, register

if TYPE_CHECKING:
    from steer.adapters.families import Qwen2VLAdapter

STOCK_WEIGHTS_WARNING = (
    "CCA was trained into its checkpoint; on stock weights it is an experimental ablation "
    "(pass trained_checkpoint=True if these weights were trained with CCA)"
)


class CCALayoutError(SteerError, ValueError):
    """The image tokens of a prompt cannot be laid out as CCA's grids."""


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


def _runs(row: torch.Tensor) -> list[tuple[int, int]]:
    """[start, end) of each run of True in a 1-D bool tensor."""
    flags = row.to("cpu", torch.bool).tolist()
    out: list[tuple[int, int]] = []
    start = None
    for i, flag in enumerate(flags):
        if flag and start is None:
            start = i
        elif not flag and start is not None:
            out.append((start, i))
            start = None
    if start is not None:
        out.append((start, len(flags)))
    return out


ImageInfo = tuple[int, Any]
"""(token count, meta) of one image in prompt order; meta is the image size (LLaVA-NeXT), the
``(t, h, w)`` grid (Qwen) or None."""


def _split(runs: list[tuple[int, int]], queue: list[tuple[int, Any]] | None) -> list[tuple[int, int, Any]]:
    """Split runs of image tokens into per-image spans ``(start, end, meta)``, consuming ``queue`` in order.

    ``queue`` is the whole batch's list of ``(count, meta)`` (mutated); without it each run is one image.
    """
    spans: list[tuple[int, int, Any]] = []
    for start, end in runs:
        if queue is None:
            spans.append((start, end, None))
            continue
        pos = start
        while pos < end:
            if not queue:
                raise CCALayoutError(
                    "CCA: the prompt holds more image tokens than the images passed with it describe "
                    "(image placeholders and images do not match)"
                )
            n, meta = queue.pop(0)
            if pos + n > end:
                raise CCALayoutError(
                    f"CCA: an image of {n} tokens does not fit the run of image tokens [{start}, {end}) "
                    "(image placeholders and images do not match)"
                )
            spans.append((pos, pos + n, meta))
            pos += n
    return spans


def _llava_blocks(start: int, end: int) -> list[RingBlock]:
    """LLaVA-1.5: an image's V tokens are a square ``sqrt(V) x sqrt(V)`` raster grid."""
    v = end - start
    g = math.isqrt(v)
    if g * g != v:
        raise CCALayoutError(
            f"CCA: an image block of {v} tokens (sequence [{start}, {end})) is not a square grid and the model "
            "gives no grid for it; LLaVA-1.5 needs sqrt(V) x sqrt(V) image tokens per image "
            "(vision_feature_select_strategy='default', one image per <image> placeholder)"
        )
    return [grid_block(start, g, g)]


def next_image_layout(config: Any, image_size: Sequence[int]) -> tuple[int, int, tuple[int, int]]:
    """LLaVA-NeXT, one image of ``image_size`` (H, W): (its token count, base tokens n*n, unpadded
    high-res grid (Hhr, Whr)); the count is ``n*n + Hhr * (Whr + 1)`` (a newline after each row)."""
    from transformers.models.llava_next.modeling_llava_next import get_anyres_image_grid_shape, unpad_image

    vision = config.vision_config
    n = vision.image_size // vision.patch_size
    size = [int(x) for x in image_size]
    tiles_h, tiles_w = get_anyres_image_grid_shape(size, config.image_grid_pinpoints, vision.image_size)
    unpadded = unpad_image(torch.zeros(1, int(tiles_h) * n, int(tiles_w) * n), torch.tensor(size))
    hh, ww = int(unpadded.shape[1]), int(unpadded.shape[2])
    return n * n + hh * (ww + 1), n * n, (hh, ww)


def _next_blocks(config: Any, start: int, end: int, image_size: Any, mode: str) -> list[RingBlock]:
    """LLaVA-NeXT: the base block (``mode="base"``), plus the high-res grid with newlines (``"all"``)."""
    vision = config.vision_config
    n = vision.image_size // vision.patch_size
    v = end - start
    if v < n * n:
        raise CCALayoutError(f"CCA: a LLaVA-NeXT image of {v} tokens is smaller than its {n} x {n} base grid")
    blocks = [grid_block(start, n, n, kind="base")]
    if mode == "all" and v > n * n + 1:
        if image_size is None:
            raise CCALayoutError(
                "CCA next_blocks='all' needs each image's size (image_sizes from the LLaVA-NeXT processor) to find "
                "its high-res grid"
            )
        count, base, (hh, ww) = next_image_layout(config, image_size)
        if count != v:
            raise CCALayoutError(
                f"CCA: a LLaVA-NeXT image of {v} tokens does not match its high-res grid {hh} x {ww} "
                f"({base} base + {hh} x ({ww} + newline) = {count})"
            )
        blocks.append(newline_grid_block(start + base, hh, ww))
    return blocks


def _qwen_blocks(start: int, end: int, grid: Any, merge: int) -> list[RingBlock]:
    """Qwen: one block on the merged ``h/merge x w/merge`` grid of ``image_grid_thw`` (t = 1)."""
    if grid is None:
        raise CCALayoutError(
            "CCA on Qwen needs image_grid_thw (from the processor) to lay out the image grid"
        )
    t, h, w = (int(x) for x in grid)
    hh, ww = h // merge, w // merge
    if t != 1 or hh * ww != end - start:
        raise CCALayoutError(
            f"CCA: an image run of {end - start} tokens does not match its grid (t={t}, {hh} x {ww} merged); "
            "CCA handles still images (t = 1), one grid per run of image tokens"
        )
    return [grid_block(start, hh, ww)]


def _qwen_rope_blocks(image: torch.Tensor, grids: torch.Tensor, merge: int) -> list[list[RingBlock]]:
    """Blocks as ``get_rope_index`` sees them: one grid of ``image_grid_thw`` per run, in batch order."""
    queue = [(None, g) for g in grids.tolist()]
    out = []
    for row in image:
        blocks = []
        for start, end in _runs(row):
            if not queue:
                raise CCALayoutError("CCA: more runs of image tokens than rows of image_grid_thw")
            blocks.extend(_qwen_blocks(start, end, queue.pop(0)[1], merge))
        out.append(blocks)
    return out


def kept_block(start: int, h: int, w: int, kept: torch.Tensor, kind: str = "image", gaps: bool = False) -> RingBlock:
    """The kept tokens of a pruned ``h x w`` raster block (FasterVLM): ``kept`` are their stock raster indices
    (increasing); each keeps the ring of its original (i, j) and R stays the full grid's. ``gaps``: positions
    keep the pruned gaps (FasterVLM ``positions="original"``), so the block spans its ``h * w`` stock positions."""
    kept = kept.long().cpu()
    ring = rings(h, w).flatten()[kept]
    return RingBlock(
        start, (h, w), ring, num_rings(h, w), kind, kept=kept,
        span=h * w if gaps else None, lead=int(kept[0]) if gaps and kept.numel() else 0,
    )


def pruned_record(ectx: EditContext) -> dict[str, Any] | None:
    """FasterVLM's record of the current call when it pruned the prompt (``forward.scratch["fastervlm"]``):
    ``samples`` (per un-expanded row, per image: ``kept``, ``N``, ``T``, ``sent``, ``stock``, ``offsets``...),
    ``origin`` [B, L'] (each token's column in the caller's row, -1 = new padding), ``positions``,
    ``next_layout`` and ``gap`` [B, L'] (the shift FasterVLM adds to the position ids after CCA's edit, or None)."""
    record = ectx.forward.scratch.get("fastervlm")
    return record if isinstance(record, dict) and record.get("samples") is not None else None


# --------------------------------------------------------------------------------------------------
# the method


@register
class CCA(Method):
    """Concentric Causal Attention as core edits (equations in the module docstring).

    Edits: an :class:`~steer.edits.InputEdit` on the language model's ``position_ids`` (1-D RoPE) or a
    :class:`~steer.edits.MethodWrap` of ``get_rope_index`` (Qwen ``ring_t`` / ``ring_all``); an
    :class:`~steer.edits.AttentionMask` (``mode="replace"``, prefill, all layers); a wrap of
    ``get_image_features`` and a pre-hook on the model that note each image's token count and size
    (``generate`` hands the model encoded features only) and refuse a chunked prefill with image tokens.

    ``Steering.state["cca"]``: ``variant`` (``"1d"``, ``"1d/base"``, ``"1d/all"``, ``"ring_t"``,
    ``"ring_all"``, ``"mask_only"``), ``switches`` (positions, mask as installed) and ``samples``: per row
    of the last prompt (1-D: rows of the prefill, beams included; Qwen positions: rows as
    ``get_rope_index`` saw them, before beam expansion) a dict with ``blocks`` (start, grid, R, tokens,
    kind), ``deltas`` (Delta after each block), ``position_range`` (min, max id of the real tokens) and
    ``position_ids`` (the ids of the real tokens; [3, T] for Qwen). A block FasterVLM pruned also lists
    ``kept`` (its tokens' indices in the stock block) and ``tokens`` is the kept count; with FasterVLM, Qwen
    samples are per prefill row and ``deltas`` under ``positions="original"`` count stock positions.
    """

    name = "cca"
    description = (
        "Concentric Causal Attention: concentric position ids and a ring-based 2-D causal mask for image "
        "tokens (trained method; experimental on stock weights)."
    )
    stage = "input"
    needs_image_tokens = False  # text-only rows keep stock positions and mask (spec: Decisions)
    handles_pruned_tokens = True  # lays out FasterVLM's kept tokens by their original (i, j)

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
        """The model builds Qwen's M-RoPE ids (else 1-D RoPE)."""
        return self.adapter.position_scheme == "mrope"

    @property
    def positions_on(self) -> bool:
        p = self.params
        return bool(p.positions) and not (self.uses_mrope and p.mrope == "mask_only")

    @property
    def variant(self) -> str:
        if self.uses_mrope:
            return self.params.mrope if self.positions_on else "mask_only"
        if self.adapter.family == "llava-next":
            return f"1d/{self.params.next_blocks}"
        return "1d"

    def is_noop(self) -> bool:
        return not self.positions_on and not self.params.mask

    def edits(self) -> list[Edit]:
        if not self.params.trained_checkpoint:
            warnings.warn(STOCK_WEIGHTS_WARNING, UserWarning, stacklevel=3)
        self.state.update(
            variant=self.variant,
            switches={"positions": self.positions_on, "mask": bool(self.params.mask)},
            samples=[],
        )
        self._features: dict[int, tuple[weakref.ref, Any]] = {}
        self._last_rope: tuple[torch.Tensor, list] | None = None
        out: list[Edit] = [
            MethodWrap(
                module=lambda a: cast(torch.nn.Module, a.model.model),
                name="get_image_features",
                fn=self._image_features,
            ),
            ModuleHook(module=lambda a: a.model, fn=self._capture_images, pre=True),
        ]
        if self.positions_on:
            if self.uses_mrope:
                out.append(
                    MethodWrap(
                        module=lambda a: cast("Qwen2VLAdapter", a).rope_index_owner,
                        name="get_rope_index",
                        fn=self._rope_index,
                    )
                )
            else:
                out.append(InputEdit(fn=self._positions))
        if self.uses_mrope and not self.params.mask:
            out.append(InputEdit(fn=self._note_layout))
        if self.params.mask:
            out.append(AttentionMask(layers="all", mask=self._mask, mode="replace", phase="prefill"))
        return out

    # ---- which image is where -------------------------------------------------------------------
    def _cache(self, ectx: EditContext) -> dict[Any, Any]:
        return ectx.forward.scratch.setdefault(("cca", id(self)), {})

    def _image_features(self, original: Any, args: tuple, kwargs: dict, ectx: EditContext) -> Any:
        """Wrap ``get_image_features``: remember each image's size / grid by its feature tensor.

        ``generate`` encodes the images before the prefill and hands the model only the features
        (``mm_encoder_outputs``, expanded for beams), so the per-image sizes are looked up from them.
        """
        out = original(*args, **kwargs)
        bound = inspect.signature(original).bind_partial(*args, **kwargs).arguments
        meta = bound.get("image_sizes", bound.get("image_grid_thw"))
        features = getattr(out, "pooler_output", None)
        self._features = {}
        if (
            isinstance(meta, torch.Tensor)
            and isinstance(features, (list, tuple))
            and len(features) == len(meta)
        ):
            for feature, m in zip(features, meta.tolist()):
                self._features[id(feature)] = (weakref.ref(feature), m)
        return out

    def _images_from_kwargs(self, kwargs: dict[str, Any]) -> list[ImageInfo] | None:
        """(count, meta) of every image of the batch in prompt order, or None when unknown."""
        encoded = kwargs.get("mm_encoder_outputs")
        image = encoded.get("image") if isinstance(encoded, dict) else None
        features = getattr(image, "pooler_output", None)
        if isinstance(features, (list, tuple)):
            infos: list[ImageInfo] = []
            for feature in features:
                ref, meta = self._features.get(id(feature), (None, None))
                infos.append((int(feature.shape[0]), meta if ref is not None and ref() is feature else None))
            return infos
        if isinstance(features, torch.Tensor) and features.dim() == 3:
            return [(int(features.shape[1]), None)] * int(features.shape[0])
        if self.uses_mrope:
            grids = kwargs.get("image_grid_thw")
            if isinstance(grids, torch.Tensor):
                merge = int(self.adapter.config.vision_config.spatial_merge_size)
                return [(int(t * h * w) // merge**2, (t, h, w)) for t, h, w in grids.tolist()]
            return None
        if self.adapter.family == "llava-next":
            sizes = kwargs.get("image_sizes")
            if isinstance(sizes, torch.Tensor):
                return [(next_image_layout(self.adapter.config, s)[0], s) for s in sizes.tolist()]
            return None
        counts = self.adapter.tokens_per_image(kwargs)
        return [(n, None) for n in counts] if counts else None

    def _capture_images(self, module: Any, args: tuple, kwargs: dict, ectx: EditContext) -> None:
        """Top-level pre-hook: at prefill note the images; later calls must not bring image tokens."""
        if ectx.phase == "prefill":
            self._cache(ectx)["images"] = self._images_from_kwargs(kwargs)
            return None
        ids = kwargs.get("input_ids", args[0] if args else None)
        if isinstance(ids, torch.Tensor) and ids.dim() == 2 and ids.shape[1] > 1:
            if bool(self.adapter.image_token_mask(ids).any()):
                raise CCALayoutError(
                    "CCA needs each image block inside one prefill call; this call continues a cache with image "
                    "tokens (chunked prefill). Prefill the whole prompt in one call."
                )
        return None

    def blocks_for(self, input_ids: torch.Tensor, images: list[ImageInfo] | None) -> list[list[RingBlock]]:
        """The ringed blocks of every row of a prompt (sequence indices), from its image tokens and the
        images' (count, meta) in prompt order (None: each run of image tokens is one image)."""
        queue = list(images) if images is not None else None
        family = self.adapter.family
        merge = int(self.adapter.config.vision_config.spatial_merge_size) if self.uses_mrope else 1
        out = []
        for row in self.adapter.image_token_mask(input_ids):
            blocks: list[RingBlock] = []
            for start, end, meta in _split(_runs(row), queue):
                if self.uses_mrope:
                    blocks.extend(_qwen_blocks(start, end, meta, merge))
                elif family == "llava-next":
                    blocks.extend(
                        _next_blocks(self.adapter.config, start, end, meta, self.params.next_blocks)
                    )
                else:
                    blocks.extend(_llava_blocks(start, end))
            out.append(blocks)
        return out

    def pruned_blocks_for(self, input_ids: torch.Tensor, record: dict[str, Any]) -> list[list[RingBlock]]:
        """The ringed blocks of a prompt FasterVLM pruned: each image run holds its ``sent`` tokens, and the
        ringed ones keep the rings of their original (i, j) (``kept`` / ``offsets`` of FasterVLM's record).
        Rows of ``input_ids`` may be the record's rows expanded (beams)."""
        samples = record["samples"]
        rows = input_ids.shape[0]
        if not samples or rows % len(samples):
            raise CCALayoutError(
                f"CCA: the prompt has {rows} rows but FasterVLM pruned {len(samples)}; cannot match them"
            )
        repeat = rows // len(samples)
        gaps = record.get("gap") is not None
        out = []
        for r, row in enumerate(self.adapter.image_token_mask(input_ids)):
            queue = [(int(image["sent"]), image) for image in samples[r // repeat]]
            blocks: list[RingBlock] = []
            for start, end, image in _split(_runs(row), queue):
                blocks.extend(self._pruned_image(start, end, image, gaps, record))
            if queue:
                raise CCALayoutError("CCA: FasterVLM kept more images than the pruned prompt holds")
            out.append(blocks)
        return out

    def _pruned_image(
        self, start: int, end: int, image: dict[str, Any], gaps: bool, record: dict[str, Any]
    ) -> list[RingBlock]:
        """The ringed blocks of one pruned image occupying ``[start, end)``."""
        if self.uses_mrope:
            t, h, w = (int(x) for x in image["grid"])
            merge = int(self.adapter.config.vision_config.spatial_merge_size)
            if t != 1:
                raise CCALayoutError(f"CCA handles still images (t = 1); FasterVLM kept tokens of a t={t} grid")
            return [kept_block(start, h // merge, w // merge, image["kept"])]
        if self.adapter.family == "llava-next":
            base = image["crops"][0]
            n = math.isqrt(int(base["N"]))
            blocks = [kept_block(start, n, n, base["kept"], kind="base", gaps=gaps)]
            if self.params.next_blocks == "all" and "unpadded" in image:
                if record.get("next_layout") == "spatial":
                    raise CCALayoutError(
                        "CCA next_blocks='all' needs FasterVLM's stock LLaVA-NeXT layout (unpadded grid with "
                        "newlines); next_layout='spatial' has no such grid: use next_blocks='base'"
                    )
                hh, ww = (int(x) for x in image["unpadded"])
                t = int(base["T"])
                offsets = image["offsets"][t:].long().cpu() - n * n
                ring = newline_grid_block(0, hh, ww).ring[offsets]
                blocks.append(
                    RingBlock(
                        start + t, (hh, ww), ring, num_rings(hh, ww), "highres", kept=offsets,
                        span=hh * (ww + 1) if gaps else None, lead=int(offsets[0]) if gaps else 0,
                    )
                )
            return blocks
        n = int(image["N"])
        g = math.isqrt(n)
        if g * g != n or int(image["sent"]) != end - start:
            raise CCALayoutError(
                f"CCA: a pruned LLaVA image of {n} stock tokens is not a square grid (or its {image['sent']} kept "
                f"tokens do not fill [{start}, {end}))"
            )
        return [kept_block(start, g, g, image["offsets"], gaps=gaps)]

    def _layout(self, ectx: EditContext) -> list[list[RingBlock]] | None:
        cache = self._cache(ectx)
        if "blocks" not in cache:
            ctx = ectx.forward
            blocks = None
            pruned = pruned_record(ectx)
            if ctx.prompt_ids is not None:
                if pruned is not None:
                    blocks = self.pruned_blocks_for(ctx.prompt_ids, pruned)
                else:
                    blocks = self.blocks_for(ctx.prompt_ids, cache.get("images"))
                if not any(blocks):
                    blocks = None
            cache["blocks"] = blocks
            if blocks is not None and pruned is not None and self.positions_on and self.uses_mrope:
                self._record(self._pruned_mrope_samples(blocks, pruned, ctx.padding_mask))
            elif blocks is not None and not self.positions_on:
                self._record(
                    [
                        {
                            "blocks": [b.describe() for b in row],
                            "deltas": [],
                            "position_range": None,
                            "position_ids": None,
                        }
                        for row in blocks
                    ]
                )
        return cache["blocks"]

    def _pruned_mrope_samples(
        self, blocks: list[list[RingBlock]], record: dict[str, Any], real: torch.Tensor | None
    ) -> list[dict[str, Any]]:
        """Qwen + FasterVLM: FasterVLM's ``get_rope_index`` wrapper ran CCA's on the unpruned prompt and kept
        the columns of the kept tokens; the state shows the pruned blocks and the ids of the kept columns."""
        full, shifts = self._last_rope or (None, None)
        origin = record["origin"]
        repeat = len(blocks) // origin.shape[0]
        samples = []
        for r, row in enumerate(blocks):
            b = r // repeat
            used = None
            if full is not None and b < full.shape[1]:
                keep = real[r].cpu().bool() if real is not None else torch.ones(origin.shape[1], dtype=torch.bool)
                cols = origin[b][keep & (origin[b] >= 0)]
                if cols.numel() and int(cols.max()) < full.shape[2]:
                    used = full[:, b, cols.to(full.device)].detach().cpu()
            samples.append(
                {
                    "blocks": [blk.describe() for blk in row],
                    "deltas": list(shifts[b]) if shifts is not None and b < len(shifts) else [],
                    "position_range": (int(used.min()), int(used.max())) if used is not None else None,
                    "position_ids": used,
                }
            )
        return samples

    def _note_layout(self, kwargs: dict[str, Any], ectx: EditContext) -> None:
        """Qwen with the mask off: lay out a pruned prompt at prefill anyway, for the state."""
        if ectx.phase == "prefill" and pruned_record(ectx) is not None:
            self._layout(ectx)
        return None

    def _record(self, samples: list[dict[str, Any]]) -> None:
        self.state["samples"] = samples

    # ---- 1-D positions (LLaVA-1.5, LLaVA-NeXT) --------------------------------------------------
    def _positions(self, kwargs: dict[str, Any], ectx: EditContext) -> dict[str, Any] | None:
        """``position_ids <- concentric ids`` at prefill; ``pos0 - Delta_total`` per row at decode."""
        blocks = self._layout(ectx)
        if blocks is None:
            return None
        ctx = ectx.forward
        cache = self._cache(ectx)
        ref = kwargs.get("inputs_embeds")
        if ref is None:
            ref = kwargs.get("input_ids")
        assert ref is not None  # the VLM calls its text model (this hook's target) with inputs_embeds
        batch, length = ref.shape[0], ref.shape[1]
        pos0 = kwargs.get("position_ids")
        if pos0 is None:
            pos0 = torch.arange(ctx.past_length, ctx.past_length + length, device=ref.device)[None]
        pos0 = pos0.expand(batch, length)
        if ctx.phase == "prefill":
            real = ctx.padding_mask
            # FasterVLM positions="original" adds its per-column gap after this edit: the concentric ids are
            # computed on the gapped (stock) ids and the gap is taken off again here
            pruned = pruned_record(ectx)
            gap = pruned.get("gap") if pruned is not None else None
            if gap is not None:
                if gap.shape[1] != length or batch % gap.shape[0]:
                    raise CCALayoutError("CCA: FasterVLM's pruned prompt does not match this prefill call")
                gap = gap.to(pos0.device, pos0.dtype).repeat_interleave(batch // gap.shape[0], dim=0)
            else:
                gap = torch.zeros_like(pos0)
            rows, totals, samples = [], [], []
            for b in range(batch):
                r = real[b, -length:] if real is not None else None
                new, deltas = concentric_positions(pos0[b] + gap[b], blocks[b], r)
                rows.append(new - gap[b])
                totals.append(deltas[-1] if deltas else 0)
                used = new[r.to(new.device)] if r is not None else new
                samples.append(
                    {
                        "blocks": [blk.describe() for blk in blocks[b]],
                        "deltas": deltas,
                        "position_range": (int(used.min()), int(used.max())) if used.numel() else None,
                        "position_ids": used.detach().cpu(),
                    }
                )
            cache["delta"] = torch.tensor(totals, dtype=pos0.dtype, device=pos0.device)
            self._record(samples)
            new_pos = torch.stack(rows)
        else:
            delta = cache.get("delta")
            if delta is None:
                return None
            if delta.shape[0] != batch:
                if batch % delta.shape[0]:
                    raise CCALayoutError(
                        f"CCA: decode batch {batch} does not match the prefill batch {delta.shape[0]}"
                    )
                delta = delta.repeat_interleave(batch // delta.shape[0])
            new_pos = pos0 - delta.to(pos0.device)[:, None]
        kwargs["position_ids"] = new_pos
        return kwargs

    # ---- M-RoPE positions (Qwen2-VL, Qwen2.5-VL) ------------------------------------------------
    def _rope_index(self, original: Any, args: tuple, kwargs: dict, ectx: EditContext) -> Any:
        """Wrap ``get_rope_index``: overwrite each image span's ids (``ring_t``: t; ``ring_all``: t, h, w)."""
        position_ids, deltas = original(*args, **kwargs)
        bound = inspect.signature(original).bind_partial(*args, **kwargs).arguments
        input_ids = bound.get("input_ids")
        types = bound.get("mm_token_type_ids")
        if input_ids is None or types is None or bound.get("image_grid_thw") is None:
            return position_ids, deltas
        attention_mask = bound.get("attention_mask")
        real = (
            attention_mask.bool()
            if isinstance(attention_mask, torch.Tensor)
            else torch.ones_like(input_ids, dtype=torch.bool)
        )
        image = (types == 1) & real
        merge = int(self.adapter.config.vision_config.spatial_merge_size)
        blocks = _qwen_rope_blocks(image, bound["image_grid_thw"], merge)
        position_ids = position_ids.clone()
        ring_all = self.params.mrope == "ring_all"
        new_deltas = deltas.clone()
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
            used = position_ids[:, b, real[b]]
            if ring_all and row_blocks:
                new_deltas[b] = used.max() + 1 - int(real[b].sum())
            samples.append(
                {
                    "blocks": [blk.describe() for blk in row_blocks],
                    "deltas": shifts,
                    "position_range": (int(used.min()), int(used.max())) if used.numel() else None,
                    "position_ids": used.detach().cpu(),
                }
            )
        self._record(samples)
        self._last_rope = (position_ids, [s["deltas"] for s in samples])
        return position_ids, new_deltas

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
        cache = self._cache(ectx)
        key = ("mask", q_len, k_len)
        if key not in cache:
            real = ctx.padding_mask
            rows = [
                concentric_mask(q_len, blocks[b], real[b, -q_len:] if real is not None else None, k_len)
                for b in range(len(blocks))
            ]
            cache[key] = torch.stack(rows)[:, None]
        return cache[key]
