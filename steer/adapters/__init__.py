"""Model-family adapters: where things are in each supported model class."""

from __future__ import annotations

from torch import nn

from steer.adapters.base import Adapter
from steer.adapters.families import (
    ADAPTERS,
    LlavaAdapter,
    LlavaNextAdapter,
    Qwen2_5_VLAdapter,
    Qwen2VLAdapter,
)
from steer.errors import UnsupportedModelError

FAMILIES: tuple[str, ...] = tuple(a.family for a in ADAPTERS)


def supported_classes() -> list[str]:
    return [name for a in ADAPTERS for name in a.model_classes]


def adapter_for(model: nn.Module) -> Adapter:
    """The adapter for ``model``; raises :class:`UnsupportedModelError` naming the supported classes."""
    name = type(model).__name__
    for cls in ADAPTERS:
        if name in cls.model_classes:
            return cls(model)
    hint = ""
    if name in ("LlavaModel", "LlavaNextModel", "Qwen2VLModel", "Qwen2_5_VLModel"):
        hint = " Load the *ForConditionalGeneration class (it has the lm_head steer needs)."
    raise UnsupportedModelError(
        f"steer has no adapter for {name}. Supported model classes: {', '.join(supported_classes())}. "
        f"(Stable Diffusion pipelines are handled by steer's diffusers plugin.){hint}"
    )


__all__ = [
    "Adapter",
    "FAMILIES",
    "LlavaAdapter",
    "LlavaNextAdapter",
    "Qwen2VLAdapter",
    "Qwen2_5_VLAdapter",
    "adapter_for",
    "supported_classes",
]
