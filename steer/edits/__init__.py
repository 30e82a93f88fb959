"""The low-level edit API: interventions declared as data (data only; no model is touched here).

- `steer.edits.kinds`: the edit dataclasses (`HeadScale`, `GroupReweight`, `Transform`, `Collect`,
  `SourceRun`, `Positions`, `PruneVisionTokens`, ...);
- `steer.edits.sites`: the site names edits act at, resolved per family by the adapters;
- `steer.edits.context`: what an edit callback receives (`EditContext`, `ForwardFacts`);
- `steer.edits.facts`: model and prompt facts (`ModelInfo`, `ImageLayout`);
- `steer.edits.artifacts`: typed artifacts one method computes for another (`PrunedLayout`);
- `steer.edits.pipeline`: the diffusers pipeline kinds (`ProcessorEdit`, `LatentUpdate`) with their facts
  (`steer.edits.pipeline_facts`: `PipelineInfo`) and contexts (`steer.edits.pipeline_context`).
"""

from steer.edits.artifacts import Artifact, KeptBlock, PrunedImage, PrunedLayout
from steer.edits.context import CallStore, EditContext, ForwardFacts
from steer.edits.facts import ImageBlock, ImageLayout, ImageSpan, ModelInfo
from steer.edits.kinds import (
    MAIN,
    AttentionEdit,
    AttentionMask,
    BeamLookahead,
    BeamPolicy,
    BeamStep,
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
    ScoreEdit,
    SourceRun,
    TensorEdit,
    Transform,
    evaluate,
    layers_of,
)
from steer.edits.pipeline import (
    PROBE,
    AttnCall,
    GenerationFacts,
    LatentContext,
    LatentUpdate,
    PipelineContext,
    PipelineEdit,
    PipelineInfo,
    ProcessorEdit,
    StepContext,
    TokenizerInfo,
)
from steer.edits.sites import SITES

__all__ = [
    "MAIN",
    "PROBE",
    "SITES",
    "Artifact",
    "AttentionEdit",
    "AttentionMask",
    "AttnCall",
    "BeamLookahead",
    "BeamPolicy",
    "BeamStep",
    "CallStore",
    "Collect",
    "Edit",
    "EditContext",
    "ForwardFacts",
    "GenerationFacts",
    "GroupReweight",
    "HeadOutputEdit",
    "HeadScale",
    "ImageBlock",
    "ImageLayout",
    "ImageSpan",
    "InputEdit",
    "KeptBlock",
    "LayerEdit",
    "LatentContext",
    "LatentUpdate",
    "LayerSelection",
    "LogitsTransform",
    "MethodWrap",
    "ModelInfo",
    "ModuleHook",
    "PipelineContext",
    "PipelineEdit",
    "PipelineInfo",
    "Positions",
    "ProcessorEdit",
    "PruneVisionTokens",
    "PrunedImage",
    "PrunedLayout",
    "ResidualAdd",
    "ScoreEdit",
    "SourceRun",
    "StepContext",
    "TensorEdit",
    "TokenizerInfo",
    "Transform",
    "evaluate",
    "layers_of",
]
