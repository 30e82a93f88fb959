"""VCD — Visual Contrastive Decoding (Leng et al., "Mitigating Object Hallucinations in Large Vision-Language
Models through Visual Contrastive Decoding", CVPR 2024, arXiv 2311.16922; code DAMO-NLP-SG/VCD), and its M3ID
variant (Favero et al., CVPR 2024, arXiv 2403.14003; **unverified**: no official code, pinned from MitigV and
AvisC). Spec: ``shared/specs/vcd.md``; the equations are in :mod:`steer.methods.vlm.vcd.contrast`.

**VCD.** At every step a second branch runs the same tokens on a noised copy of each image (its own KV cache),
and the final logits move away from it inside a plausibility set of the clean branch:

    x' = √ᾱ_T x + √(1 − ᾱ_T) ε                      (once per image, on the preprocessed pixels)
    c  = (1 + α) l − α l',   c_v = −inf unless p(v) ≥ β · max p        (l clean, l' distorted; fp32)

Selection stays ``generate``'s own (greedy = argmax c; sampling warpers and beam scores see c). Fixes of the
official code, on by default: VCD acts under greedy and beams too (the official code patches sampling only:
``sampling_only=True`` keeps that restriction and refuses a greedy or beam call), and the distorted branch has
its own cache at every step (the shared-cache bug of the code before 2024-07-16 is not reproduced).

**M3ID** (``steer.apply(model, "m3id")``): the branch is the prompt without its image (the adapter's text-only
fact) and, with t = 1 for the first generated token,

    w_t = e^{λt} − 1,   l* = l + 1[max softmax(l) < gate] · w_t · (l − l_u)   (optional β mask, off)

Edits: a :class:`~steer.edits.kinds.SourceRun` that follows decoding (``"distorted"`` for VCD with the
method's noise as the distortion, ``"text_only"`` for M3ID), a ``Collect(site="logits")`` of its logits and a
:class:`~steer.edits.kinds.LogitsTransform` that combines them.

``Steering.state["vcd"]``: ``{"alpha", "beta", "noise_step", "seed", "branch": bool, "plausible": [[per-row
count of the plausible set at the last position] per step of the last call]}``; ``state["m3id"]``:
``{"lam", "gate", "beta", "weights": [w_t per step], "gated": [[per-row gate] per step]}``.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from steer.edits.context import EditContext
from steer.edits.kinds import Collect, Edit, LogitsTransform, SourceRun
from steer.errors import DecodingModeError, InvalidParameterError
from steer.methods.vlm.vcd.contrast import (
    contrast,
    diffuse,
    diffusion_noise,
    m3id,
    m3id_weight,
    noise_schedule,
    plausible,
)
from steer.registry import Method, param, register

__all__ = [
    "M3ID",
    "VCD",
    "contrast",
    "diffuse",
    "diffusion_noise",
    "m3id",
    "m3id_weight",
    "noise_schedule",
    "plausible",
]

BRANCH = "negative"
BATCH_HELP = "the contrastive branch: 'auto' (batched with the caller's rows where the call allows), 'batched', 'sequential'"


def _rows_of_last(logits: torch.Tensor) -> torch.Tensor:
    return logits[:, -1] if logits.dim() == 3 else logits


@register
class VCD(Method):
    name = "vcd"
    description = (
        "VCD (Leng et al., CVPR 2024): contrast the logits with those of a branch on a noised image, "
        "c = (1+alpha) l - alpha l', inside the plausibility set p >= beta max p; greedy, sampling and beams."
    )
    stage = "logits"
    needs_image_tokens = True

    @dataclass
    class Params:
        alpha: float = param(1.0, help="contrast strength alpha (scripts 1; sample() falls back to 0.5)", range=(0.0, None))
        beta: float = param(0.1, help="plausibility beta: keep p(v) >= beta max p; 0 = no mask, 1 = argmax of l", range=(0.0, 1.0))
        noise_step: int = param(500, help="diffusion step T of the noise (sigmoid schedule)", range=(0, 999))
        seed: int | None = param(None, help="noise RNG: None = torch's global CPU generator; int = a private CPU generator")
        distortion: Any = param(
            "diffusion", help="'diffusion' (the paper's noise) or callable(pixels, generator) -> pixels of one image"
        )
        sampling_only: bool = param(
            False, help="the official code's restriction: VCD only under sampling (a greedy or beam call is refused)"
        )
        batch: str = param("auto", help=BATCH_HELP, choices=("auto", "batched", "sequential"))

    def check(self) -> None:
        d = self.params.distortion
        if not (d == "diffusion" or callable(d)):
            raise InvalidParameterError(
                f"vcd: distortion must be 'diffusion' or a callable(pixels, generator) -> pixels, got {d!r}"
            )

    @property
    def branch_on(self) -> bool:
        return self.params.alpha > 0

    def is_noop(self) -> bool:
        if self.params.alpha > 0 or self.params.beta > 0:
            return False
        warnings.warn("vcd: alpha = 0 and beta = 0 leave the logits unchanged; nothing is installed", UserWarning, stacklevel=3)
        return True

    def initial_state(self) -> dict[str, Any]:
        p = self.params
        self.generator = torch.Generator().manual_seed(int(p.seed)) if p.seed is not None else None
        return {
            "alpha": p.alpha, "beta": p.beta, "noise_step": p.noise_step, "seed": p.seed, "branch": self.branch_on,
            "plausible": [],
        }  # fmt: skip

    def distortion(self) -> Callable[[torch.Tensor], torch.Tensor]:
        """The distortion of one image's pixels the branch uses (the method's generator advances per image)."""
        p = self.params
        if p.distortion == "diffusion":
            return diffusion_noise(p.noise_step, self.generator)
        user = p.distortion

        def distort(x: torch.Tensor) -> torch.Tensor:
            return user(x, self.generator)

        return distort

    def edits(self) -> list[Edit]:
        out: list[Edit] = []
        if self.branch_on:
            out += [
                SourceRun(name=BRANCH, inputs="distorted", follow=True, distort=self.distortion(), batch=self.params.batch),
                Collect(name=BRANCH, site="logits", runs=(BRANCH,)),
            ]
        out.append(LogitsTransform(fn=self._contrast))
        return out

    def _contrast(self, logits: torch.Tensor, ectx: EditContext) -> torch.Tensor | None:
        p = self.params
        generation = ectx.forward.generation
        if p.sampling_only and generation is not None and not generation["do_sample"]:
            raise DecodingModeError(
                "vcd: sampling_only=True (the official code's restriction) needs do_sample=True; this generate call "
                "decodes greedily or with beams. Pass do_sample=True, or drop sampling_only (steer applies VCD to "
                "every decoding mode)."
            )
        negative = ectx.collected(BRANCH) if self.branch_on else logits
        if self.branch_on:
            ectx.take(BRANCH)
        if negative is None:
            return None  # lm_head outside a forward of the model
        if negative.shape != logits.shape:
            raise RuntimeError(f"vcd: branch logits {tuple(negative.shape)} vs logits {tuple(logits.shape)}")
        alpha = p.alpha if self.branch_on else 0.0
        out = contrast(logits, negative, alpha, p.beta)
        ectx.once("state", lambda: self.state.update(plausible=[]))  # per call
        self.state["plausible"].append(torch.isfinite(_rows_of_last(out)).sum(dim=-1).tolist())
        return out


@register
class M3ID(Method):
    name = "m3id"
    description = (
        "M3ID (Favero et al., CVPR 2024; unverified port): l* = l + g w_t (l - l_u) against the image-free branch, "
        "w_t = exp(lam t) - 1, gated by max p < gate."
    )
    stage = "logits"
    needs_image_tokens = True

    @dataclass
    class Params:
        lam: float = param(0.02, help="lambda of w_t = exp(lambda t) - 1 (scan 0.001 / 0.02 / 0.03); 0 = no-op", range=(0.0, None))
        gate: float = param(0.3, help="act only where max p < gate (the paper's alpha; scan 0.2 / 0.3 / 0.5)", range=(0.0, 1.0))
        beta: float = param(0.0, help="optional plausibility mask p >= beta max p (AvisC: 0.1); 0 = off", range=(0.0, 1.0))
        batch: str = param("auto", help=BATCH_HELP, choices=("auto", "batched", "sequential"))

    def is_noop(self) -> bool:
        if self.params.lam > 0 or self.params.beta > 0:
            return False
        warnings.warn("m3id: lam = 0 (and beta = 0) leaves the logits unchanged; nothing is installed", UserWarning, stacklevel=3)
        return True

    def initial_state(self) -> dict[str, Any]:
        p = self.params
        return {"lam": p.lam, "gate": p.gate, "beta": p.beta, "weights": [], "gated": []}

    def edits(self) -> list[Edit]:
        return [
            SourceRun(name=BRANCH, inputs="text_only", follow=True, batch=self.params.batch),
            Collect(name=BRANCH, site="logits", runs=(BRANCH,)),
            LogitsTransform(fn=self._combine),
        ]

    def _combine(self, logits: torch.Tensor, ectx: EditContext) -> torch.Tensor | None:
        p = self.params
        uncond = ectx.take(BRANCH).get(None)
        if uncond is None:
            return None
        step = ectx.forward.forward_index + 1  # t = 1 for the first generated token
        try:
            weight = m3id_weight(step, p.lam)
        except OverflowError as exc:
            raise InvalidParameterError(f"{exc}; lower lam or max_new_tokens") from None
        last = m3id(logits[:, -1], uncond[:, -1], weight, p.gate, p.beta)
        gated = (torch.softmax(logits[:, -1].float(), dim=-1).amax(dim=-1) < p.gate).tolist()
        ectx.once("state", lambda: self.state.update(weights=[], gated=[]))  # per call
        self.state["weights"].append(weight)
        self.state["gated"].append(gated)
        out = logits.float().clone()
        out[:, -1] = last
        return out
