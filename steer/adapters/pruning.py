"""Visual-token pruning, the family side: encode a call's images while scoring their tokens, keep some.

The backend (`steer.backends.transformers.prune`) shortens the prompt; the adapter knows how a family's
images are encoded, scored and packed. :class:`PruningAdapter` is the mixin with the shared steps; a family
overrides :meth:`PruningAdapter.select` (which tokens of each image to keep and how they are packed) and
:meth:`PruningAdapter.score_hook` (how its tower's tokens are scored).
"""

from __future__ import annotations

import inspect
import threading
from collections.abc import Callable
from typing import Any, cast

from torch import Tensor, nn

from steer.edits.artifacts import KeptBlock, PrunedImage
from steer.errors import VisionPruningError

Keep = Callable[[Tensor, "Tensor | None"], Tensor]

#: One encode-with-scoring at a time per process: the scoring hook and (LLaVA-NeXT) the packing wrapper are put
#: on the shared modules for the duration of one encode, so two threads pruning at once take turns.
_ENCODE_LOCK = threading.Lock()


def kept_blocks(blocks: tuple[Any, ...], offsets: Tensor) -> list[KeptBlock]:
    """The stock ``blocks`` of one image (image-relative) with the kept tokens of each: a sent token at stock
    index ``o`` belongs to the block holding ``o``."""
    offsets = offsets.long().cpu()
    out = []
    for block in blocks:
        inside = (offsets >= block.start) & (offsets < block.end)
        if not bool(inside.any()):
            continue
        first = int(inside.nonzero()[0])
        out.append(KeptBlock(block=block, sent_start=first, kept=offsets[inside] - block.start))
    return out


class PruningAdapter:
    """Mixin for adapters whose images can be pruned (the methods below use ``self`` as an `Adapter`)."""

    model: nn.Module

    def encoder_kwargs(self, kwargs: dict[str, Any]) -> dict[str, Any]:
        """The call's keyword arguments that ``get_image_features`` takes, besides ``pixel_values``."""
        fn = cast(Any, self).image_encoder.get_image_features
        names = [n for n in inspect.signature(fn).parameters if n not in ("kwargs", "pixel_values")]
        return {n: kwargs[n] for n in names if kwargs.get(n) is not None}

    def encode_pruned(
        self, kwargs: dict[str, Any], keep: Keep, layer: int, layout: str
    ) -> tuple[Any, list[PrunedImage]]:
        """Encode the call's images (``kwargs["pixel_values"]`` and the encoder's other inputs) with the
        visual-token scores of vision layer ``layer``; keep per image (or crop) ``keep(scores, valid)``.

        Returns the encoder output holding only the kept features (what the model takes as
        ``mm_encoder_outputs["image"]``) and one :class:`~steer.edits.artifacts.PrunedImage` per image in
        batch order.
        """
        encoder = self.encoder_kwargs(kwargs)
        scores: list[Tensor] = []
        packed: list[PrunedImage] = []
        adapter: Any = self
        with _ENCODE_LOCK:
            hook = adapter.vision_attention(layer).register_forward_pre_hook(
                self.score_hook(scores, encoder), with_kwargs=True
            )
            extra = self.pack_wrapper(keep, scores, layout, packed)
            try:
                out = adapter.image_encoder.get_image_features(
                    pixel_values=kwargs["pixel_values"], **encoder, return_dict=True
                )
            finally:
                hook.remove()
                if extra is not None:
                    extra()
        if not scores:
            raise VisionPruningError(f"the scoring layer {layer} of the vision tower did not run while encoding")
        return out, self.select(out, scores, keep, encoder, layout, packed)

    # ---- family parts ------------------------------------------------------------------------------------
    def score_hook(self, scores: list[Tensor], encoder: dict[str, Any]) -> Callable[..., None]:
        """A forward pre-hook (with kwargs) for the scoring vision attention module appending its scores."""
        raise NotImplementedError

    def pack_wrapper(
        self, keep: Keep, scores: list[Tensor], layout: str, packed: list[PrunedImage]
    ) -> Callable[[], None] | None:
        """Install whatever the family needs while encoding (appending its pruned images to ``packed``); returns
        the function that undoes it (or None)."""
        return None

    def select(
        self, out: Any, scores: list[Tensor], keep: Keep, encoder: dict[str, Any], layout: str,
        packed: list[PrunedImage],
    ) -> list[PrunedImage]:
        """Keep the top tokens of every image in ``out.pooler_output`` (in place); one PrunedImage each."""
        adapter: Any = self
        features = self.image_features(out)
        per_image = self.split_scores(scores[-1], features)
        kept_features, images = [], []
        for i, (feature, score) in enumerate(zip(features, per_image)):
            n = int(feature.shape[0])
            if score.numel() != n:
                raise VisionPruningError(f"image {i} has {n} features but {score.numel()} scores")
            kept = keep(score, None)
            t = int(kept.numel())
            kept_features.append(feature[kept.to(feature.device)])
            record: dict[str, Any] = {"kept": kept.cpu(), "N": n, "T": t, "sent": t, "stock": n, "offsets": kept.cpu()}
            meta = self.image_meta(encoder, i)
            if meta is not None:
                record["grid"] = meta
            blocks = kept_blocks(adapter.image_blocks(n, meta), kept)
            images.append(PrunedImage(sent=t, stock=n, offsets=kept.cpu(), blocks=blocks, record=record))
        self.set_image_features(out, kept_features, images)
        return images

    def image_features(self, out: Any) -> list[Tensor]:
        """The projected features of every encoded image (crop, tile, sub-image) in prompt order, each [n, D]."""
        return list(out.pooler_output)

    def set_image_features(self, out: Any, kept: list[Tensor], images: list[PrunedImage]) -> None:
        """Put the kept features back into the encoder output in the form the model takes (default: a list)."""
        out.pooler_output = kept

    def split_scores(self, scores: Tensor, features: list[Tensor]) -> list[Tensor]:
        """Per-image scores from what the scoring hook appended (one row per image by default)."""
        return list(scores)

    def image_meta(self, encoder: dict[str, Any], index: int) -> Any:
        """The size / grid of image ``index`` from the encoder inputs (None when the family has none)."""
        return None


__all__ = ["Keep", "PruningAdapter", "kept_blocks"]
