"""A-STAR: test-time attention segregation and retention (Agarwal et al., ICCV 2023; specs/astar.md).

At step i < i_max (default: every step but the last), on the loop latent z:

    g = ∇_z Σ_images [w_seg·L_seg(Â(z)) + w_ret·L_ret(Â(z), B)],   z ← z − α_i·g,   B ← 1[Â/max Â > τ]

with α_i = s·sqrt(linspace(1, 0.5, T))[i], Â the (max-normalised) concept maps of one cond-only UNet forward
at z and L_seg, L_ret, B as in :mod:`steer.methods.diffusion.losses`. B comes from the previous updated step
(none at the first one: L_ret is left out there). Runs in ``handle.pipe``
(:mod:`steer.methods.diffusion.concepts`).

``Steering.state["astar"]`` after a generation: ``log`` (per step and image: L_seg, L_ret, L, ‖g‖, α_i),
``maps`` (step → per image [K, h, w]), ``retention_masks`` (the last B), ``tokens``, ``labels``, ``grid``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from steer.edits.pipeline_context import LatentContext
from steer.errors import InvalidParameterError
from steer.methods.diffusion.concepts import ConceptMethod, ConceptParams
from steer.methods.diffusion.losses import max_normalize, retention_loss, retention_masks, segregation_loss
from steer.registry import param, register


@dataclass
class AStarParams(ConceptParams):
    max_step: int | None = param(None, help="update at steps i < min(max_step, T−1); None = all but the last", range=(0, None))
    w_seg: float = param(1.0, help="weight of the segregation loss", range=(0.0, None))
    w_ret: float = param(1.0, help="weight of the retention loss", range=(0.0, None))
    mask_threshold: float = param(0.5, help="τ: retention mask B = 1[Â/max Â > τ]", range=(0.0, 1.0))
    normalize: bool = param(True, help="max-normalise each concept map before the losses")


Losses = tuple[list[torch.Tensor], list[torch.Tensor | None], list[torch.Tensor], list[torch.Tensor]]


@register
class AStar(ConceptMethod):
    """A-STAR: test-time attention segregation and retention (Agarwal et al., ICCV 2023)."""

    name = "astar"
    description = (
        "A-STAR (ICCV 2023): before each step, one gradient step on the latent lowering concept-map overlap "
        "(segregation) and keeping each concept's previous region (retention); call handle.pipe"
    )
    Params = AStarParams
    default_span = "prompt"

    def check(self) -> None:
        super().check()
        if not 0.0 < self.params.mask_threshold < 1.0:
            raise InvalidParameterError("astar: mask_threshold must be in (0, 1)")

    def i_max(self, total: int) -> int:
        """min(max_step, T − 1)."""
        limit = total - 1
        if self.params.max_step is not None:
            limit = min(self.params.max_step, limit)
        return limit

    def wants_step(self, i: int, num_steps: int) -> bool:
        return i < self.i_max(num_steps)

    def reset(self, memo: dict[Any, Any], n_images: int) -> None:
        memo["masks"] = [None] * n_images  # B per image, from the previous updated step

    def losses(self, maps: list[torch.Tensor], masks: list[torch.Tensor | None]) -> Losses:
        """Per image: (w_seg·L_seg + w_ret·L_ret, L_ret or None, L_seg, Â) of the maps A^m [K, h, w]."""
        p = self.params
        totals, seg, ret, norm = [], [], [], []
        for b, m in enumerate(maps):
            mm = max_normalize(m) if p.normalize else m
            l_seg = segregation_loss(mm)
            mask = masks[b]
            l_ret = retention_loss(mm, mask) if mask is not None else None
            total = p.w_seg * l_seg if l_seg.requires_grad else l_seg
            if l_ret is not None:
                total = total + p.w_ret * l_ret
            totals.append(total)
            seg.append(l_seg)
            ret.append(l_ret)
            norm.append(mm)
        return totals, ret, seg, norm

    def update(self, ctx: LatentContext, z: torch.Tensor) -> torch.Tensor | None:
        p = self.params
        memo = ctx.memo
        i = ctx.i
        alpha = memo["alphas"][i]
        with torch.enable_grad():
            z0, maps = self.concept_maps(ctx, z, range(z.shape[0]))
            totals, ret, seg, norm = self.losses(maps, memo["masks"])
            loss = sum(totals[1:], totals[0])
            grad = torch.autograd.grad(loss, z0)[0] if loss.requires_grad else None
        new_masks = [retention_masks(m, p.mask_threshold) for m in norm]
        memo["masks"] = list(new_masks)
        self.state["retention_masks"] = [m.cpu() for m in new_masks]
        self.state["maps"][i] = [m.detach().float().cpu() for m in maps]
        for b in range(len(maps)):
            l_ret = ret[b]
            self.state["log"].append(
                {
                    "step": i,
                    "t": int(ctx.t),
                    "image": b,
                    "alpha": alpha,
                    "L_seg": float(seg[b].detach()),
                    "L_ret": None if l_ret is None else float(l_ret.detach()),
                    "L": float(totals[b].detach()),
                    "grad_norm": 0.0 if grad is None else float(grad[b].float().norm()),
                }
            )
        if grad is None:
            return None
        return (z0.detach().float() - alpha * grad.float()).to(z.dtype)

    def losses_at(self, z: torch.Tensor, retention: list[torch.Tensor | None] | None = None) -> dict[str, Any]:
        """Diagnostics: L, L_seg, L_ret per image and ∇_z Σ L at ``z``, at the last updated step's timestep and
        conditioning (retention masks: ``retention``, default the current B). Needs the handle active."""
        ctx = self.last_context()
        masks = retention if retention is not None else ctx.memo["masks"]
        with torch.enable_grad():
            z0, maps = self.concept_maps(ctx, z, range(z.shape[0]))
            totals, ret, seg, _ = self.losses(maps, masks)
            loss = torch.stack([t.float() for t in totals]).sum()
            grad = torch.autograd.grad(loss, z0)[0] if loss.requires_grad else torch.zeros_like(z0)
        return {
            "loss": float(loss.detach()),
            "L_seg": [float(s.detach()) for s in seg],
            "L_ret": [None if r is None else float(r.detach()) for r in ret],
            "grad": grad.detach(),
        }

    @property
    def retention(self) -> list[torch.Tensor | None]:
        """The current retention masks B per image (those the next update uses)."""
        return list(self.last_context().memo["masks"])


__all__ = ["AStar", "AStarParams"]
