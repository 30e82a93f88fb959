"""A latent update on its pipeline: the loop latent handed over by the from_pipe pipeline
(:mod:`steer.backends.diffusers.pipelines`), the method's ``fn`` called before chosen steps, the step's UNet input
rebuilt from the new latent, and the probe forwards the method asks for.

Before step i (when ``when(i, T)``): the tracked latent z must be what the UNet is about to get (the stock
``scale_model_input(cat([z] * 2))`` under CFG); ``fn(z, ctx)`` may return z'; then z is overwritten in place (it
is the pipeline's own loop variable, a copy the callback handed over) and the call's input is rebuilt with the
stock expression. ``ctx.probe`` runs cond-only UNet forwards at this step's timestep and conditioning.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from steer.edits.kinds import MAIN
from steer.edits.pipeline import LatentUpdate
from steer.edits.pipeline_context import LatentContext, PipelineContext
from steer.edits.pipeline_facts import PipelineInfo
from steer.errors import SteerInputError

if TYPE_CHECKING:
    from steer.backends.diffusers.generation import Generation
    from steer.backends.diffusers.runtime import PipelineRuntime

logger = logging.getLogger("steer.diffusers")


@dataclass
class CondInputs:
    """The cond half of a UNet call's conditioning (what a probe forward needs)."""

    encoder_hidden_states: torch.Tensor
    added_cond_kwargs: dict[str, torch.Tensor] | None
    cross_attention_kwargs: dict[str, Any] | None

    def rows(self, index: slice) -> CondInputs:
        added = None
        if self.added_cond_kwargs is not None:
            added = {k: v[index] for k, v in self.added_cond_kwargs.items()}
        return CondInputs(self.encoder_hidden_states[index], added, self.cross_attention_kwargs)


class LatentTrack:
    """One handle's :class:`LatentUpdate` on its pipeline (``pipe``: the handle's from_pipe pipeline)."""

    def __init__(self, pipe: Any, edit: LatentUpdate, info: PipelineInfo) -> None:
        self.pipe = pipe
        self.edit = edit
        self.info = info
        self.runtime: PipelineRuntime | None = None
        self.latents: torch.Tensor | None = None  # the loop latent, handed over by the pipeline
        self.warned = False

    @property
    def name(self) -> str:
        return self.edit.owner or "LatentUpdate"

    # ---- per generation -------------------------------------------------------------------------------
    def begin(self, generation: Generation) -> None:
        """A generation of ``pipe`` starts: check what the in-place update needs, then the edit's ``begin``."""
        scheduler = self.pipe.scheduler
        order = getattr(scheduler, "order", 1)
        if order != 1:
            raise SteerInputError(
                f"{self.name}: scheduler {type(scheduler).__name__} has order {order}; use a first-order "
                "scheduler (DDIM, PNDM, DPM-Solver++, Euler, Euler-a, LMS, UniPC)"
            )
        if getattr(self.pipe.unet.config, "time_cond_proj_dim", None) is not None:
            raise SteerInputError(f"{self.name}: LCM / guidance-embedded UNets are not supported")
        if self.edit.begin is not None:
            self.edit.begin(PipelineContext(generation.facts, self.info, self.edit.owner))

    def runs_in(self, generation: Generation | None) -> bool:
        return generation is not None and generation.pipe is self.pipe

    def wants_latents_after(self, i: int) -> bool:
        """The pipeline's callback asks after step i: will the latent be updated before step i + 1?"""
        generation = None if self.runtime is None else self.runtime.generation
        if not self.runs_in(generation):
            return False
        assert generation is not None
        total = generation.facts.num_steps
        return total > 0 and self.edit.when(i + 1, total)

    def warn_outside(self) -> None:
        if not self.warned:
            self.warned = True
            logger.warning(
                "steer: %s is applied but the UNet was called outside handle.pipe (no latent update runs there). "
                "Call handle.pipe(...) to generate with it.",
                self.name,
            )

    # ---- before a step ------------------------------------------------------------------------------------
    def before_unet(
        self, generation: Generation, i: int, t: Any, args: tuple, kwargs: dict
    ) -> tuple[tuple, dict] | None:
        """Run the update due before step i; the UNet call's new (args, kwargs), or None when unchanged."""
        facts = generation.facts
        total = facts.num_steps
        if not self.edit.when(i, total):
            return None
        z = self.latents
        sample = args[0] if args else kwargs["sample"]
        cfg = facts.cfg
        if z is None or z.shape[0] * (2 if cfg else 1) != sample.shape[0]:
            raise RuntimeError(f"steer {self.name}: lost track of the pipeline's latents at step {i}")
        n = z.shape[0]
        ehs = kwargs.get("encoder_hidden_states")
        if ehs is None and len(args) > 2:
            ehs = args[2]
        if ehs is None:
            raise RuntimeError(f"steer {self.name}: the UNet call has no encoder_hidden_states")
        added = kwargs.get("added_cond_kwargs")
        if added is not None and "image_embeds" in added:
            raise SteerInputError(f"{self.name}: IP-Adapter inputs are not supported")
        scheduler = self.pipe.scheduler
        expected = scheduler.scale_model_input(z, t) if hasattr(scheduler, "scale_model_input") else z
        if not torch.equal(sample[sample.shape[0] - n :], expected):
            raise RuntimeError(f"steer {self.name}: the UNet input at step {i} is not the tracked latent")
        cond = CondInputs(ehs, added, kwargs.get("cross_attention_kwargs"))
        if cfg:
            cond = cond.rows(slice(n, None))
        ctx = LatentContext(
            generation=facts,
            model=self.info,
            owner=self.edit.owner,
            i=i,
            t=float(t),
            num_steps=total,
            latent_grid=(int(z.shape[-2]), int(z.shape[-1])),
            rows=n,
            device=z.device,
            run=MAIN,
            probe=functools.partial(self.probe, facts, i, t, cond),
        )
        new = self.edit.fn(z, ctx)
        if new is None:
            return None
        z.copy_(new)
        x = torch.cat([z] * 2) if cfg else z
        if hasattr(scheduler, "scale_model_input"):
            x = scheduler.scale_model_input(x, t)
        if args:
            args = (x, *args[1:])
        else:
            kwargs = {**kwargs, "sample": x}
        return args, kwargs

    def probe(
        self, facts: Any, i: int, t: Any, cond: CondInputs, z: torch.Tensor, rows: slice | None = None, scaled: bool = True
    ) -> dict[str, Any]:
        """One cond-only UNet forward at ``z`` (``LatentContext.probe``): what the owner's probe edits kept."""
        if self.runtime is None:
            raise RuntimeError(f"steer {self.name}: the handle was removed; its probe cannot run")
        x = self.pipe.scheduler.scale_model_input(z, t) if scaled else z
        inputs = cond.rows(rows) if rows is not None else cond
        return self.runtime.probe(
            self.edit.owner,
            facts,
            i,
            t,
            x,
            encoder_hidden_states=inputs.encoder_hidden_states,
            added_cond_kwargs=inputs.added_cond_kwargs,
            cross_attention_kwargs=inputs.cross_attention_kwargs,
        )


__all__ = ["CondInputs", "LatentTrack"]
