"""VCD's and M3ID's equations as pure tensor functions (spec ``shared/specs/vcd.md``).

**Distortion** (VCD step 1), on the preprocessed pixels x of one image, fp32, cast back, no clipping:

    β_k = 1e-5 + (5e-3 − 1e-5) · sigmoid(s_k),   s = linspace(−6, 6, 1000)        (sigmoid schedule)
    ᾱ_T = Π_{k ≤ T} (1 − β_k)                                                    (0-based, inclusive)
    x'  = √ᾱ_T · x + √(1 − ᾱ_T) · ε,   ε ~ N(0, I)                               (T = 500: 0.8630173 x + 0.5051745 ε)

**Contrast** (VCD step 4), l the clean logits, l' the distorted branch's, fp32:

    c = (1 + α) · l − α · l'
    c_v = −inf  unless  l_v ≥ ln β + max l          (⇔ p(v) ≥ β · max p under the clean softmax; β = 0: no mask)

**M3ID** (unverified: pinned from MitigV's Algorithm 1 and AvisC's sampler), l_u the image-free branch's logits,
t = 1 for the first generated token:

    w_t = (1 − γ_t) / γ_t = e^{λt} − 1,   γ_t = e^{−λt}
    g   = 1[max softmax(l) < gate]   (per row)
    l*  = l + g · w_t · (l − l_u)     (then the optional β mask of VCD)
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

NUM_STEPS = 1000
BETA_MIN, BETA_MAX = 1e-5, 5e-3


def noise_schedule(step: int) -> tuple[float, float]:
    """``(√ᾱ_T, √(1 − ᾱ_T))`` of the sigmoid schedule at diffusion step ``step`` (0..999), fp32.

    >>> [round(v, 6) for v in noise_schedule(500)]
    [0.863017, 0.505174]
    """
    if not 0 <= step < NUM_STEPS:
        raise ValueError(f"noise_step must be in 0..{NUM_STEPS - 1}, got {step}")
    s = torch.linspace(-6, 6, NUM_STEPS, dtype=torch.float32)
    betas = BETA_MIN + (BETA_MAX - BETA_MIN) * torch.sigmoid(s)
    alpha_bar = torch.cumprod(1 - betas, dim=0)[step]
    return float(alpha_bar.sqrt()), float((1 - alpha_bar).sqrt())


def diffuse(x: Tensor, noise: Tensor, step: int) -> Tensor:
    """``√ᾱ_T x + √(1 − ᾱ_T) ε`` in fp32, returned in ``x``'s dtype (no clipping)."""
    keep, mix = noise_schedule(step)
    return (keep * x.float() + mix * noise.to(x.device, torch.float32)).to(x.dtype)


def diffusion_noise(step: int, generator: torch.Generator | None) -> Callable[[Tensor], Tensor]:
    """The distortion of one image: ``x -> diffuse(x, ε, step)`` with ε drawn on the CPU, in the tensor's shape
    (``generator=None``: torch's global CPU generator, as the official LLaVA script's ``randn_like``)."""

    def distort(x: Tensor) -> Tensor:
        noise = torch.randn(tuple(x.shape), generator=generator, dtype=torch.float32)
        return diffuse(x, noise, step)

    return distort


def plausible(logits: Tensor, beta: float) -> Tensor:
    """bool, same shape: ``l_v ≥ ln β + max l`` over the last dim (β = 0: every token)."""
    if beta <= 0:
        return torch.ones_like(logits, dtype=torch.bool)
    cutoff = math.log(beta) + logits.amax(dim=-1, keepdim=True)
    return logits >= cutoff


def contrast(logits: Tensor, negative: Tensor, alpha: float, beta: float) -> Tensor:
    """VCD's contrast ``(1 + α) l − α l'`` with the plausibility mask from ``l`` (fp32 result).

    >>> c = contrast(torch.tensor([2.0, 1.8, 0.0, -3.0, -2.5]), torch.tensor([2.5, 0.5, 0.0, -3.0, -9.0]), 1.0, 0.1)
    >>> c.tolist()
    [1.5, 3.0999999046325684, 0.0, -inf, -inf]
    """
    clean, neg = logits.float(), negative.float()
    out = (1 + alpha) * clean - alpha * neg
    return out.masked_fill(~plausible(clean, beta), float("-inf"))


def m3id_weight(step: int, lam: float) -> float:
    """``w_t = e^{λt} − 1`` (float64, ``expm1``); raises ``OverflowError`` when it is not finite."""
    w = math.expm1(lam * step)
    if not math.isfinite(w):
        raise OverflowError(f"m3id: w_t = exp({lam} * {step}) - 1 is not finite")
    return w


def m3id(logits: Tensor, unconditioned: Tensor, weight: float, gate: float, beta: float = 0.0) -> Tensor:
    """``l* = l + g · w · (l − l_u)`` with ``g = 1[max softmax(l) < gate]`` per row, then the β mask (fp32).

    >>> l = torch.tensor([0.5, 0.4, 0.3, 0.2, 0.1]); lu = torch.tensor([0.9, 0.1, 0.3, 0.2, 0.1])
    >>> [round(v, 6) for v in m3id(l, lu, 1.718282, 0.3).tolist()]
    [-0.187313, 0.915485, 0.3, 0.2, 0.1]
    """
    clean, lu = logits.float(), unconditioned.float()
    gated = (torch.softmax(clean, dim=-1).amax(dim=-1, keepdim=True) < gate).float()
    out = clean + gated * weight * (clean - lu)
    return out.masked_fill(~plausible(clean, beta), float("-inf"))


__all__ = ["contrast", "diffuse", "diffusion_noise", "m3id", "m3id_weight", "noise_schedule", "plausible"]
