"""One pipeline call as the runtime tracks it: which pipeline, its facts for edits, the UNet calls counted.

A generation starts when a steered pipeline's ``encode_prompt`` runs (the runtime wraps it); every UNet call
after that is step i = 0, 1, … until T calls have run (T: the scheduler's timesteps at the first call).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any

from steer.edits.pipeline_context import GenerationFacts


@dataclass
class Generation:
    """``pipe``: the pipeline running it; ``facts``: what edits see; ``unet_calls``: counted so far."""

    pipe: Any
    facts: GenerationFacts
    unet_calls: int = 0
    finished: bool = False

    def start_steps(self) -> None:
        """At the first UNet call: T from the scheduler's timesteps."""
        self.facts.num_steps = len(self.pipe.scheduler.timesteps)


def generation_from_encode_prompt(pipe: Any, bound: inspect.BoundArguments) -> Generation:
    """The generation an ``encode_prompt`` call starts (its arguments bound, defaults applied)."""
    args = bound.arguments
    prompt = args.get("prompt")
    embeds = args.get("prompt_embeds")
    if isinstance(prompt, str):
        prompts: list[str] | None = [prompt]
    elif isinstance(prompt, (list, tuple)):
        prompts = list(prompt)
    else:
        prompts = None
    n_prompts = len(prompts) if prompts is not None else (int(embeds.shape[0]) if embeds is not None else 1)
    facts = GenerationFacts(
        prompts=prompts,
        n_prompts=n_prompts,
        per_prompt=int(args.get("num_images_per_prompt", 1) or 1),
        cfg=bool(args.get("do_classifier_free_guidance", True)),
        prompt_2=args.get("prompt_2"),
    )
    return Generation(pipe=pipe, facts=facts)


__all__ = ["Generation", "generation_from_encode_prompt"]
