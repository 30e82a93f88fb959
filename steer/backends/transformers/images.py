"""Image metadata across ``generate``: which size / grid each encoded image had.

``generate`` encodes the images before the prefill and hands the model only the features
(``mm_encoder_outputs``), dropping ``image_sizes`` / ``image_grid_thw``. A wrapper around the model's
``get_image_features`` notes each image's size / grid by its feature tensor, so the prefill can still lay
out every image's grid (`steer.adapters.base.Adapter.image_layout`).
"""

from __future__ import annotations

import inspect
import threading
import weakref
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from steer.adapters.base import Adapter, ImageInfo
    from steer.backends.transformers.runtime import Runtime


class ImageMetadata:
    """Per-runtime, per-thread record: id(feature tensor) -> (weak reference, the image's size or grid)."""

    def __init__(self) -> None:
        self._local = threading.local()

    @property
    def _features(self) -> dict[int, tuple[weakref.ref, Any]]:
        features = getattr(self._local, "features", None)
        if features is None:
            features = self._local.features = {}
        return features

    @_features.setter
    def _features(self, value: dict[int, tuple[weakref.ref, Any]]) -> None:
        self._local.features = value

    def install(self, runtime: Runtime) -> None:
        owner = runtime.adapter.image_encoder
        if not hasattr(owner, "get_image_features"):  # pragma: no cover - every supported family has one
            return

        def make(original: Any) -> Any:
            def get_image_features(*args: Any, **kwargs: Any) -> Any:
                out = original(*args, **kwargs)
                self.note(original, args, kwargs, out)
                return out

            return get_image_features

        runtime.wrap(owner, "get_image_features", make)

    def note(self, original: Any, args: tuple, kwargs: dict, out: Any) -> None:
        bound = inspect.signature(original).bind_partial(*args, **kwargs).arguments
        meta = bound.get("image_sizes", bound.get("image_grid_thw"))
        features = getattr(out, "pooler_output", None)
        self._features = {}
        if isinstance(meta, torch.Tensor) and isinstance(features, (list, tuple)) and len(features) == len(meta):
            for feature, m in zip(features, meta.tolist()):
                self._features[id(feature)] = (weakref.ref(feature), tuple(m))

    def meta_of(self, feature: Any) -> Any:
        ref, meta = self._features.get(id(feature), (None, None))
        return meta if ref is not None and ref() is feature else None

    def from_encoded(self, adapter: Adapter, encoded: Any) -> list[ImageInfo] | None:
        """(count, meta) of every image in ``mm_encoder_outputs`` (meta where it was noted when encoded)."""
        image = encoded.get("image") if isinstance(encoded, dict) else None
        features = getattr(image, "pooler_output", None)
        if features is None:
            return None
        meta = [self.meta_of(f) for f in features] if isinstance(features, (list, tuple)) else None
        return adapter.images_from_features(features, meta)

    def clear(self) -> None:
        self._features = {}


__all__ = ["ImageMetadata"]
