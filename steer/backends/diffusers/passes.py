"""A pass: one UNet forward steer acts in — a counted step of a generation (run ``"main"``) or a probe forward a
latent update asked for (run ``"probe"``, one method's edits only). Processors ask the runtime for the current
pass to know which edits act and what their contexts are.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from steer.edits.kinds import MAIN
from steer.edits.pipeline import PROBE, ProcessorEdit
from steer.edits.pipeline_context import GenerationFacts, StepContext
from steer.edits.pipeline_facts import PipelineInfo


@dataclass
class Pass:
    """One UNet forward: ``run`` (``"main"`` or ``"probe"``), ``owner`` (the probing method), the generation's
    facts and the step (i, t, the latent grid, the batch rows, the device). ``steps`` caches each owner's
    :class:`StepContext`; ``sequence`` numbers the values edits keep, so they are handed back in call order."""

    run: str
    facts: GenerationFacts
    i: int
    t: float
    latent_grid: tuple[int, int]
    rows: int
    device: torch.device | None = None
    owner: str | None = None
    steps: dict[str, StepContext] = field(default_factory=dict)
    sequence: int = 0

    def admits(self, edit: ProcessorEdit) -> bool:
        """Whether ``edit`` acts in this forward."""
        if self.run == MAIN:
            return MAIN in edit.runs
        return edit.owner == self.owner and PROBE in edit.runs

    def step(self, owner: str, info: PipelineInfo | None) -> StepContext:
        """The :class:`StepContext` of ``owner`` for this forward."""
        ctx = self.steps.get(owner)
        if ctx is None:
            ctx = StepContext(
                generation=self.facts,
                model=info,
                owner=owner,
                i=self.i,
                t=self.t,
                num_steps=self.facts.num_steps,
                latent_grid=self.latent_grid,
                rows=self.rows,
                device=self.device,
                run=self.run,
            )
            self.steps[owner] = ctx
        return ctx

    def next_sequence(self) -> int:
        self.sequence += 1
        return self.sequence


def step_pass(run: str, facts: GenerationFacts, i: int, t: Any, sample: torch.Tensor, owner: str | None = None) -> Pass:
    """The pass of a UNet forward on ``sample`` [rows, C, h, w] at timestep ``t``."""
    return Pass(
        run=run,
        facts=facts,
        i=i,
        t=float(t),
        latent_grid=(int(sample.shape[-2]), int(sample.shape[-1])),
        rows=int(sample.shape[0]),
        device=sample.device,
        owner=owner,
    )


__all__ = ["Pass", "step_pass"]
