"""steer.diffusers: training-free interventions for Stable Diffusion pipelines (SD 1.x / 2.x, SDXL).

    import steer
    h = steer.apply(pipe, "astar", tokens=["cat", "dog"])         # A-STAR; also "attend_and_excite"
    images = h.pipe("a cat and a dog").images                      # from_pipe pipeline on the same modules
    h.remove()

    with steer.apply(pipe, "detector_guidance", objects=["a red cat", "a blue dog"]):
        images = pipe("a red cat and a blue dog").images           # the caller's own pipeline

Layout: ``processors`` (recording and Detector Guidance attention processors), ``methods`` (the registered
methods and their controllers), ``losses`` (concept maps, A-STAR/A&E losses), ``detection`` (DG masks and the
CAM provider), ``pipelines`` (the from_pipe pipelines), ``runtime`` (per-UNet install/restore and hooks),
``plugin`` (apply and the handle), ``maps`` (saving map grids). diffusers itself is imported only when a
pipeline is steered (the registry imports ``steer.diffusers.methods`` to list the methods).
"""

from typing import Any

from steer.diffusers.common import SUPPORTED_PIPELINES, SteerInputError, pipeline_family
from steer.diffusers.detection import CamMaskProvider, Detection, ObjectMaps, StepInfo
from steer.diffusers.maps import attention_grid, save_attention_grid
from steer.diffusers.methods import AStar, AttendAndExcite, DetectorGuidance

_LAZY = {
    "AStarStableDiffusionPipeline": "steer.diffusers.pipelines",
    "AStarStableDiffusionXLPipeline": "steer.diffusers.pipelines",
    "PipelineSteering": "steer.diffusers.plugin",
    "apply_pipeline": "steer.diffusers.plugin",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'steer.diffusers' has no attribute {name!r}")

__all__ = [
    "SUPPORTED_PIPELINES",
    "AStar",
    "AStarStableDiffusionPipeline",
    "AStarStableDiffusionXLPipeline",
    "AttendAndExcite",
    "CamMaskProvider",
    "Detection",
    "DetectorGuidance",
    "ObjectMaps",
    "PipelineSteering",
    "SteerInputError",
    "StepInfo",
    "apply_pipeline",
    "attention_grid",
    "pipeline_family",
    "save_attention_grid",
]
