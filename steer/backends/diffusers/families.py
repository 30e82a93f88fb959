"""The pipelines the diffusers backend steers and their family names (imports no diffusers: `steer.methods()`
lists the pipeline families from here)."""

from __future__ import annotations

#: Pipeline classes the backend steers (and their subclasses), with the family name methods declare.
SUPPORTED_PIPELINES: dict[str, str] = {
    "StableDiffusionPipeline": "sd",
    "StableDiffusionXLPipeline": "sdxl",
}
PIPELINE_FAMILIES: tuple[str, ...] = ("sd", "sdxl")

__all__ = ["PIPELINE_FAMILIES", "SUPPORTED_PIPELINES"]
