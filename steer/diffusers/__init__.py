"""steer.diffusers: the public names for Stable Diffusion pipelines (SD 1.x / 2.x, SDXL); no logic lives here.

    import steer
    h = steer.apply(pipe, "astar", tokens=["cat", "dog"])         # A-STAR; also "attend_and_excite"
    images = h.pipe("a cat and a dog").images                      # from_pipe pipeline on the same modules
    h.remove()

    with steer.apply(pipe, "detector_guidance", objects=["a red cat", "a blue dog"]):
        images = pipe("a red cat and a blue dog").images           # the caller's own pipeline

Where things are: the methods in `steer.methods.diffusion` (astar, attend_and_excite, detector_guidance; losses,
detection, token positions), the pipeline edit kinds in `steer.edits.pipeline`, everything that touches a
pipeline in `steer.backends.diffusers` (adapter, processors, runtime, from_pipe pipelines, handle, map grids).
``python -m steer.diffusers.demo`` writes before/after images. diffusers itself is imported only when a
pipeline is steered (or a name below that needs it is used).
"""

from typing import Any

from steer.backends.diffusers.families import PIPELINE_FAMILIES, SUPPORTED_PIPELINES
from steer.edits.pipeline import LatentUpdate, ProcessorEdit
from steer.errors import SteerInputError
from steer.methods.diffusion.astar import AStar
from steer.methods.diffusion.attend_and_excite import AttendAndExcite
from steer.methods.diffusion.detection import CamMaskProvider, Detection, ObjectMaps, StepInfo
from steer.methods.diffusion.detector_guidance import DetectorGuidance

_LAZY = {
    "AStarStableDiffusionPipeline": "steer.backends.diffusers.pipelines",
    "AStarStableDiffusionXLPipeline": "steer.backends.diffusers.pipelines",
    "PipelineSteering": "steer.backends.diffusers.handle",
    "attention_grid": "steer.backends.diffusers.maps",
    "save_attention_grid": "steer.backends.diffusers.maps",
    "pipeline_family": "steer.backends.diffusers.adapter",
    "apply_pipeline": "steer.api",
}
_RENAMED = {"apply_pipeline": "apply"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), _RENAMED.get(name, name))
    raise AttributeError(f"module 'steer.diffusers' has no attribute {name!r}")


__all__ = [
    "PIPELINE_FAMILIES",
    "SUPPORTED_PIPELINES",
    "AStar",
    "AStarStableDiffusionPipeline",
    "AStarStableDiffusionXLPipeline",
    "AttendAndExcite",
    "CamMaskProvider",
    "Detection",
    "DetectorGuidance",
    "LatentUpdate",
    "ObjectMaps",
    "PipelineSteering",
    "ProcessorEdit",
    "SteerInputError",
    "StepInfo",
    "apply_pipeline",
    "attention_grid",
    "pipeline_family",
    "save_attention_grid",
]
