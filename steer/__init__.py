"""steer: training-free, inference-time interventions for vision-language models and Stable Diffusion.

    handle = steer.apply(model, "image_attention", scale=2.0)   # patch in place; also a context manager
    out = model.generate(**inputs)
    handle.remove()                                             # the model is bit-for-bit what it was
"""

from steer import edits
from steer.api import apply, methods  # `steer.methods` is the function; the package stays importable
from steer.backends.lifecycle import Steering
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
from steer.recipe_files import Recipe, recipe
from steer.registry import Method, param, register

__version__ = "0.1.0"

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
    "apply",
    "edits",
    "methods",
    "param",
    "recipe",
    "register",
]
