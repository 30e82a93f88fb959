"""The low-level edit API: interventions declared as data (data only; no model is touched here).

- `steer.edits.kinds`: the edit dataclasses (`HeadScale`, `GroupReweight`, `Transform`, `Collect`,
  `SourceRun`, `Positions`, `PruneVisionTokens`, ...);
- `steer.edits.sites`: the site names edits act at, resolved per family by the adapters;
- `steer.edits.context`: what an edit callback receives (`EditContext`, `ForwardFacts`);
- `steer.edits.facts`: model and prompt facts (`ModelInfo`, `ImageLayout`);
- `steer.edits.artifacts`: typed artifacts one method computes for another (`PrunedLayout`).
"""

from steer.edits.artifacts import Artifact, KeptBlock, PrunedImage, PrunedLayout
from steer.edits.context import CallStore, EditContext, ForwardFacts
from steer.edits.facts import ImageBlock, ImageLayout, ImageSpan, ModelInfo
from steer.edits.kinds import (
    MAIN,
    AttentionEdit,
    AttentionMask,
    Collect,
    Edit,
    GroupReweight,
    HeadOutputEdit,
    HeadScale,
    InputEdit,
    LayerEdit,
    LayerSelection,
    LogitsTransform,
    MethodWrap,
    ModuleHook,
    Positions,
    PruneVisionTokens,
    ResidualAdd,
    SourceRun,
    TensorEdit,
    Transform,
    evaluate,
    layers_of,
)
from steer.edits.sites import SITES

__all__ = [
    "MAIN",
    "SITES",
    "Artifact",
    "AttentionEdit",
    "AttentionMask",
    "CallStore",
    "Collect",
    "Edit",
    "EditContext",
    "ForwardFacts",
    "GroupReweight",
    "HeadOutputEdit",
    "HeadScale",
    "ImageBlock",
    "ImageLayout",
    "ImageSpan",
    "InputEdit",
    "KeptBlock",
    "LayerEdit",
    "LayerSelection",
    "LogitsTransform",
    "MethodWrap",
    "ModelInfo",
    "ModuleHook",
    "Positions",
    "PruneVisionTokens",
    "PrunedImage",
    "PrunedLayout",
    "ResidualAdd",
    "SourceRun",
    "TensorEdit",
    "Transform",
    "evaluate",
    "layers_of",
]
