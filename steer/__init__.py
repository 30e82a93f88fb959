"""steer: training-free, inference-time interventions for vision-language models and Stable Diffusion.

    handle = steer.apply(model, "image_attention", scale=2.0)   # patch in place; also a context manager
    out = model.generate(**inputs)
    handle.remove()                                             # the model is bit-for-bit what it was

Importing ``steer`` is cheap: torch, transformers and the methods load on first use of a name below (so the
``steer`` command starts fast).
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import TYPE_CHECKING, Any

from steer.errors import (
    AlreadySteeredError,
    ConcurrentSteeringError,
    ImageLayoutError,
    IncompatibleMethodsError,
    InvalidParameterError,
    MissingImageTokensError,
    SteerError,
    SteeringRemovedError,
    SteerInputError,
    UnknownMethodError,
    UnsupportedModelError,
    VisionPruningError,
)

__version__ = "0.1.0"

#: public name -> the module that defines it (imported on first access)
_LAZY = {
    "apply": "steer.api",
    "recipe": "steer.recipe_files",
    "Recipe": "steer.recipe_files",
    "Steering": "steer.backends.lifecycle",
    "Method": "steer.registry",
    "param": "steer.registry",
    "register": "steer.registry",
}
_SUBMODULES = ("edits", "zoo", "adapters", "evals", "kernels", "registry", "api")

if TYPE_CHECKING:
    from steer import edits
    from steer.api import apply
    from steer.backends.lifecycle import Steering
    from steer.recipe_files import Recipe, recipe
    from steer.registry import Method, param, register


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    if name in _SUBMODULES:
        return importlib.import_module(f"steer.{name}")
    raise AttributeError(f"module 'steer' has no attribute {name!r}")


def _methods(*args: Any, **kwargs: Any) -> Any:
    """Every registered method (see `steer.api.methods`)."""
    return importlib.import_module("steer.api").methods(*args, **kwargs)


class _SteerModule(types.ModuleType):
    """``steer.methods`` is the function listing the methods; importing the package ``steer.methods`` (which the
    import system would bind to the same name) leaves it so."""

    @property
    def methods(self) -> Any:
        return _methods

    @methods.setter
    def methods(self, value: Any) -> None:
        pass


sys.modules[__name__].__class__ = _SteerModule

__all__ = [
    "AlreadySteeredError",
    "ConcurrentSteeringError",
    "ImageLayoutError",
    "IncompatibleMethodsError",
    "InvalidParameterError",
    "Method",
    "MissingImageTokensError",
    "Recipe",
    "SteerError",
    "Steering",
    "SteeringRemovedError",
    "SteerInputError",
    "UnknownMethodError",
    "UnsupportedModelError",
    "VisionPruningError",
    "__version__",
    "apply",
    "edits",
    "methods",
    "param",
    "recipe",
    "register",
]
