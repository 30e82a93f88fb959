"""LLaVA-NeXT (`LlavaNextForConditionalGeneration`): anyres crops packed into one run of tokens per image.

An image of size (H, W) gives a base crop of ``n x n`` tokens (n = image_size / patch) followed by the unpadded
high-res grid of its tiles, ``rows x cols`` tokens with one image-newline token after each row. The newline
placeholders are image tokens too (they carry ``image_token_id``).
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Sequence
from typing import Any, cast

import torch
from torch import Tensor

from steer.adapters.base import Adapter, ImageInfo
from steer.adapters.llava import ClipScoring
from steer.adapters.pruning import Keep, PruningAdapter, kept_blocks
from steer.edits.artifacts import KeptBlock, PrunedImage
from steer.edits.facts import ImageBlock
from steer.errors import VisionPruningError

SPATIAL_PROBLEM = (
    "the tiles of a pruned image are packed in the spatial layout (no unpadding, no newlines), which has no "
    "high-res grid"
)


def anyres_grid(
    image_size: Sequence[int], grid_pinpoints: Any, crop_size: int, patch_size: int
) -> tuple[int, int, int, Tensor]:
    """Tiles of an image (H, W): ``(nh, nw, n, cells)``: the tile grid, the crop side in tokens and the
    stitched-grid cell ids (``r * nw * n + c``) that survive ``unpad_image``, [rows, cols]."""
    from transformers.models.llava_next.modeling_llava_next import get_anyres_image_grid_shape, unpad_image

    n = crop_size // patch_size
    size = [int(v) for v in image_size]
    nh, nw = (int(v) for v in get_anyres_image_grid_shape(size, grid_pinpoints, crop_size))
    cells = torch.arange(nh * n * nw * n).view(1, nh * n, nw * n)
    return nh, nw, n, unpad_image(cells, torch.tensor(size))[0]


def next_image_layout(config: Any, image_size: Sequence[int]) -> tuple[int, int, tuple[int, int]]:
    """One image of ``image_size`` (H, W): (its token count, base tokens n*n, unpadded high-res grid
    (Hhr, Whr)); the count is ``n*n + Hhr * (Whr + 1)`` (a newline after each row)."""
    vision = config.vision_config
    _, _, n, cells = anyres_grid(image_size, config.image_grid_pinpoints, int(vision.image_size), int(vision.patch_size))
    hh, ww = int(cells.shape[0]), int(cells.shape[1])
    return n * n + hh * (ww + 1), n * n, (hh, ww)


def next_token_counts(
    image_size: Sequence[int], grid_pinpoints: Any, crop_size: int, patch_size: int, t: int, layout: str = "stock"
) -> tuple[int, int]:
    """(stock, pruned) token count of one image of ``image_size`` (H, W) with T = ``t`` kept per crop.

    stock: ``n^2 + rows (cols + 1)``; pruned ``stock`` layout: ``T + sum_c min(T, valid_c) + rows``;
    ``spatial``: ``T (1 + nh nw)``. Functions of the image size only.
    """
    nh, nw, n, cells = anyres_grid(image_size, grid_pinpoints, crop_size, patch_size)
    rows, cols = cells.shape
    stock = n * n + rows * (cols + 1)
    if layout == "spatial":
        return stock, t * (1 + nh * nw)
    width = nw * n
    flat = cells.flatten()
    tile = (flat // width // n) * nw + (flat % width) // n
    valid = torch.bincount(tile, minlength=nh * nw)
    return stock, t + int(valid.clamp(max=t).sum()) + rows


class LlavaNextAdapter(ClipScoring, PruningAdapter, Adapter):
    """`LlavaNextForConditionalGeneration`: base crop + unpadded high-res grid with newlines, one run per image."""

    family = "llava-next"
    model_classes = ("LlavaNextForConditionalGeneration",)
    image_block_kinds = ("base", "highres")

    @property
    def tokens_per_crop(self) -> int | None:
        vision = self.config.vision_config
        return (int(vision.image_size) // int(vision.patch_size)) ** 2

    def images_from_inputs(self, inputs: dict[str, Any]) -> list[ImageInfo] | None:
        sizes = inputs.get("image_sizes")
        if not isinstance(sizes, torch.Tensor):
            return None
        return [(next_image_layout(self.config, s)[0], tuple(s)) for s in sizes.tolist()]

    def image_pixels(self, inputs: dict[str, Any]) -> list[torch.Tensor]:
        """``pixel_values`` [N, P, C, H, W] (P crops per image, padded to the longest): each image's [P, C, H, W]."""
        pixels = inputs["pixel_values"]
        if isinstance(pixels, (list, tuple)):
            return [p if p.dim() == 4 else p[None] for p in pixels]
        return [pixels[i] for i in range(pixels.shape[0])]

    def with_image_pixels(self, inputs: dict[str, Any], images: list[torch.Tensor]) -> torch.Tensor:
        pixels = inputs["pixel_values"]
        if isinstance(pixels, (list, tuple)):
            return [x.to(p.dtype) for x, p in zip(images, pixels)]  # type: ignore[return-value]
        return torch.stack(images, dim=0).to(pixels.dtype)

    def image_blocks(self, count: int, meta: Any) -> tuple[ImageBlock, ...]:
        """The base ``n x n`` grid, then (when the run holds more than one newline) the high-res grid with
        newline slots, from the image size ``meta``."""
        vision = self.config.vision_config
        n = int(vision.image_size) // int(vision.patch_size)
        if count < n * n:
            return (ImageBlock(0, count, "base", problem=f"an image of {count} tokens is smaller than its {n} x {n} base grid"),)
        blocks = [ImageBlock(0, n * n, "base", (n, n))]
        if count > n * n + 1:
            if meta is None:
                blocks.append(
                    ImageBlock(n * n, count, "highres", problem="the high-res grid needs each image's size "
                               "(image_sizes from the LLaVA-NeXT processor)")
                )
            else:
                expected, base, (hh, ww) = next_image_layout(self.config, meta)
                if expected != count:
                    blocks.append(
                        ImageBlock(
                            n * n, count, "highres",
                            problem=f"a LLaVA-NeXT image of {count} tokens does not match its high-res grid {hh} x {ww} "
                            f"({base} base + {hh} x ({ww} + newline) = {expected})",
                        )
                    )  # fmt: skip
                else:
                    blocks.append(ImageBlock(n * n, count, "highres", (hh, ww), newline=True))
        return tuple(blocks)

    def chat_prompt(self, question: str, n_images: int = 1) -> str:
        """LLaVA-v1.6-Mistral style: ``"[INST] <image>\\n{question} [/INST]"``."""
        return "[INST] " + "<image>\n" * n_images + f"{question} [/INST]"

    # ---- pruning: per crop top-T by its own [CLS] row, packed per layout ----------------------------
    def pack_wrapper(
        self, keep: Keep, scores: list[Tensor], layout: str, packed_images: list[PrunedImage]
    ) -> Callable[[], None] | None:
        """While encoding, ``pack_image_features`` keeps each crop's tokens and packs them (see :meth:`_pack_one`)."""
        owner = cast(Any, self.image_encoder)
        original = owner.pack_image_features
        had = "pack_image_features" in owner.__dict__
        previous = owner.__dict__.get("pack_image_features")

        def pack(*args: Any, **kwargs: Any) -> Any:
            bound = inspect.signature(original).bind(*args, **kwargs).arguments
            features = list(bound["image_features"])
            sizes = bound["image_sizes"]
            newline = bound.get("image_newline")
            if not scores:
                raise VisionPruningError("the scoring layer of the vision tower did not run while encoding")
            per_image = torch.split(scores[-1], [int(f.shape[0]) for f in features])
            packed = []
            for feature, score, size in zip(features, per_image, sizes):
                tokens, image = self._pack_one(feature, score, [int(v) for v in size.tolist()], newline, keep, layout)
                packed.append(tokens)
                packed_images.append(image)
            lens = torch.tensor([int(t.shape[0]) for t in packed], dtype=torch.long, device=packed[0].device)
            return packed, lens

        owner.__dict__["pack_image_features"] = pack

        def undo() -> None:
            if had:
                owner.__dict__["pack_image_features"] = previous
            else:
                owner.__dict__.pop("pack_image_features", None)

        return undo

    def select(
        self, out: Any, scores: list[Tensor], keep: Keep, encoder: dict[str, Any], layout: str,
        packed: list[PrunedImage],
    ) -> list[PrunedImage]:
        if not packed:
            raise VisionPruningError("LLaVA-NeXT features were not packed through pack_image_features")
        return packed

    def _pack_one(
        self, feature: Tensor, score: Tensor, size: list[int], newline: Tensor | None, keep: Keep, layout: str
    ) -> tuple[Tensor, PrunedImage]:
        """One image: ``feature`` [crops, N, D] (projected), ``score`` [crops, N]; returns (tokens, image)."""
        config = self.config
        crops, n_tok, dim = feature.shape
        spatial = layout == "spatial"
        base = keep(score[0], None)
        t = int(base.numel())
        crop_records = [{"kept": base.cpu(), "N": n_tok, "T": t}]
        parts = [feature[0, base.to(feature.device)]]
        nl = newline.to(feature.device, feature.dtype)[None] if newline is not None else None
        record: dict[str, Any] = {"N": n_tok, "T": t, "image_size": tuple(size), "crops": crop_records}
        offsets = [base.cpu()]
        if crops == 1:
            if nl is not None and not spatial:
                parts.append(nl)
                offsets.append(torch.tensor([n_tok]))
            record["stock"] = n_tok + (1 if nl is not None else 0)
        else:
            vision = config.vision_config
            nh, nw, n, cells = anyres_grid(size, config.image_grid_pinpoints, int(vision.image_size), int(vision.patch_size))
            if crops - 1 != nh * nw or n * n != n_tok:
                raise VisionPruningError(
                    f"a LLaVA-NeXT image of size {size} has {crops - 1} tiles of {n_tok} tokens, "
                    f"expected {nh} x {nw} tiles of {n * n}"
                )
            height, width = nh * n, nw * n
            grid = torch.arange(height * width).view(height, width)
            kept_cells = grid if spatial else cells
            valid = torch.zeros(height * width, dtype=torch.bool)
            valid[kept_cells.flatten()] = True
            rows = torch.arange(height)[:, None].expand(height, width)
            cols = torch.arange(width)[None, :].expand(height, width)
            tile_of = ((rows // n) * nw + cols // n).flatten()
            local_of = ((rows % n) * n + cols % n).flatten()
            selected = torch.zeros(height * width, dtype=torch.bool)
            for c in range(nh * nw):
                cell_ids = (tile_of == c).nonzero().flatten()
                order = torch.argsort(local_of[cell_ids])
                cell_ids = cell_ids[order]  # tile-local raster order
                valid_c = valid[cell_ids]
                local = keep(score[c + 1].cpu(), valid_c)
                selected[cell_ids[local]] = True
                crop_records.append({"kept": local, "N": n_tok, "T": int(local.numel()), "valid": int(valid_c.sum())})
            table = feature[1:].reshape(nh, nw, n, n, dim).permute(0, 2, 1, 3, 4).reshape(height * width, dim)
            if nl is not None and not spatial:
                table = torch.cat([table, nl], dim=0)
            r, w = cells.shape  # the stock (unpadded) grid, whatever the layout
            stride = int(w) + (1 if nl is not None else 0)
            order_ids: list[int] = []
            if spatial:
                order_ids = grid.flatten()[selected].tolist()
            else:
                for i, row in enumerate(cells):
                    chosen = selected[row]
                    order_ids.extend(row[chosen].tolist())
                    offsets.append(n_tok + i * stride + chosen.nonzero().flatten())
                    if nl is not None:
                        order_ids.append(height * width)
                        offsets.append(torch.tensor([n_tok + i * stride + int(w)]))
            parts.append(table[torch.tensor(order_ids, dtype=torch.long, device=table.device)])
            record.update(grid=(nh, nw), unpadded=(int(r), int(w)))
            record["stock"] = n_tok + int(r) * (int(w) + (1 if nl is not None else 0))
        tokens = torch.cat(parts, dim=0)
        sent = int(tokens.shape[0])
        record["sent"] = sent
        # each sent token's index in the image's stock token run (spatial: not a subset of it)
        record["offsets"] = torch.arange(sent) if spatial else torch.cat(offsets).long()
        stock = int(record["stock"])
        if spatial:
            n = math.isqrt(n_tok)
            blocks = [KeptBlock(ImageBlock(0, n_tok, "base", (n, n)), 0, base.cpu())]
            if sent > t:
                blocks.append(KeptBlock(ImageBlock(n_tok, stock, "highres", problem=SPATIAL_PROBLEM), t, torch.arange(sent - t)))
        else:
            blocks = kept_blocks(self.image_blocks(stock, size), record["offsets"])
        image = PrunedImage(sent=sent, stock=stock, offsets=record["offsets"], blocks=blocks, record=record)
        return tokens, image


__all__ = ["LlavaNextAdapter", "anyres_grid", "next_image_layout", "next_token_counts"]
