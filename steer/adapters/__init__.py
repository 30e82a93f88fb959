"""Model-family adapters: the site table and the facts of each supported model class (one module per family)."""

from __future__ import annotations

from torch import nn

from steer.adapters.base import Adapter
from steer.adapters.gemma3 import Gemma3Adapter
from steer.adapters.internvl import InternVLAdapter
from steer.adapters.llava import LlavaAdapter
from steer.adapters.llava_next import LlavaNextAdapter
from steer.adapters.llava_onevision import LlavaOnevisionAdapter
from steer.adapters.qwen2_vl import Qwen2_5_VLAdapter, Qwen2VLAdapter
from steer.adapters.qwen3_vl import Qwen3VLAdapter
from steer.adapters.smolvlm import SmolVLMAdapter
from steer.errors import UnsupportedModelError

#: Every adapter, in the order families are listed to users.
ADAPTERS: tuple[type[Adapter], ...] = (
    LlavaAdapter,
    LlavaNextAdapter,
    Qwen2VLAdapter,
    Qwen2_5_VLAdapter,
    Qwen3VLAdapter,
    LlavaOnevisionAdapter,
    Gemma3Adapter,
    InternVLAdapter,
    SmolVLMAdapter,
)

#: The supported vision-language families (``Adapter.family``), e.g. ``"llava-1.5"``.
FAMILIES: tuple[str, ...] = tuple(a.family for a in ADAPTERS)


def supported_classes() -> list[str]:
    return [name for a in ADAPTERS for name in a.model_classes]


def adapter_class(family: str) -> type[Adapter]:
    """The adapter of ``family`` (``"llava-1.5"``...); ``KeyError`` if unknown."""
    for cls in ADAPTERS:
        if cls.family == family:
            return cls
    raise KeyError(family)


def adapter_for(model: nn.Module) -> Adapter:
    """The adapter for ``model``; raises :class:`UnsupportedModelError` naming the supported classes."""
    name = type(model).__name__
    for cls in ADAPTERS:
        if name in cls.model_classes:
            return cls(model)
    hint = ""
    if name.endswith("Model") and name.removesuffix("Model") + "ForConditionalGeneration" in supported_classes():
        hint = " Load the *ForConditionalGeneration class (it has the lm_head steer needs)."
    raise UnsupportedModelError(
        f"steer has no adapter for {name}. Supported model classes: {', '.join(supported_classes())}. "
        f"(Stable Diffusion pipelines are handled by steer's diffusers plugin.){hint}"
    )


__all__ = [
    "ADAPTERS",
    "FAMILIES",
    "Adapter",
    "Gemma3Adapter",
    "InternVLAdapter",
    "LlavaAdapter",
    "LlavaNextAdapter",
    "LlavaOnevisionAdapter",
    "Qwen2VLAdapter",
    "Qwen2_5_VLAdapter",
    "Qwen3VLAdapter",
    "SmolVLMAdapter",
    "adapter_class",
    "adapter_for",
    "supported_classes",
]
