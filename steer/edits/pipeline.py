"""The pipeline edit kinds: interventions on a diffusers Stable Diffusion pipeline, declared as data.

=================  ==============  =====================================================================
edit               site            what it does
=================  ==============  =====================================================================
`ProcessorEdit`    ``unet.attn2``  runs inside chosen cross-attention layers: read the explicit attention
                                   probabilities, or add a bias to the pre-softmax scores
`LatentUpdate`     ``latents``     replace the loop latent before a denoising step (its own UNet forwards
                                   come from the backend: ``LatentContext.probe``)
=================  ==============  =====================================================================

A method's callables receive tensors and the contexts of `steer.edits.pipeline_context` (generation, step, layer
call); they never see ``attn``, the UNet or the pipeline. The backend (`steer.backends.diffusers`) swaps a steer
processor into only the ``attn2`` layers some edit names (the others keep their processor objects) and calls the
stock processor unchanged whenever no edit acts, so that path is bit-identical to stock.

Example, no method involved (double the unnormalised attention weight exp(score) of token 2 in every depth-1
layer)::

    from steer import edits

    def bias(q, k, call):
        b = torch.zeros(q.shape[0], q.shape[1], q.shape[2], k.shape[2])
        b[..., 2] = math.log(2.0)
        return b

    h = steer.apply(pipe, edits.ProcessorEdit(depths=[1], scores=bias))
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Literal, Union

import torch

from steer.edits.kinds import MAIN, Edit
from steer.edits.pipeline_context import (
    PROBE,
    AttnCall,
    GenerationFacts,
    LatentContext,
    PipelineContext,
    StepContext,
)
from steer.edits.pipeline_facts import PipelineInfo, TokenizerInfo, grid_at

DepthSelection = Union[Sequence[int], Literal["all"]]


def _every_step(i: int, num_steps: int) -> bool:
    return True


class PipelineEdit(Edit):
    """Base of the pipeline edit kinds (they act on a diffusers pipeline, never on a language model)."""


@dataclass
class ProcessorEdit(PipelineEdit):
    """Act inside the ``attn2`` (cross-attention) layers at ``depths`` of the UNet.

    Fields:

    - ``depths``: layer depths (`steer.edits.pipeline_facts`), or ``"all"``;
    - ``probs(P, call)``: *probability mode*. The layer computes P = softmax(q·kᵀ·scale) explicitly, shape
      [B·heads, N, keys] (batch-major rows, diffusers' ``get_attention_scores``: upcast and masks as the layer
      says), and its output as P·V, so gradients flow through P. The callable reads P (e.g. ``call.keep(P)``);
      its return value is ignored;
    - ``scores(q, k, call) -> bias | None``: *score mode*. ``q`` [B, heads, N, d] and ``k`` [B, heads, keys, d]
      are the layer's projected queries and keys (scores are q·kᵀ·``call.scale``); the callable returns an
      additive bias to the pre-softmax scores broadcastable to [B, heads, N, keys] (float32), or None for no
      change. Biases of several edits on one layer are summed; when every one is None the stock processor runs;
    - ``acts(call) -> bool``: a cheap gate asked before anything is projected (None = always);
    - ``begin(ctx)``: called when a generation starts (at ``encode_prompt``; ``ctx`` is a
      :class:`~steer.edits.pipeline_context.PipelineContext`): check the call (raise `SteerInputError`) and set
      up ``ctx.memo``;
    - ``before_step(ctx)`` / ``after_step(kept, ctx)``: around each counted UNet call of the main run (``ctx``: a
      :class:`~steer.edits.pipeline_context.StepContext`); ``kept`` maps each layer where this edit called
      ``call.keep(value)`` during that UNet call to the value, in call order;
    - ``runs``: ``("main",)`` (the generation's own UNet calls), ``("probe",)`` (only the UNet forwards of the
      same method's `LatentUpdate`), or both.

    Exactly one of ``probs`` / ``scores`` is given. Edits act only in generations that run through a steered
    pipeline (the one given to ``steer.apply`` or the handle's ``pipe``), never with ``handle.disabled()``.
    """

    site = "unet.attn2"
    stage: ClassVar[str] = "attention"

    depths: DepthSelection = "all"
    probs: Callable[[torch.Tensor, AttnCall], None] | None = None
    scores: Callable[[torch.Tensor, torch.Tensor, AttnCall], torch.Tensor | None] | None = None
    acts: Callable[[AttnCall], bool] | None = None
    begin: Callable[[PipelineContext], None] | None = None
    before_step: Callable[[StepContext], None] | None = None
    after_step: Callable[[dict[str, Any], StepContext], None] | None = None
    runs: tuple[str, ...] = (MAIN,)

    def __post_init__(self) -> None:
        if (self.probs is None) == (self.scores is None):
            raise ValueError("ProcessorEdit needs exactly one of probs= (probability mode) or scores= (score mode)")
        bad = [r for r in self.runs if r not in (MAIN, PROBE)]
        if bad or not self.runs:
            raise ValueError(f"ProcessorEdit.runs: use 'main', 'probe' or both, got {self.runs!r}")
        if isinstance(self.depths, str) and self.depths != "all":
            raise ValueError(f"ProcessorEdit.depths: a list of ints or 'all', got {self.depths!r}")

    def resolve_depths(self, available: Sequence[int]) -> list[int]:
        """The chosen depths (``"all"``: every depth in ``available``); a depth outside it is a ValueError."""
        if isinstance(self.depths, str):
            return sorted(available)
        out = []
        for depth in self.depths:
            if not isinstance(depth, int) or isinstance(depth, bool) or depth not in available:
                raise ValueError(f"depth {depth!r} holds no attn2 layer; depths with attn2 layers: {sorted(available)}")
            out.append(depth)
        return sorted(set(out))


@dataclass
class LatentUpdate(PipelineEdit):
    """Replace the loop latent before a denoising step.

    Fields:

    - ``fn(z, ctx) -> z' | None``: called before step i's UNet call with the loop latent ``z`` [images, C, h, w]
      (before CFG doubling and ``scale_model_input``; read it, do not change it in place) and a
      :class:`~steer.edits.pipeline_context.LatentContext` (step i of T, and ``ctx.probe`` for the UNet forwards
      the update needs). Returning a tensor makes it the loop latent from this step on (the step's UNet input
      is rebuilt from it as the pipeline does); None leaves the step as it was;
    - ``when(i, T) -> bool``: whether ``fn`` runs before step i (default: every step); the backend takes the
      latent over only for those steps, every other step is the stock one;
    - ``begin(ctx)``: called when a generation of the handle's pipeline starts (at ``encode_prompt``): check the
      call (raise `SteerInputError`) and set up ``ctx.memo``.

    A stock pipeline has no place to change the latent before its first UNet call, so a handle with a latent
    update has its own ``handle.pipe`` (``from_pipe``, on the same modules) and the update acts only there; the
    UNet called from elsewhere runs unchanged (steer logs a warning once). At most one latent update may be
    active per pipeline: two would both own the loop latent. Needs a first-order scheduler.
    """

    site = "latents"
    stage: ClassVar[str] = "input"

    fn: Callable[[torch.Tensor, LatentContext], torch.Tensor | None]
    when: Callable[[int, int], bool] = _every_step
    begin: Callable[[PipelineContext], None] | None = None


PIPELINE_EDITS: tuple[type[PipelineEdit], ...] = (ProcessorEdit, LatentUpdate)

__all__ = [
    "PIPELINE_EDITS",
    "PROBE",
    "AttnCall",
    "DepthSelection",
    "GenerationFacts",
    "LatentContext",
    "LatentUpdate",
    "PipelineContext",
    "PipelineEdit",
    "PipelineInfo",
    "ProcessorEdit",
    "StepContext",
    "TokenizerInfo",
    "grid_at",
]
