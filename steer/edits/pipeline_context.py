"""What a pipeline edit's callable receives: facts of the current generation, step and layer call, as data.

Never a module, the pipeline or the runtime. Three levels:

* :class:`GenerationFacts` — one pipeline call (a *generation*): prompts, images per prompt, CFG, the number of
  denoising steps, and the per-generation store that methods keep their working state in (``memo``);
* :class:`PipelineContext` (the generation, seen by one edit's owner) → :class:`StepContext` (one counted UNet
  call: step i of T) → :class:`LatentContext` (a step, plus ``probe``: the UNet forwards a latent update may ask
  the backend for);
* :class:`AttnCall` — one call of one ``attn2`` layer inside a UNet forward (its layer, depth, query grid), with
  ``keep`` (hand a value back out of the layer) and ``layer_memo`` (state of this edit at this layer, kept in the
  layer's processor object).

Runs: ``"main"`` is the generation's own UNet calls; ``"probe"`` is a UNet forward the backend runs for a latent
update of the same method (`LatentContext.probe`); in a probe only that method's edits that list ``"probe"`` in
their ``runs`` act.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from steer.edits.kinds import MAIN
from steer.edits.pipeline_facts import PipelineInfo

PROBE = "probe"


@dataclass
class GenerationFacts:
    """One pipeline call, from its ``encode_prompt`` on.

    - ``prompts``: the prompt texts (None when the call passed ``prompt_embeds``); ``n_prompts``;
    - ``per_prompt``: ``num_images_per_prompt`` (image b belongs to prompt b // per_prompt);
    - ``cfg``: classifier-free guidance is on (each UNet call holds the uncond rows, then the cond rows);
    - ``prompt_2``: SDXL's second prompt as given (None when not given);
    - ``num_steps``: T, the denoising steps (0 until the first UNet call of the generation);
    - ``store``: per owner (method), a dict for the generation's working state (see ``PipelineContext.memo``).
    """

    prompts: list[str] | None
    n_prompts: int
    per_prompt: int = 1
    cfg: bool = True
    prompt_2: Any = None
    num_steps: int = 0
    store: dict[str, dict[Any, Any]] = field(default_factory=dict)

    @property
    def n_images(self) -> int:
        return self.n_prompts * self.per_prompt


@dataclass
class PipelineContext:
    """A generation as one edit sees it: ``generation`` (its facts), ``model`` (the pipeline's
    :class:`~steer.edits.pipeline_facts.PipelineInfo`) and ``owner`` (the edit's method, which scopes ``memo``)."""

    generation: GenerationFacts
    model: PipelineInfo | None = None
    owner: str = ""

    @property
    def prompts(self) -> list[str] | None:
        return self.generation.prompts

    @property
    def n_prompts(self) -> int:
        return self.generation.n_prompts

    @property
    def per_prompt(self) -> int:
        return self.generation.per_prompt

    @property
    def n_images(self) -> int:
        return self.generation.n_images

    @property
    def cfg(self) -> bool:
        return self.generation.cfg

    @property
    def prompt_2(self) -> Any:
        return self.generation.prompt_2

    @property
    def memo(self) -> dict[Any, Any]:
        """A dict private to the owner's edits for this generation (emptied when the next generation starts)."""
        return self.generation.store.setdefault(self.owner, {})


@dataclass
class StepContext(PipelineContext):
    """One counted UNet call of the generation (or a probe forward for it).

    ``i``: the step index (0-based); ``t``: its timestep; ``num_steps``: T; ``latent_grid``: the latent's
    (h, w); ``rows``: the UNet call's batch rows (2 × images under CFG in the main run, the probed rows in a
    probe); ``device``: where the UNet input is; ``run``: ``"main"`` or ``"probe"``.
    """

    i: int = 0
    t: float = 0.0
    num_steps: int = 0
    latent_grid: tuple[int, int] = (0, 0)
    rows: int = 0
    device: torch.device | None = None
    run: str = MAIN


#: ``probe(z, rows=None, scaled=True) -> {layer: value}`` (see :class:`LatentContext`).
Probe = Callable[..., dict[str, Any]]


def _no_probe(*args: Any, **kwargs: Any) -> dict[str, Any]:
    raise RuntimeError("this context has no probe (only a LatentUpdate's callable gets one)")


@dataclass
class LatentContext(StepContext):
    """What a :class:`~steer.edits.pipeline.LatentUpdate` sees before step i's UNet call.

    ``probe(z, rows=None, scaled=True)`` runs the UNet once at latent ``z`` [n, C, h, w] (it may require grad;
    the forward keeps the graph) with this step's timestep and the *cond* half of this step's conditioning
    (``rows``: a slice of the images, default all; ``scaled``: pass ``scheduler.scale_model_input(z, t)`` like
    the pipeline does, or ``z`` itself). Only the owner's :class:`~steer.edits.pipeline.ProcessorEdit` s that
    list ``"probe"`` in their ``runs`` act in it; it returns what they ``keep`` per ``attn2`` layer (in call
    order). The UNet output is not returned.
    """

    probe: Probe = _no_probe


@dataclass
class AttnCall:
    """One call of one ``attn2`` layer, as one :class:`~steer.edits.pipeline.ProcessorEdit` sees it.

    - ``step``: the :class:`StepContext` of the UNet forward this call is part of (``step.run`` says which run);
    - ``layer``: the layer's ``unet.attn_processors`` key; ``depth``: its depth; ``grid``: its query grid
      (h, w), so the layer's N = h·w queries are in raster order; ``heads``; ``scale``: the score scale
      (1/√d unless the layer says otherwise);
    - ``keep(value)``: hand ``value`` out of the layer for this forward (a probe returns it; in the main run the
      edit's ``after_step`` receives it), replacing what this edit kept at this layer before in the forward;
    - ``layer_memo``: a dict private to this edit at this layer for the generation (held by the layer's
      processor object; e.g. masks resized to this layer's grid).
    """

    step: StepContext
    layer: str
    depth: int
    grid: tuple[int, int]
    heads: int
    scale: float
    keep: Callable[[Any], None]
    layer_memo: dict[Any, Any] = field(default_factory=dict)

    @property
    def memo(self) -> dict[Any, Any]:
        """The owner's per-generation dict (``step.memo``)."""
        return self.step.memo


__all__ = ["PROBE", "AttnCall", "GenerationFacts", "LatentContext", "PipelineContext", "Probe", "StepContext"]
