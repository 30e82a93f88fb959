"""Attend-and-Excite (Chefer et al., SIGGRAPH 2023), the maintained peer of A-STAR.

L_AE = max_m max(0, 1 − max_p A^m) per image (maps not max-normalised). At a threshold step i (``thresholds``:
step → thr), iterative refinement: while L > 1 − thr (at most ``max_refinement_steps`` iterations),
z ← z − α_i∇L for the images still above; then, at steps i < ``max_iter_to_alter``, z ← z − α_i∇L. α_i as in
A-STAR. With ``ae_compat`` the loss forwards run one image at a time on the unscaled latent, with A&E's span
1..75, kernel and width-first map reshape (diffusers' ``StableDiffusionAttendAndExcitePipeline``). Runs in
``handle.pipe`` (:mod:`steer.methods.diffusion.concepts`).

``Steering.state["attend_and_excite"]``: ``log`` (per step and image: L_ae before and after refinement, the
refinement iterations, whether the image was updated), ``maps``, ``tokens``, ``labels``, ``grid``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from steer.edits.pipeline_context import LatentContext
from steer.errors import InvalidParameterError
from steer.methods.diffusion.concepts import ConceptMethod, ConceptParams
from steer.methods.diffusion.losses import attend_excite_loss
from steer.registry import param, register


def _default_thresholds() -> dict[int, float]:
    return {0: 0.05, 10: 0.5, 20: 0.8}


@dataclass
class AttendExciteParams(ConceptParams):
    thresholds: dict = param(
        help="refinement step → threshold: refine until max attention ≥ threshold", default_factory=_default_thresholds
    )
    max_iter_to_alter: int = param(25, help="update the latent at steps i < this (absolute indices, as A&E)", range=(0, None))
    max_refinement_steps: int = param(20, help="cap on iterative refinement iterations", range=(1, None))


def descend(z0: torch.Tensor, losses: torch.Tensor, which: torch.Tensor, alpha: float) -> torch.Tensor:
    """z ← z − α∇L for the images in ``which`` (a bool [n]); others keep z0. Detached result."""
    if not bool(which.any()):
        return z0.detach()
    grad = torch.autograd.grad(losses[which].sum(), z0)[0]
    moved = (z0.detach().float() - alpha * grad.float()).to(z0.dtype)
    return torch.where(which[:, None, None, None], moved, z0.detach())


@register
class AttendAndExcite(ConceptMethod):
    """Attend-and-Excite (Chefer et al., SIGGRAPH 2023)."""

    name = "attend_and_excite"
    description = (
        "Attend-and-Excite (SIGGRAPH 2023): raise each concept's maximum cross-attention by latent updates in "
        "early steps, with iterative refinement at threshold steps; call handle.pipe"
    )
    Params = AttendExciteParams

    def resolve(self) -> Any:
        """``thresholds`` with int step keys (JSON and the CLI give strings) and float values in [0, 1]."""
        params = self.params
        thresholds = params.thresholds
        if isinstance(thresholds, dict):
            thresholds = {int(k) if isinstance(k, str) and k.strip().isdigit() else k: v for k, v in thresholds.items()}
        if not isinstance(thresholds, dict) or not all(
            isinstance(k, int) and not isinstance(k, bool) and isinstance(v, (int, float)) and 0.0 <= v <= 1.0
            for k, v in thresholds.items()
        ):
            raise InvalidParameterError(
                f"attend_and_excite: thresholds must map step indices (int) to thresholds in [0, 1], got {thresholds!r}"
            )
        params.thresholds = {int(k): float(v) for k, v in thresholds.items()}
        return params

    def span_mode(self) -> str:
        p = self.params
        if p.softmax_span is not None:
            return str(p.softmax_span)
        if p.ae_compat or self.model.variant == "sd1":
            return "ae"
        return "prompt"  # the official SD2.1 mode (and SDXL)

    def wants_step(self, i: int, num_steps: int) -> bool:
        return i < self.params.max_iter_to_alter or i in self.params.thresholds

    def losses(self, maps: list[torch.Tensor]) -> torch.Tensor:
        """L_AE per image, [n]."""
        return torch.stack([attend_excite_loss(m) for m in maps])

    def update(self, ctx: LatentContext, z: torch.Tensor) -> torch.Tensor | None:
        p = self.params
        i = ctx.i
        alpha = ctx.memo["alphas"][i]
        threshold = p.thresholds.get(i)
        alter = i < p.max_iter_to_alter
        groups = [range(b, b + 1) for b in range(z.shape[0])] if p.ae_compat else [range(z.shape[0])]
        results = []
        maps_out: list[torch.Tensor] = []
        for images in groups:
            zg = z[images.start : images.stop]
            iterations = 0
            with torch.enable_grad():
                z0, maps = self.concept_maps(ctx, zg, images)
                losses = self.losses(maps)
                first = losses.detach().clone()
                if threshold is not None and bool((losses.detach() > 1.0 - threshold).any()):
                    active = losses.detach() > 1.0 - threshold
                    while bool(active.any()):
                        iterations += 1
                        z0, maps = self.concept_maps(ctx, zg, images)
                        losses = self.losses(maps)
                        measured = losses.detach()
                        zg = descend(z0, losses, active & (measured != 0), alpha)
                        active = active & (measured > 1.0 - threshold)
                        if iterations >= p.max_refinement_steps:
                            break
                    z0, maps = self.concept_maps(ctx, zg, images)
                    losses = self.losses(maps)
                if alter:
                    zg = descend(z0, losses, losses.detach() != 0, alpha)
                else:
                    zg = z0.detach()
            results.append(zg)
            maps_out.extend(m.detach().float().cpu() for m in maps)
            for j, b in enumerate(images):
                self.state["log"].append(
                    {
                        "step": i,
                        "t": int(ctx.t),
                        "image": b,
                        "alpha": alpha,
                        "L_ae": float(first[j]),
                        "L_ae_final": float(losses[j].detach()),
                        "refinement_iterations": iterations,
                        "updated": bool(alter and float(losses[j].detach()) != 0),
                    }
                )
        self.state["maps"][i] = maps_out
        return torch.cat(results).to(z.dtype)

    def losses_at(self, z: torch.Tensor, retention: Any = None) -> dict[str, Any]:
        """Diagnostics: L_AE per image and ∇_z Σ L_AE at ``z``, at the last updated step's timestep and
        conditioning. Needs the handle active."""
        ctx = self.last_context()
        with torch.enable_grad():
            z0, maps = self.concept_maps(ctx, z, range(z.shape[0]))
            losses = self.losses(maps)
            grad = torch.autograd.grad(losses.sum(), z0)[0] if losses.requires_grad else torch.zeros_like(z0)
        return {"loss": float(losses.detach().sum()), "L_ae": [float(x) for x in losses.detach()], "grad": grad.detach()}


__all__ = ["AttendAndExcite", "AttendExciteParams", "descend"]
