"""Concept maps and the losses of A-STAR and Attend-and-Excite (specs/astar.md, steps 4–6).

Notation: P_l = a recorded cross-attention probability tensor of layer l, shape (B·heads, h·w, 77); concepts
m = 1..K with token positions T_m; token span S (``"prompt"``: 1..e−1 with e the EOT position; ``"ae"``: 1..75).

* Ā = mean over (layer, head) of P reshaped to (h, w, 77), in fp32.
* Ã = softmax(100 · Ā[..., S]) over S.
* A^m = G * mean_{j∈T_m} Ã[..., j], G a 3×3 Gaussian (reflect padding 1) with weights ∝ exp(−d²/(2σ²)),
  normalised (A&E's kernel under ``ae_compat``: ∝ exp(−(d/(2σ))²)).
* Â^m = A^m / max A^m (gradient through the max), or A^m when ``normalize=False``.
* L_seg = Σ_{m<n} Σ_p min(Â^m, Â^n) / Σ_p (Â^m + Â^n)
* L_ret = Σ_m [1 − Σ_p min(Â^m, B^m) / Σ_p (Â^m + B^m)],  B^m = 1[Â^m / max Â^m > τ] from the previous
  altered step (detached).
* L_AE = max_m max(0, 1 − max_p A^m)   (Attend-and-Excite, maps not max-normalised).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

SOFTMAX_SCALE = 100.0


def gaussian_kernel3(sigma: float, ae_compat: bool = False) -> torch.Tensor:
    """3×3 kernel, weights ∝ exp(−d²/(2σ²)) (``ae_compat``: exp(−d²/(4σ²)), A&E's), normalised to sum 1."""
    coords = torch.tensor([-1.0, 0.0, 1.0], dtype=torch.float64)
    d2 = coords[:, None] ** 2 + coords[None, :] ** 2
    denom = 4.0 * sigma**2 if ae_compat else 2.0 * sigma**2
    kernel = torch.exp(-d2 / denom)
    return (kernel / kernel.sum()).float()


def smooth(maps: torch.Tensor, sigma: float, ae_compat: bool = False) -> torch.Tensor:
    """3×3 Gaussian smoothing with reflect padding 1 over the last two dims; σ = 0 returns ``maps``."""
    if sigma <= 0:
        return maps
    shape = maps.shape
    flat = maps.reshape(-1, 1, shape[-2], shape[-1])
    kernel = gaussian_kernel3(sigma, ae_compat).to(device=maps.device, dtype=maps.dtype)[None, None]
    out = F.conv2d(F.pad(flat, (1, 1, 1, 1), mode="reflect"), kernel)
    return out.reshape(shape)


def average_maps(
    probs: Sequence[torch.Tensor], batch: int, grid: tuple[int, int], width_first: bool = False
) -> torch.Tensor:
    """Ā: the mean over layers × heads of recorded probabilities → [batch, h, w, tokens], fp32.

    ``probs``: per layer (batch·heads, h·w, tokens), batch-major rows (``head_to_batch_dim``).
    ``width_first``: reshape the query axis as (w, h) and return [batch, w, h, tokens] (A&E's ``attn_res``).
    """
    h, w = grid
    a, b = (w, h) if width_first else (h, w)
    per_layer = []
    for p in probs:
        if p.shape[1] != h * w:
            raise ValueError(f"recorded map has {p.shape[1]} queries, expected {h}×{w}")
        heads = p.shape[0] // batch
        per_layer.append(p.float().reshape(batch, heads, a, b, p.shape[-1]))
    return torch.cat(per_layer, dim=1).mean(dim=1)


def token_maps(
    avg: torch.Tensor,
    concepts: Sequence[Sequence[int]],
    span: Sequence[int],
    sigma: float,
    ae_compat: bool = False,
) -> torch.Tensor:
    """A^m for one image: ``avg`` [h, w, tokens] → [K, h, w] (softmax over the span, mean of the concept's
    columns, 3×3 Gaussian smoothing)."""
    span = list(span)
    index = {pos: i for i, pos in enumerate(span)}
    text = torch.softmax(SOFTMAX_SCALE * avg[..., span], dim=-1)
    maps = []
    for positions in concepts:
        cols = [index[p] for p in positions]
        maps.append(text[..., cols].mean(dim=-1))
    return smooth(torch.stack(maps), sigma, ae_compat)


def max_normalize(maps: torch.Tensor) -> torch.Tensor:
    """Â = A / max A per map (over the last two dims), gradient through the max."""
    peak = maps.flatten(-2).max(dim=-1).values
    return maps / peak[..., None, None]


def segregation_loss(maps: torch.Tensor) -> torch.Tensor:
    """L_seg = Σ_{m<n} Σ min(Â^m, Â^n) / Σ (Â^m + Â^n) for ``maps`` [K, h, w]; 0 (no graph) when K < 2."""
    k = maps.shape[0]
    if k < 2:
        return maps.new_zeros(())
    total = maps.new_zeros(())
    for m in range(k):
        for n in range(m + 1, k):
            total = total + torch.minimum(maps[m], maps[n]).sum() / (maps[m] + maps[n]).sum()
    return total


def retention_loss(maps: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """L_ret = Σ_m [1 − Σ min(Â^m, B^m) / Σ (Â^m + B^m)] for ``maps``, ``masks`` [K, h, w]."""
    masks = masks.to(maps.dtype)
    overlap = torch.minimum(maps, masks).flatten(1).sum(-1)
    union = (maps + masks).flatten(1).sum(-1)
    return (1.0 - overlap / union).sum()


def retention_masks(maps: torch.Tensor, threshold: float) -> torch.Tensor:
    """B^m = 1[Â^m / max Â^m > τ] (detached, float)."""
    maps = maps.detach()
    return (max_normalize(maps) > threshold).to(maps.dtype)


def attend_excite_loss(maps: torch.Tensor) -> torch.Tensor:
    """L_AE = max_m max(0, 1 − max_p A^m) for ``maps`` [K, h, w]."""
    peaks = maps.flatten(1).max(dim=-1).values
    return torch.clamp(1.0 - peaks, min=0.0).max(dim=0).values


def linspace(start: float, stop: float, num: int) -> list[float]:
    """``numpy.linspace(start, stop, num)`` in float64, bit for bit: ``i·step + start``, the last value ``stop``."""
    if num <= 0:
        return []
    if num == 1:
        return [float(start)]
    step = (stop - start) / (num - 1)
    values = [i * step + start for i in range(num)]
    values[-1] = float(stop)
    return values


def step_sizes(scale: float, num_steps: int) -> list[float]:
    """α_i = s · sqrt(linspace(1, 0.5, T))[i] (A&E's schedule; T = 50: α_0 = s, α_49 = s·√0.5), in float64."""
    return [scale * math.sqrt(x) for x in linspace(1.0, 0.5, num_steps)]


__all__ = [
    "attend_excite_loss",
    "average_maps",
    "gaussian_kernel3",
    "linspace",
    "max_normalize",
    "retention_loss",
    "retention_masks",
    "segregation_loss",
    "smooth",
    "step_sizes",
    "token_maps",
]
