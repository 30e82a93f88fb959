"""What A-STAR and Attend-and-Excite share: concepts of the prompt, their cross-attention maps from loss forwards,
and a latent update before chosen steps (the maps and losses are in :mod:`steer.methods.diffusion.losses`).

Edits of a concept-map method:

* a :class:`~steer.edits.pipeline.ProcessorEdit` in probability mode on the ``attn2`` layers at ``attn_depth``,
  acting only in the method's probe forwards (``runs=("probe",)``): it keeps each layer's P (with its graph);
* a :class:`~steer.edits.pipeline.LatentUpdate` whose ``begin`` resolves the concepts of each prompt (token
  positions, the softmax span S) and whose ``fn`` runs the method's step (subclasses: :meth:`ConceptMethod.update`)
  with the maps of :meth:`ConceptMethod.concept_maps`: z₀ = z (a leaf requiring grad) → ``ctx.probe(z₀)`` (one
  cond-only UNet forward) → Ā (mean over the layers × heads) → A^m per image and concept.

State: per generation in ``ctx.memo`` (concepts, spans, step sizes, the subclass's own); what the user reads in
``Steering.state[name]``: ``log`` (per step and image), ``maps`` (step → per image [K, h, w]), ``tokens``,
``labels``, ``grid``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch

from steer.edits.kinds import Edit
from steer.edits.pipeline import PROBE, LatentUpdate, ProcessorEdit
from steer.edits.pipeline_context import AttnCall, LatentContext, PipelineContext
from steer.edits.pipeline_facts import PipelineInfo, grid_at
from steer.errors import InvalidParameterError, SteerInputError
from steer.methods.diffusion.losses import average_maps, step_sizes, token_maps
from steer.methods.diffusion.tokens import (
    check_prompt_2,
    eot_position,
    images_of,
    labels,
    resolve_concepts,
)
from steer.registry import Method, param


def _token_help() -> str:
    return "concepts: words of the prompt (str) or CLIP positions (int); one list per prompt for several prompts"


@dataclass
class ConceptParams:
    """Parameters every concept-map method has."""

    tokens: list | None = param(None, help=_token_help())
    indices: list | None = param(None, help="CLIP token positions of the concepts (A&E's token_indices), instead of tokens")
    step_size: float = param(20.0, help="s in the step size α_i = s·sqrt(linspace(1, 0.5, T))[i]", range=(0.0, None))
    attn_depth: int = param(2, help="downsampling depth of the map layers (2 = latent/4, SD's 16×16 at 512 px)", range=(0, None))
    softmax_span: Literal["prompt", "ae"] | None = param(
        None, help="token span S of the ×100 softmax: 'prompt' = 1..EOT−1, 'ae' = 1..75; None = method/family default"
    )
    smooth_sigma: float = param(0.5, help="σ of the 3×3 Gaussian smoothing of the maps (0 = off)", range=(0.0, None))
    multi_token: Literal["error", "mean"] = param(
        "error", help="a word split into several tokens: 'error' (name the sub-tokens) or 'mean' of their maps"
    )
    ae_compat: bool = param(False, help="reproduce diffusers' StableDiffusionAttendAndExcitePipeline quirks exactly")


class ConceptMethod(Method):
    """Base of A-STAR and Attend-and-Excite (not registered itself)."""

    target: ClassVar[str] = "pipeline"
    stage: ClassVar[str] = "input"
    default_span: ClassVar[str] = "prompt"
    model: PipelineInfo

    def __init__(self, params: Any, model: Any, state: dict[str, Any]) -> None:
        super().__init__(params, model, state)
        self._last: tuple[LatentContext, torch.Tensor] | None = None

    # ---- apply time --------------------------------------------------------------------------------
    def check(self) -> None:
        p = self.params
        if (p.tokens is None) == (p.indices is None):
            raise InvalidParameterError(
                f"{self.name}: give the concepts as tokens=[...] (words of the prompt) or indices=[...] (CLIP positions), "
                "exactly one of them"
            )
        concepts = p.tokens if p.tokens is not None else p.indices
        if not concepts:
            raise InvalidParameterError(f"{self.name}: at least one concept is needed")
        if p.indices is not None:
            flat = [x for item in p.indices for x in (item if isinstance(item, (list, tuple)) else [item])]
            if not all(isinstance(x, int) and not isinstance(x, bool) for x in flat):
                raise InvalidParameterError(f"{self.name}: indices must be ints (CLIP token positions), got {p.indices!r}")
        depths = self.model.available_depths()
        if p.attn_depth not in depths:
            raise InvalidParameterError(
                f"{self.name}: attn_depth={p.attn_depth} holds no cross-attention layer in this UNet; depths with "
                f"attn2 layers: {depths}"
            )

    def initial_state(self) -> dict[str, Any]:
        return {"log": [], "maps": {}, "tokens": None, "grid": None}

    def span_mode(self) -> str:
        p = self.params
        if p.softmax_span is not None:
            return str(p.softmax_span)
        if p.ae_compat:
            return "ae"
        return self.default_span

    @property
    def concept_spec(self) -> list:
        p = self.params
        return list(p.tokens if p.tokens is not None else p.indices)

    def edits(self) -> list[Edit]:
        return [
            ProcessorEdit(depths=[self.params.attn_depth], probs=self._keep_probs, runs=(PROBE,)),
            LatentUpdate(fn=self._step, when=self.wants_step, begin=self._begin),
        ]

    # ---- what subclasses give ----------------------------------------------------------------------
    def wants_step(self, i: int, num_steps: int) -> bool:
        """Whether the latent is updated before step i of T."""
        raise NotImplementedError

    def reset(self, memo: dict[Any, Any], n_images: int) -> None:
        """Set up the subclass's per-generation state in ``memo``."""

    def update(self, ctx: LatentContext, z: torch.Tensor) -> torch.Tensor | None:
        """The method's step: the new latent, or None."""
        raise NotImplementedError

    # ---- the edits' callables -------------------------------------------------------------------------
    @staticmethod
    def _keep_probs(probs: torch.Tensor, call: AttnCall) -> None:
        call.keep(probs)

    def _begin(self, ctx: PipelineContext) -> None:
        """Concepts and softmax spans of this generation (per image), or a SteerInputError naming the problem."""
        check_prompt_2(self.name, ctx.prompts, ctx.prompt_2)
        tok = self.model.tokenizer
        per_prompt = resolve_concepts(
            tok,
            ctx.prompts,
            ctx.n_prompts,
            self.concept_spec,
            what=self.name,
            single_token=self.params.multi_token == "error",
        )
        span_mode = self.span_mode()
        spans: list[list[int]] = []
        for p in range(ctx.n_prompts):
            if span_mode == "ae":
                span = list(range(1, int(tok.model_max_length) - 1))
            else:
                if ctx.prompts is None:
                    raise SteerInputError(
                        f"{self.name}: softmax_span='prompt' needs the prompt text to find its end; this call passed "
                        "prompt_embeds. Pass prompt=..., or softmax_span='ae'."
                    )
                span = list(range(1, eot_position(tok, tok.prompt_ids(ctx.prompts[p]))))
            for concept in per_prompt[p]:
                outside = [q for q in concept if q not in span]
                if outside:
                    raise SteerInputError(
                        f"{self.name}: token position(s) {outside} are outside the softmax span {span[0]}..{span[-1]}"
                    )
            spans.append(span)
        memo = ctx.memo
        memo["concepts"] = images_of(per_prompt, ctx.per_prompt)
        memo["spans"] = images_of(spans, ctx.per_prompt)
        self.reset(memo, len(memo["concepts"]))
        self.state["log"] = []
        self.state["maps"] = {}
        self.state["tokens"] = [[list(c) for c in concepts] for concepts in memo["concepts"]]
        self.state["labels"] = images_of(
            [labels(tok, ctx.prompts[p] if ctx.prompts else None, per_prompt[p]) for p in range(ctx.n_prompts)],
            ctx.per_prompt,
        )

    def _step(self, z: torch.Tensor, ctx: LatentContext) -> torch.Tensor | None:
        memo = ctx.memo
        concepts = memo["concepts"]
        if len(concepts) != z.shape[0]:
            raise SteerInputError(f"{self.name}: {len(concepts)} images expected, the UNet got {z.shape[0]}")
        if "alphas" not in memo:
            memo["alphas"] = step_sizes(self.params.step_size, ctx.num_steps)
        self._last = (ctx, z.detach().clone())
        return self.update(ctx, z)

    # ---- maps -------------------------------------------------------------------------------------------
    def concept_maps(
        self, ctx: LatentContext, z: torch.Tensor, images: range
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """One cond-only UNet forward at z (images ``images`` of the step) → (the leaf z₀, A^m per image [K, h, w]
        with their graph)."""
        p = self.params
        memo = ctx.memo
        z0 = z.detach().requires_grad_(True)
        kept = ctx.probe(z0, rows=slice(images.start, images.stop), scaled=not p.ae_compat)
        layers = self.model.layers_at([p.attn_depth])
        missing = [n for n in layers if n not in kept]
        if missing:
            raise RuntimeError(f"steer {self.name}: no maps recorded for {missing}")
        grid = grid_at(z.shape[-2], z.shape[-1], p.attn_depth)
        self.state["grid"] = grid
        avg = average_maps([kept[n] for n in layers], z.shape[0], grid, width_first=p.ae_compat)
        maps = [
            token_maps(avg[j], memo["concepts"][b], memo["spans"][b], p.smooth_sigma, p.ae_compat)
            for j, b in enumerate(images)
        ]
        return z0, maps

    # ---- diagnostics ------------------------------------------------------------------------------------
    @property
    def last_latents(self) -> torch.Tensor | None:
        """The loop latent before the last update (a copy), or None before the first one."""
        return None if self._last is None else self._last[1]

    def last_context(self) -> LatentContext:
        """The context of the last update (its probe runs at that step's timestep and conditioning)."""
        if self._last is None:
            raise RuntimeError(f"{self.name}: no latent update has run yet; generate with handle.pipe(...) first")
        return self._last[0]


__all__ = ["ConceptMethod", "ConceptParams"]
