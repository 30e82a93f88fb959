"""Detector Guidance masks: the provider interface, the CAM provider, mask painting and halos
(specs/detector_guidance.md steps 6–8).

* A provider is any callable ``provider(maps: ObjectMaps, step: StepInfo) -> list[Detection] | None``, called
  once per image per attempt; None means failure.
* Painting: masks are resized to the latent grid (nearest; float > 0.5); detections of unknown objects are
  dropped with a warning; in descending score (stable) each pixel goes to the first detection covering it;
  detections of one object are unioned ⇒ hard masks M_k pairwise disjoint. Success iff every M_k is non-empty.
* Halo (attempts before ``r(halo_until)``): H_k = blur(M_k)·(1 − Σ_j M_j), M_k ← max(M_k, H_k), blur = 5×5
  Gaussian (σ = ``halo_sigma``, reflect padding; torchvision's ``gaussian_blur`` kernel).
* CAM provider: per object S_k = mean over layers at ``cam_depths`` of the bilinear upsampled probability maps,
  smoothed (5×5 Gaussian σ = ``cam_sigma``, reflect), S_k ← S_k / max S_k; owner(p) = argmax_k S_k(p) (lowest k
  on ties) where max_k S_k(p) ≥ ``cam_threshold``; any object with area fraction < ``cam_min_area`` ⇒ None;
  else one detection per object with score = mean of S_k over its region.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F


@dataclass
class Detection:
    """One detected object: its index k, a mask (bool or float, any size: resized to the latent grid) and a score."""

    obj: int
    mask: torch.Tensor
    score: float

    @classmethod
    def from_box(
        cls, obj: int, box: tuple[float, float, float, float], score: float = 1.0, size: tuple[int, int] = (64, 64)
    ) -> Detection:
        """A detection from a box ``(x0, y0, x1, y1)`` in fractions of the image width/height (e.g. a box
        detector's normalised output), drawn on a ``size`` = (H, W) mask (resized to the latent grid later)."""
        h, w = size
        x0, y0, x1, y1 = box
        mask = torch.zeros(h, w, dtype=torch.bool)
        mask[int(round(y0 * h)) : int(round(y1 * h)), int(round(x0 * w)) : int(round(x1 * w))] = True
        return cls(obj, mask, float(score))


@dataclass
class ObjectMaps:
    """Per image, what a provider sees: cond-branch, head-averaged, pre-edit maps summed over D_k."""

    probs: dict[str, torch.Tensor]  # layer name → [K, h_l, w_l]
    logits: dict[str, torch.Tensor]
    layer_depth: dict[str, int]
    grid: tuple[int, int]  # latent (H_lat, W_lat)
    phrases: list[str] = field(default_factory=list)


@dataclass
class StepInfo:
    """Where the attempt happens: step i of T, timestep t, fraction i / T, image index b."""

    i: int
    T: int
    t: int
    fraction: float
    image: int


def gaussian_kernel1d(size: int, sigma: float) -> torch.Tensor:
    """torchvision's ``gaussian_blur`` kernel: exp(−x²/(2σ²)) at x = −(size−1)/2 … (size−1)/2, normalised."""
    half = (size - 1) * 0.5
    x = torch.linspace(-half, half, size, dtype=torch.float64)
    k = torch.exp(-0.5 * (x / sigma) ** 2)
    return (k / k.sum()).float()


def blur(maps: torch.Tensor, sigma: float, size: int = 5) -> torch.Tensor:
    """Separable size×size Gaussian blur with reflect padding over the last two dims (σ ≤ 0: unchanged)."""
    if sigma <= 0:
        return maps
    shape = maps.shape
    x = maps.reshape(-1, 1, shape[-2], shape[-1]).float()
    k = gaussian_kernel1d(size, sigma).to(x.device)
    pad = size // 2
    x = F.pad(x, (pad, pad, pad, pad), mode="reflect")
    x = F.conv2d(x, k.view(1, 1, 1, size))
    x = F.conv2d(x, k.view(1, 1, size, 1))
    return x.reshape(shape).to(maps.dtype)


def resize_mask(mask: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """Nearest resize of a [H', W'] mask to ``grid``, as float."""
    m = mask.float()
    if tuple(m.shape) != tuple(grid):
        m = F.interpolate(m[None, None], size=grid, mode="nearest")[0, 0]
    return m


def paint(detections: Sequence[Detection], num_objects: int, grid: tuple[int, int]) -> torch.Tensor | None:
    """Hard masks [K, H, W] from detections, or None when some object owns no pixel (failure)."""
    device = detections[0].mask.device if detections else torch.device("cpu")
    kept = []
    for det in detections:
        if not 0 <= int(det.obj) < num_objects:
            warnings.warn(
                f"Detector Guidance: dropped a detection for object {det.obj} (valid 0..{num_objects - 1})",
                stacklevel=2,
            )
            continue
        kept.append(det)
    masks = torch.zeros(num_objects, *grid, device=device)
    owned = torch.zeros(*grid, dtype=torch.bool, device=device)
    for det in sorted(kept, key=lambda d: -float(d.score)):  # sorted is stable: ties keep their order
        region = (resize_mask(det.mask.to(device), grid) > 0.5) & ~owned
        masks[int(det.obj)][region] = 1.0
        owned |= region
    if any(not bool(masks[k].any()) for k in range(num_objects)):
        return None
    return masks


def add_halo(masks: torch.Tensor, sigma: float) -> torch.Tensor:
    """M_k ← max(M_k, blur(M_k)·(1 − Σ_j M_j)) for hard masks [K, H, W]."""
    free = (1.0 - masks.sum(0)).clamp(min=0.0)
    halo = blur(masks, sigma) * free
    return torch.maximum(masks, halo)


class CamMaskProvider:
    """The default provider: object regions from the recorded cross-attention maps themselves (ours; weaker than
    the official trained detector, whose weights steer does not ship)."""

    def __init__(
        self,
        cam_depths: Sequence[int] = (1, 2),
        cam_sigma: float = 1.0,
        cam_threshold: float = 0.5,
        cam_min_area: float = 0.01,
    ) -> None:
        self.cam_depths = tuple(int(d) for d in cam_depths)
        self.cam_sigma = float(cam_sigma)
        self.cam_threshold = float(cam_threshold)
        self.cam_min_area = float(cam_min_area)

    def scores(self, maps: ObjectMaps) -> torch.Tensor:
        """S [K, H_lat, W_lat]: layer-mean of upsampled probability maps, smoothed, max-normalised."""
        layers = [n for n, d in maps.layer_depth.items() if d in self.cam_depths and n in maps.probs]
        if not layers:
            raise ValueError(f"no recorded maps at cam_depths {self.cam_depths}")
        ups = [
            F.interpolate(maps.probs[n][None].float(), size=maps.grid, mode="bilinear", align_corners=False)[0]
            for n in layers
        ]
        s = torch.stack(ups).mean(0)
        s = blur(s, self.cam_sigma)
        peak = s.flatten(1).max(-1).values.clamp(min=1e-12)
        return s / peak[:, None, None]

    def from_scores(self, s: torch.Tensor) -> list[Detection] | None:
        """Steps d–f of the spec on given normalised scores S [K, H, W]."""
        best, owner = s.max(dim=0)  # first maximal index on ties
        owner = torch.where(best >= self.cam_threshold, owner, torch.full_like(owner, -1))
        area = float(owner.numel())
        out = []
        for k in range(s.shape[0]):
            region = owner == k
            if float(region.sum()) / area < self.cam_min_area or not bool(region.any()):
                return None
            out.append(Detection(k, region, float(s[k][region].mean())))
        return out

    def __call__(self, maps: ObjectMaps, step: StepInfo) -> list[Detection] | None:
        return self.from_scores(self.scores(maps))

    def __repr__(self) -> str:
        return (
            f"CamMaskProvider(cam_depths={self.cam_depths}, cam_sigma={self.cam_sigma}, "
            f"cam_threshold={self.cam_threshold}, cam_min_area={self.cam_min_area})"
        )


__all__ = [
    "CamMaskProvider",
    "Detection",
    "ObjectMaps",
    "StepInfo",
    "add_halo",
    "blur",
    "gaussian_kernel1d",
    "paint",
    "resize_mask",
]
