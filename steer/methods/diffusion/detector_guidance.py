"""Detector Guidance (Liu et al., arXiv 2306.02236; specs/detector_guidance.md) with a pluggable mask provider.

Per image b and object k (a phrase of the prompt: edit tokens Φ_k, its detection tokens D_k ⊆ Φ_k):

* attempts (steps i < T − 1): the first at r(first_attempt), then r(retry_every) after a failed one and
  r(redetect_every) after a successful one, with r(x) = ⌊x·T + 0.5⌋; at an attempt every ``attn2`` layer at
  ``cam_depths`` records, on the cond row and before the edit, the head means of Σ_{j∈D_k} p and
  Σ_{j∈D_k} ℓ as [K, h, w] (:func:`object_maps`); after the UNet call the provider turns them into detections,
  painted into hard masks M_k (:mod:`steer.methods.diffusion.detection`), with halos at i < r(halo_until);
* from the step after a successful attempt, on every ``attn2`` layer, the cond row's scores of object k's tokens
  become ℓ'_c = M_k·(ℓ_c + β) + (1 − M_k)·ℓ_u (ℓ_u: the uncond row's scores), applied as one additive bias
  into fused attention: bias[p, j] = M_k(p)·β + (1 − M_k(p))·(ℓ_u[p, j] − ℓ_c[p, j]) for j ∈ Φ_k, 0 elsewhere,
  so softmax(ℓ_c + bias) = softmax(ℓ'_c) (:func:`score_bias`; reference form :func:`edited_scores`).

Works in the caller's own pipeline (and inside ``handle.pipe`` when combined with a latent update); needs CFG.
``Steering.state["detector_guidance"]``: ``images`` (per image: its attempts — step, t, success, halo, areas —
and the current masks) and ``tokens`` (per image: the edited positions and each object's detection positions).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.nn.functional as F

from steer.edits.kinds import Edit
from steer.edits.pipeline import ProcessorEdit
from steer.edits.pipeline_context import AttnCall, PipelineContext, StepContext
from steer.edits.pipeline_facts import PipelineInfo
from steer.errors import InvalidParameterError, SteerInputError
from steer.methods.diffusion.detection import CamMaskProvider, ObjectMaps, StepInfo, add_halo, paint
from steer.methods.diffusion.tokens import check_prompt_2, content_positions, images_of, resolve_concepts
from steer.registry import Method, param, register


def steps_at(x: float, total: int) -> int:
    """r(x) = ⌊x·T + 0.5⌋."""
    return int(math.floor(x * total + 0.5))


# ---------------------------------------------------------------------------------------------------------
# the edit's math


def object_maps(
    q: torch.Tensor, k: torch.Tensor, scale: float, row: int, detect: Sequence[Sequence[int]]
) -> tuple[torch.Tensor, torch.Tensor]:
    """One row's maps per object, [K, N] each: head means of Σ_{j∈D_k} p and of Σ_{j∈D_k} ℓ (fp32, pre-edit).

    ``q`` [rows, heads, N, d], ``k`` [rows, heads, keys, d]; ℓ = q·kᵀ·scale, p = softmax(ℓ) over the keys.
    """
    logits = (q[row].float() @ k[row].float().transpose(-1, -2)) * scale  # [heads, N, keys]
    probs = logits.softmax(dim=-1)
    p_maps = torch.stack([probs[..., list(cols)].sum(-1).mean(0) for cols in detect])
    l_maps = torch.stack([logits[..., list(cols)].sum(-1).mean(0) for cols in detect])
    return p_maps, l_maps


def score_bias(
    q: torch.Tensor,
    k: torch.Tensor,
    scale: float,
    masks: Sequence[torch.Tensor | None],
    columns: Sequence[tuple[list[int], list[int]]],
    beta: float,
) -> torch.Tensor:
    """The additive score bias [2B, heads, N, keys] (fp32) of the DG edit, nonzero only on cond rows of images
    with masks.

    ``q`` / ``k``: a CFG call's projected queries / keys [2B, heads, N or keys, d] (rows: B uncond, then B cond);
    ``masks[b]``: image b's M_k on this layer's queries [K, N], or None; ``columns[b]``: (Φ positions, the object
    of each). bias[p, j] = M_k(p)·β + (1 − M_k(p))·(ℓ_u[p, j] − ℓ_c[p, j]) for j ∈ Φ_k.
    """
    n_images = q.shape[0] // 2
    bias = torch.zeros(q.shape[0], q.shape[1], q.shape[2], k.shape[2], dtype=torch.float32, device=q.device)
    for b in range(n_images):
        image_masks = masks[b]
        if image_masks is None:
            continue
        cols, objs = columns[b]
        cols_t = torch.as_tensor(cols, device=q.device)
        row = n_images + b
        l_c = (q[row].float() @ k[row][:, cols_t].float().transpose(-1, -2)) * scale  # [heads, N, |Φ|]
        l_u = (q[b].float() @ k[b][:, cols_t].float().transpose(-1, -2)) * scale
        m = image_masks[torch.as_tensor(objs, device=q.device)].transpose(0, 1)[None]  # [1, N, |Φ|]
        bias[row][..., cols_t] = m * beta + (1.0 - m) * (l_u - l_c)
    return bias


def edited_scores(
    l_c: torch.Tensor, l_u: torch.Tensor, masks: torch.Tensor, cols: list[int], objs: list[int], beta: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference form of the DG edit on explicit scores (tests, docs).

    ``l_c``, ``l_u``: [..., N, tokens] scaled scores of a cond row and its uncond row; ``masks`` [K, N];
    ``cols``/``objs``: edited token positions and their object. Returns (ℓ'_c, bias) with
    ℓ'_c[p, j] = M_k(p)·(ℓ_c[p, j] + β) + (1 − M_k(p))·ℓ_u[p, j] on j ∈ Φ_k (other tokens unchanged) and
    bias = ℓ'_c − ℓ_c.
    """
    edited = l_c.clone()
    bias = torch.zeros_like(l_c)
    for j, obj in zip(cols, objs):
        m = masks[obj]
        edited[..., j] = m * (l_c[..., j] + beta) + (1 - m) * l_u[..., j]
        bias[..., j] = m * beta + (1 - m) * (l_u[..., j] - l_c[..., j])
    return edited, bias


def layer_masks(masks: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """M_k on a layer's query grid (nearest from the latent grid), flattened: [K, h·w]."""
    m = masks
    if tuple(m.shape[-2:]) != tuple(grid):
        m = F.interpolate(m[None], size=grid, mode="nearest")[0]
    return m.reshape(m.shape[0], -1)


# ---------------------------------------------------------------------------------------------------------
# the method


def _default_cam_depths() -> list[int]:
    return [1, 2]


@dataclass
class DetectorGuidanceParams:
    objects: list | None = param(None, help="object phrases of the prompt (e.g. ['a red cat', 'a blue dog']); a list per prompt")
    beta: float = param(0.7, help="β: score boost of an object's tokens inside its mask", range=(0.0, None))
    first_attempt: float = param(0.2, help="first detection attempt, as a fraction of T", range=(0.0, 1.0))
    retry_every: float = param(0.04, help="spacing after a failed attempt, fraction of T", range=(0.0, 1.0))
    redetect_every: float = param(0.2, help="spacing after a successful attempt, fraction of T", range=(0.0, 1.0))
    halo_until: float = param(0.6, help="attempts at i < r(halo_until) get soft halos", range=(0.0, 1.0))
    halo_sigma: float = param(1.1, help="σ of the 5×5 halo blur", range=(0.0, None))
    provider: Any = param(None, help="mask provider: provider(ObjectMaps, StepInfo) -> list[Detection] | None; None = CamMaskProvider(cam_*)")
    detect_tokens: Literal["last", "content"] = param("last", help="tokens whose maps locate an object: 'last' (head noun) or 'content' (no articles)")
    cam_depths: list = param(help="CAM layer depths recorded at attempts", default_factory=_default_cam_depths)
    cam_sigma: float = param(1.0, help="σ of the CAM provider's 5×5 smoothing (0 = off)", range=(0.0, None))
    cam_threshold: float = param(0.5, help="minimum normalised score for a pixel to be owned", range=(0.0, 1.0))
    cam_min_area: float = param(0.01, help="minimum area fraction per object (else the attempt fails)", range=(0.0, 1.0))


@dataclass
class ImageState:
    """One image's detection schedule and masks [K, H_lat, W_lat] (``version`` counts mask changes)."""

    next_attempt: int
    masks: torch.Tensor | None = None
    version: int = 0
    attempts: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class DGState:
    """DG's working state for one generation (``ctx.memo["dg"]``): per image the edited columns (Φ positions and
    their objects), the detection positions D_k and the phrases; the schedule; and this step's plan (``due``:
    images with an attempt now; ``recording`` / ``any_masks`` / ``live``)."""

    columns: list[tuple[list[int], list[int]]]
    detect: list[list[list[int]]]
    phrases: list[list[str]]
    images: list[ImageState] = field(default_factory=list)
    total_steps: int = 0
    latent_grid: tuple[int, int] = (0, 0)
    device: torch.device | None = None
    due: set[int] = field(default_factory=set)
    recording: bool = False
    any_masks: bool = False
    live: bool = False


@register
class DetectorGuidance(Method):
    """Detector Guidance (Liu et al., 2023) with a pluggable mask provider."""

    name = "detector_guidance"
    description = (
        "Detector Guidance (arXiv 2306.02236): locate each object from cross-attention maps during denoising, then "
        "boost its phrase inside its region and use the uncond scores outside; needs CFG; pipe(...) unchanged"
    )
    target = "pipeline"
    stage = "attention"
    Params = DetectorGuidanceParams
    model: PipelineInfo

    def check(self) -> None:
        p = self.params
        if not p.objects:
            raise InvalidParameterError("detector_guidance: give objects=['a red cat', 'a blue dog'] (phrases of the prompt)")
        for name in ("first_attempt", "retry_every", "redetect_every"):
            value = getattr(p, name)
            if not 0.0 < value < 1.0:
                raise InvalidParameterError(f"detector_guidance: {name} must be in (0, 1), got {value}")
        if not 0.0 < p.cam_threshold < 1.0:
            raise InvalidParameterError("detector_guidance: cam_threshold must be in (0, 1)")
        if p.cam_min_area >= 1.0:
            raise InvalidParameterError("detector_guidance: cam_min_area must be in [0, 1)")
        depths = self.model.available_depths()
        bad = [d for d in p.cam_depths if d not in depths]
        if bad or not p.cam_depths:
            raise InvalidParameterError(
                f"detector_guidance: cam_depths {list(p.cam_depths)} must be depths holding attn2 layers: {depths}"
            )
        if p.provider is not None and not callable(p.provider):
            raise InvalidParameterError("detector_guidance: provider must be callable(ObjectMaps, StepInfo)")

    def initial_state(self) -> dict[str, Any]:
        return {"images": [], "tokens": None}

    def edits(self) -> list[Edit]:
        p = self.params
        self.cam_depths = {int(d) for d in p.cam_depths}
        self.provider = p.provider or CamMaskProvider(p.cam_depths, p.cam_sigma, p.cam_threshold, p.cam_min_area)
        return [
            ProcessorEdit(
                depths="all",
                scores=self._scores,
                acts=self._acts,
                begin=self._begin,
                before_step=self._before_step,
                after_step=self._after_step,
            )
        ]

    # ---- per generation ---------------------------------------------------------------------------------
    def _begin(self, ctx: PipelineContext) -> None:
        if not ctx.cfg:
            raise SteerInputError(
                "detector_guidance needs classifier-free guidance (it edits the cond branch towards the uncond one); "
                "call the pipeline with guidance_scale > 1"
            )
        check_prompt_2("detector_guidance", ctx.prompts, ctx.prompt_2)
        tok = self.model.tokenizer
        spec = list(self.params.objects or [])
        per_prompt = resolve_concepts(tok, ctx.prompts, ctx.n_prompts, spec, what="detector_guidance", single_token=False)
        columns, detect, phrases = [], [], []
        for p, concepts in enumerate(per_prompt):
            ids = tok.prompt_ids(ctx.prompts[p]) if ctx.prompts is not None else None
            cols = [c for concept in concepts for c in concept]
            objs = [k for k, concept in enumerate(concepts) for _ in concept]
            columns.append((cols, objs))
            if self.params.detect_tokens == "last" or ids is None:
                detect.append([[concept[-1]] for concept in concepts])
            else:
                detect.append([content_positions(tok, ids, concept) for concept in concepts])
            items = spec[p] if spec and isinstance(spec[0], (list, tuple)) else spec
            phrases.append([str(x) for x in items])
        gen = DGState(
            columns=images_of(columns, ctx.per_prompt),
            detect=images_of(detect, ctx.per_prompt),
            phrases=images_of(phrases, ctx.per_prompt),
        )
        ctx.memo["dg"] = gen
        self.state["images"] = []
        self.state["tokens"] = [{"edit": list(c), "detect": d} for (c, _), d in zip(gen.columns, gen.detect)]

    def _start(self, gen: DGState, total_steps: int, n_images: int) -> None:
        gen.total_steps = total_steps
        first = steps_at(self.params.first_attempt, total_steps)
        gen.images = [ImageState(next_attempt=first) for _ in range(n_images)]
        self.state["images"] = [{"attempts": [], "masks": None} for _ in range(n_images)]

    # ---- per step -----------------------------------------------------------------------------------------
    def _before_step(self, ctx: StepContext) -> None:
        gen: DGState | None = ctx.memo.get("dg")
        if gen is None:
            return
        gen.live = gen.recording = gen.any_masks = False
        if not gen.columns:
            return
        n_images = ctx.rows // 2
        if n_images != len(gen.columns):
            return
        if ctx.i == 0 or not gen.images:
            self._start(gen, ctx.num_steps, n_images)
        gen.latent_grid = ctx.latent_grid
        gen.device = ctx.device
        last = gen.total_steps - 1
        gen.due = {b for b, s in enumerate(gen.images) if s.next_attempt == ctx.i and ctx.i < last}
        gen.recording = bool(gen.due)
        gen.any_masks = any(s.masks is not None for s in gen.images)
        gen.live = gen.recording or gen.any_masks

    def _acts(self, call: AttnCall) -> bool:
        gen: DGState | None = call.memo.get("dg")
        if gen is None or not gen.live:
            return False
        return (gen.recording and call.depth in self.cam_depths) or gen.any_masks

    def _scores(self, q: torch.Tensor, k: torch.Tensor, call: AttnCall) -> torch.Tensor | None:
        gen: DGState = call.memo["dg"]
        n_images = q.shape[0] // 2
        h, w = call.grid
        if gen.recording and call.depth in self.cam_depths:
            with torch.no_grad():
                recorded = {}
                for b in sorted(gen.due):
                    if b >= n_images:
                        continue
                    p_maps, l_maps = object_maps(q, k, call.scale, n_images + b, gen.detect[b])
                    recorded[b] = (p_maps.reshape(-1, h, w), l_maps.reshape(-1, h, w))
                call.keep(recorded)
        if not gen.any_masks:
            return None
        masks = [self._layer_masks(gen, b, call) for b in range(n_images)]
        return score_bias(q, k, call.scale, masks, gen.columns, float(self.params.beta))

    @staticmethod
    def _layer_masks(gen: DGState, b: int, call: AttnCall) -> torch.Tensor | None:
        """Image b's masks on this layer's grid, cached in the layer's processor until they change."""
        image = gen.images[b]
        if image.masks is None:
            return None
        cached = call.layer_memo.get(b)
        if cached is None or cached[0] != image.version:
            cached = (image.version, layer_masks(image.masks, call.grid))
            call.layer_memo[b] = cached
        return cached[1]

    def _after_step(self, kept: dict[str, Any], ctx: StepContext) -> None:
        gen: DGState | None = ctx.memo.get("dg")
        if gen is None:
            return
        was_live = gen.live
        gen.live = False
        if not was_live or not gen.due:
            return
        p = self.params
        total = gen.total_steps
        i = ctx.i
        for b in sorted(gen.due):
            img = gen.images[b]
            layers = [name for name, per_image in kept.items() if b in per_image]
            detections = None
            if layers:
                maps = ObjectMaps(
                    probs={name: kept[name][b][0] for name in layers},
                    logits={name: kept[name][b][1] for name in layers},
                    layer_depth={name: self.model.depths[name] for name in layers},
                    grid=gen.latent_grid,
                    phrases=gen.phrases[b],
                )
                detections = self.provider(maps, StepInfo(i, total, int(ctx.t), i / total, b))
            masks = paint(detections, len(gen.detect[b]), gen.latent_grid) if detections else None
            success = masks is not None
            halo = i < steps_at(p.halo_until, total)
            if success:
                assert masks is not None
                if halo:
                    masks = add_halo(masks, p.halo_sigma)
                img.masks = masks.to(gen.device)
                img.version += 1
                img.next_attempt = i + max(1, steps_at(p.redetect_every, total))
            else:
                img.next_attempt = i + max(1, steps_at(p.retry_every, total))
            record = {
                "step": i,
                "t": int(ctx.t),
                "success": success,
                "halo": bool(success and halo),
                "areas": None if masks is None else [float((m > 0.5).float().mean()) for m in masks],
            }
            img.attempts.append(record)
            self.state["images"][b]["attempts"].append(record)
            self.state["images"][b]["masks"] = None if img.masks is None else img.masks.detach().cpu()
        gen.due = set()


__all__ = [
    "DetectorGuidance",
    "DetectorGuidanceParams",
    "DGState",
    "ImageState",
    "edited_scores",
    "layer_masks",
    "object_maps",
    "score_bias",
    "steps_at",
]
