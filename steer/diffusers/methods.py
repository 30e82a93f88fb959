"""The pipeline methods: A-STAR, Attend-and-Excite and Detector Guidance (specs/astar.md,
specs/detector_guidance.md), registered in steer's method registry with the pipeline families ("sd", "sdxl").

Each method's ``Params`` carries the paper's defaults; :meth:`PipelineMethod.controller` builds the object that
owns the method's processors and per-generation state and reacts to the runtime's events (``on_call`` at
``encode_prompt``, ``before_unet`` / ``after_unet`` around each counted UNet call).

A-STAR (Agarwal et al., ICCV 2023), at step i < i_max, on the loop latent z:
    g = ∇_z Σ_images [w_seg·L_seg(Â(z)) + w_ret·L_ret(Â(z), B)],   z ← z − α_i·g,   B ← 1[Â/max Â > τ]
with α_i = s·sqrt(linspace(1, 0.5, T))[i] and the maps/losses of :mod:`steer.diffusers.losses`.

Attend-and-Excite (Chefer et al., SIGGRAPH 2023): L_AE = max_m max(0, 1 − max A^m); iterative refinement at the
threshold steps until L ≤ 1 − thr (at most ``max_refinement_steps``), then z ← z − α_i∇L at steps
i < ``max_iter_to_alter``.

Detector Guidance (Liu et al., 2023): per image, masks M_k from cross-attention maps at scheduled attempts; on
every ``attn2`` layer the cond row's scores of object k's phrase tokens become M_k·(ℓ_c + β) + (1 − M_k)·ℓ_u.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import torch
import torch.nn.functional as F

from steer.diffusers.common import (
    PIPELINE_FAMILIES,
    PipelineAdapter,
    SteerInputError,
    content_positions,
    eot_position,
    grid_at,
    images_of,
    prompt_ids,
    resolve_concepts,
)
from steer.diffusers.detection import CamMaskProvider, ObjectMaps, StepInfo, add_halo, paint
from steer.diffusers.losses import (
    attend_excite_loss,
    average_maps,
    max_normalize,
    retention_loss,
    retention_masks,
    segregation_loss,
    step_sizes,
    token_maps,
)
from steer.diffusers.processors import (
    DetectorGuidanceProcessor,
    MapRecorder,
    RecordingProcessor,
    check_wrappable,
)
from steer.errors import InvalidParameterError
from steer.registry import Method, param, register

if TYPE_CHECKING:
    from steer.diffusers.runtime import CallInfo, PipelineRuntime

logger = logging.getLogger("steer.diffusers")


def _r(x: float, total: int) -> int:
    """r(x) = floor(x·T + 0.5)."""
    import math

    return int(math.floor(x * total + 0.5))


# ---------------------------------------------------------------------------------------------------------
# base classes


class PipelineMethod(Method):
    """A method for diffusers pipelines. ``updates_latents``: it needs ``handle.pipe`` (a from_pipe pipeline)."""

    families: ClassVar[tuple[str, ...]] = PIPELINE_FAMILIES
    stage: ClassVar[str] = "attention"
    updates_latents: ClassVar[bool] = False
    adapter: PipelineAdapter  # type: ignore[assignment]

    def edits(self) -> list[Any]:
        raise TypeError(f"{self.name} is a pipeline method; steer.apply(pipe, ...) installs it")

    def controller(self) -> Controller:
        raise NotImplementedError


class Controller:
    """Owns a method's processors and per-generation state; receives the runtime's events."""

    name: str = ""

    def __init__(self, method: PipelineMethod) -> None:
        self.method = method
        self.params = method.params
        self.adapter = method.adapter
        self.state = method.state
        self.runtime: PipelineRuntime | None = None
        self.pipe: Any = method.adapter.pipe

    def wrap(self, processors: dict[str, Any]) -> dict[str, Any]:
        return processors

    def on_call(self, info: CallInfo) -> None:
        pass

    def before_unet(self, call: CallInfo, i: int, t: Any, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        return None

    def after_unet(self, call: CallInfo, i: int, t: Any) -> None:
        pass

    def detach(self) -> None:
        pass


@dataclass
class CondInputs:
    """The cond half of a UNet call's conditioning (what a loss forward needs)."""

    encoder_hidden_states: torch.Tensor
    added_cond_kwargs: dict[str, torch.Tensor] | None
    cross_attention_kwargs: dict[str, Any] | None

    def rows(self, index: slice) -> CondInputs:
        added = None
        if self.added_cond_kwargs is not None:
            added = {k: v[index] for k, v in self.added_cond_kwargs.items()}
        return CondInputs(self.encoder_hidden_states[index], added, self.cross_attention_kwargs)


# ---------------------------------------------------------------------------------------------------------
# A-STAR and Attend-and-Excite


def _labels(tokenizer: Any, prompt: str | None, concepts: list[list[int]]) -> list[str]:
    """Readable concept names for map grids: the concept's tokens (``</w>`` dropped), or its positions."""
    if prompt is None:
        return [str(c) for c in concepts]
    ids = prompt_ids(tokenizer, prompt)
    return ["".join(tokenizer.convert_ids_to_tokens([ids[q] for q in c])).replace("</w>", " ").strip() for c in concepts]


def _token_help() -> str:
    return "concepts: words of the prompt (str) or CLIP positions (int); one list per prompt for several prompts"


@dataclass
class _LatentParams:
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


@dataclass
class AStarParams(_LatentParams):
    max_step: int | None = param(None, help="update at steps i < min(max_step, T−1); None = all but the last", range=(0, None))
    w_seg: float = param(1.0, help="weight of the segregation loss", range=(0.0, None))
    w_ret: float = param(1.0, help="weight of the retention loss", range=(0.0, None))
    mask_threshold: float = param(0.5, help="τ: retention mask B = 1[Â/max Â > τ]", range=(0.0, 1.0))
    normalize: bool = param(True, help="max-normalise each concept map before the losses")


def _default_thresholds() -> dict[int, float]:
    return {0: 0.05, 10: 0.5, 20: 0.8}


@dataclass
class AttendExciteParams(_LatentParams):
    thresholds: dict = param(
        help="refinement step → threshold: refine until max attention ≥ threshold", default_factory=_default_thresholds
    )
    max_iter_to_alter: int = param(25, help="update the latent at steps i < this (absolute indices, as A&E)", range=(0, None))
    max_refinement_steps: int = param(20, help="cap on iterative refinement iterations", range=(1, None))


class _LatentMethod(PipelineMethod):
    updates_latents: ClassVar[bool] = True
    default_span: ClassVar[str] = "prompt"

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
        depths = self.adapter.available_depths()
        if p.attn_depth not in depths:
            raise InvalidParameterError(
                f"{self.name}: attn_depth={p.attn_depth} holds no cross-attention layer in this UNet; depths with "
                f"attn2 layers: {depths}"
            )

    def span_mode(self) -> str:
        p = self.params
        if p.softmax_span is not None:
            return p.softmax_span
        if p.ae_compat:
            return "ae"
        return self.default_span

    @property
    def concept_spec(self) -> list:
        p = self.params
        return list(p.tokens if p.tokens is not None else p.indices)


class LatentController(Controller):
    """Shared machinery of A-STAR and A&E: recorders on the depth-d ``attn2`` layers, concept resolution per
    call, loss forwards (cond only, under the runtime's aux guard) and the in-place latent update."""

    method: _LatentMethod

    def __init__(self, method: _LatentMethod) -> None:
        super().__init__(method)
        self.recorder = MapRecorder()
        self.layers = method.adapter.layers_at([method.params.attn_depth])
        self.span = method.span_mode()
        self.active = False
        self.cfg = False
        self._warned = False
        self.concepts: list[list[list[int]]] = []
        self.spans: list[list[int]] = []
        self.alphas: list[float] = []
        self.total_steps = 0
        self.last_cond: CondInputs | None = None
        self.last_latents: torch.Tensor | None = None
        self.last_t: Any = None
        self.state.update({"log": [], "maps": {}, "tokens": None, "grid": None})

    # ---- processors ----------------------------------------------------------------------------------
    def wrap(self, processors: dict[str, Any]) -> dict[str, Any]:
        out = dict(processors)
        for name in self.layers:
            check_wrappable(name, out[name])
            out[name] = RecordingProcessor(name, out[name], self.recorder)
        return out

    # ---- per call -----------------------------------------------------------------------------------------
    def on_call(self, info: CallInfo) -> None:
        self.active = info.pipe is self.pipe
        if not self.active:
            return
        pipe = self.pipe
        order = getattr(pipe.scheduler, "order", 1)
        if order != 1:
            raise SteerInputError(
                f"{self.method.name}: scheduler {type(pipe.scheduler).__name__} has order {order}; use a first-order "
                "scheduler (DDIM, PNDM, DPM-Solver++, Euler, Euler-a, LMS, UniPC)"
            )
        if getattr(pipe.unet.config, "time_cond_proj_dim", None) is not None:
            raise SteerInputError(f"{self.method.name}: LCM / guidance-embedded UNets are not supported")
        if info.prompt_2 is not None and info.prompts is not None and info.prompt_2 not in (info.prompts, info.prompts[0]):
            raise SteerInputError(f"{self.method.name}: prompt_2 must be None or equal to prompt")
        m = self.method
        per_prompt = resolve_concepts(
            pipe.tokenizer,
            info.prompts,
            info.n_prompts,
            m.concept_spec,
            what=m.name,
            single_token=m.params.multi_token == "error",
        )
        spans: list[list[int]] = []
        for p in range(info.n_prompts):
            if self.span == "ae":
                length = int(pipe.tokenizer.model_max_length)
                span = list(range(1, length - 1))
            else:
                if info.prompts is None:
                    raise SteerInputError(
                        f"{m.name}: softmax_span='prompt' needs the prompt text to find its end; this call passed "
                        "prompt_embeds. Pass prompt=..., or softmax_span='ae'."
                    )
                ids = prompt_ids(pipe.tokenizer, info.prompts[p])
                span = list(range(1, eot_position(pipe.tokenizer, ids)))
            for concept in per_prompt[p]:
                outside = [q for q in concept if q not in span]
                if outside:
                    raise SteerInputError(f"{m.name}: token position(s) {outside} are outside the softmax span {span[0]}..{span[-1]}")
            spans.append(span)
        self.concepts = images_of(per_prompt, info.per_prompt)
        self.spans = images_of(spans, info.per_prompt)
        self.cfg = info.cfg
        self.total_steps = 0
        self.reset_generation()
        self.state["log"] = []
        self.state["maps"] = {}
        self.state["tokens"] = [[list(c) for c in concepts] for concepts in self.concepts]
        self.state["labels"] = images_of(
            [_labels(pipe.tokenizer, info.prompts[p] if info.prompts else None, per_prompt[p]) for p in range(info.n_prompts)],
            info.per_prompt,
        )

    def reset_generation(self) -> None:
        pass

    # ---- step hooks ---------------------------------------------------------------------------------------
    def wants_step(self, i: int, total: int) -> bool:
        raise NotImplementedError

    def wants_latents_after(self, i: int) -> bool:
        return self.active and self.total_steps > 0 and self.wants_step(i + 1, self.total_steps)

    def before_unet(self, call: CallInfo, i: int, t: Any, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        if call.pipe is not self.pipe or not self.active:
            if not self._warned:
                self._warned = True
                logger.warning(
                    "steer: %s is applied but the UNet was called outside handle.pipe (no latent update runs there). "
                    "Call handle.pipe(...) to generate with it.",
                    self.method.name,
                )
            return None
        if i == 0:
            self.total_steps = call.num_steps()
            self.alphas = step_sizes(self.params.step_size, self.total_steps)
        if not self.wants_step(i, self.total_steps):
            return None
        z = self.pipe._steer_latents
        sample = args[0] if args else kwargs["sample"]
        if z is None or z.shape[0] * (2 if self.cfg else 1) != sample.shape[0]:
            raise RuntimeError(f"steer {self.method.name}: lost track of the pipeline's latents at step {i}")
        n = z.shape[0]
        if len(self.concepts) != n:
            raise SteerInputError(f"{self.method.name}: {len(self.concepts)} images expected, the UNet got {n}")
        ehs = kwargs.get("encoder_hidden_states")
        if ehs is None and len(args) > 2:
            ehs = args[2]
        if ehs is None:
            raise RuntimeError(f"steer {self.method.name}: the UNet call has no encoder_hidden_states")
        added = kwargs.get("added_cond_kwargs")
        if added is not None and "image_embeds" in added:
            raise SteerInputError(f"{self.method.name}: IP-Adapter inputs are not supported")
        scheduler = self.pipe.scheduler
        expected = scheduler.scale_model_input(z, t) if hasattr(scheduler, "scale_model_input") else z
        if not torch.equal(sample[sample.shape[0] - n :], expected):
            raise RuntimeError(f"steer {self.method.name}: the UNet input at step {i} is not the tracked latent")
        cond = CondInputs(ehs, added, kwargs.get("cross_attention_kwargs"))
        if self.cfg:
            cond = cond.rows(slice(n, None))
        self.last_cond, self.last_latents, self.last_t = cond, z.detach().clone(), t
        new = self.update(i, t, z, cond)
        if new is None:
            return None
        z.copy_(new)
        x = torch.cat([z] * 2) if self.cfg else z
        if hasattr(self.pipe.scheduler, "scale_model_input"):
            x = self.pipe.scheduler.scale_model_input(x, t)
        if args:
            args = (x, *args[1:])
        else:
            kwargs = {**kwargs, "sample": x}
        return args, kwargs

    def update(self, i: int, t: Any, z: torch.Tensor, cond: CondInputs) -> torch.Tensor | None:
        raise NotImplementedError

    # ---- loss forwards --------------------------------------------------------------------------------------
    def forward_maps(
        self, z: torch.Tensor, t: Any, cond: CondInputs, images: range
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """One cond-only UNet forward at z (a leaf requiring grad) → (leaf, A^m per image [K, h, w] with graph)."""
        assert self.runtime is not None
        p = self.params
        z0 = z.detach().requires_grad_(True)
        x = z0 if p.ae_compat else self.pipe.scheduler.scale_model_input(z0, t)
        self.recorder.start()
        try:
            with self.runtime.aux():
                self.pipe.unet(
                    x,
                    t,
                    encoder_hidden_states=cond.encoder_hidden_states,
                    added_cond_kwargs=cond.added_cond_kwargs,
                    cross_attention_kwargs=cond.cross_attention_kwargs,
                    return_dict=False,
                )
        finally:
            probs = self.recorder.stop()
        missing = [n for n in self.layers if n not in probs]
        if missing:
            raise RuntimeError(f"steer {self.method.name}: no maps recorded for {missing}")
        grid = grid_at(z.shape[-2], z.shape[-1], p.attn_depth)
        self.state["grid"] = grid
        avg = average_maps([probs[n] for n in self.layers], z.shape[0], grid, width_first=p.ae_compat)
        maps = [
            token_maps(avg[j], self.concepts[b], self.spans[b], p.smooth_sigma, p.ae_compat)
            for j, b in enumerate(images)
        ]
        return z0, maps

    def losses_at(self, z: torch.Tensor, retention: list[torch.Tensor | None] | None = None) -> dict[str, Any]:
        """Evaluate the method's loss at latent ``z`` with the last step's conditioning (diagnostics, tests)."""
        raise NotImplementedError


class AStarController(LatentController):
    name = "astar"
    params: AStarParams

    def reset_generation(self) -> None:
        self.masks: list[torch.Tensor | None] = [None] * len(self.concepts)

    def i_max(self, total: int) -> int:
        limit = total - 1
        if self.params.max_step is not None:
            limit = min(self.params.max_step, limit)
        return limit

    def wants_step(self, i: int, total: int) -> bool:
        return i < self.i_max(total)

    def _losses(
        self, maps: list[torch.Tensor], masks: list[torch.Tensor | None]
    ) -> tuple[list[torch.Tensor], list[torch.Tensor | None], list[torch.Tensor], list[torch.Tensor]]:
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

    def losses_at(self, z: torch.Tensor, retention: list[torch.Tensor | None] | None = None) -> dict[str, Any]:
        """L, L_seg, L_ret per image and ∇_z Σ L at ``z`` (the last step's t and conditioning; retention masks
        default to the current B)."""
        assert self.last_cond is not None
        masks = retention if retention is not None else self.masks
        with torch.enable_grad():
            z0, maps = self.forward_maps(z, self.last_t, self.last_cond, range(z.shape[0]))
            totals, ret, seg, _ = self._losses(maps, masks)
            loss = torch.stack([t.float() for t in totals]).sum()
            grad = torch.autograd.grad(loss, z0)[0] if loss.requires_grad else torch.zeros_like(z0)
        return {
            "loss": float(loss.detach()),
            "L_seg": [float(s.detach()) for s in seg],
            "L_ret": [None if r is None else float(r.detach()) for r in ret],
            "grad": grad.detach(),
        }

    def update(self, i: int, t: Any, z: torch.Tensor, cond: CondInputs) -> torch.Tensor | None:
        p = self.params
        alpha = self.alphas[i]
        with torch.enable_grad():
            z0, maps = self.forward_maps(z, t, cond, range(z.shape[0]))
            totals, ret, seg, norm = self._losses(maps, self.masks)
            loss = sum(totals[1:], totals[0])
            grad = torch.autograd.grad(loss, z0)[0] if loss.requires_grad else None
        new_masks = [retention_masks(m, p.mask_threshold) for m in norm]
        self.masks = list(new_masks)
        self.state["retention_masks"] = [m.cpu() for m in new_masks]
        self.state["maps"][i] = [m.detach().float().cpu() for m in maps]
        for b in range(len(maps)):
            l_ret = ret[b]
            self.state["log"].append(
                {
                    "step": i,
                    "t": int(t),
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


class AttendExciteController(LatentController):
    name = "attend_and_excite"
    params: AttendExciteParams

    def wants_step(self, i: int, total: int) -> bool:
        return i < self.params.max_iter_to_alter or i in self.params.thresholds

    def _ae_losses(self, maps: list[torch.Tensor]) -> torch.Tensor:
        return torch.stack([attend_excite_loss(m) for m in maps])

    def losses_at(self, z: torch.Tensor, retention: list[torch.Tensor | None] | None = None) -> dict[str, Any]:
        assert self.last_cond is not None
        with torch.enable_grad():
            z0, maps = self.forward_maps(z, self.last_t, self.last_cond, range(z.shape[0]))
            losses = self._ae_losses(maps)
            grad = torch.autograd.grad(losses.sum(), z0)[0] if losses.requires_grad else torch.zeros_like(z0)
        return {"loss": float(losses.detach().sum()), "L_ae": [float(x) for x in losses.detach()], "grad": grad.detach()}

    @staticmethod
    def _step(z0: torch.Tensor, losses: torch.Tensor, which: torch.Tensor, alpha: float) -> torch.Tensor:
        """z ← z − α∇L for the images in ``which`` (a bool [n]); others keep z0. Detached result."""
        if not bool(which.any()):
            return z0.detach()
        grad = torch.autograd.grad(losses[which].sum(), z0)[0]
        moved = (z0.detach().float() - alpha * grad.float()).to(z0.dtype)
        return torch.where(which[:, None, None, None], moved, z0.detach())

    def update(self, i: int, t: Any, z: torch.Tensor, cond: CondInputs) -> torch.Tensor | None:
        p = self.params
        alpha = self.alphas[i]
        threshold = p.thresholds.get(i)
        alter = i < p.max_iter_to_alter
        groups = [range(b, b + 1) for b in range(z.shape[0])] if p.ae_compat else [range(z.shape[0])]
        results = []
        maps_out: list[torch.Tensor] = []
        for images in groups:
            rows = slice(images.start, images.stop)
            zg, cg = z[rows], cond.rows(rows)
            iterations = 0
            with torch.enable_grad():
                z0, maps = self.forward_maps(zg, t, cg, images)
                losses = self._ae_losses(maps)
                first = losses.detach().clone()
                if threshold is not None and bool((losses.detach() > 1.0 - threshold).any()):
                    active = losses.detach() > 1.0 - threshold
                    while bool(active.any()):
                        iterations += 1
                        z0, maps = self.forward_maps(zg, t, cg, images)
                        losses = self._ae_losses(maps)
                        measured = losses.detach()
                        zg = self._step(z0, losses, active & (measured != 0), alpha)
                        active = active & (measured > 1.0 - threshold)
                        if iterations >= p.max_refinement_steps:
                            break
                    z0, maps = self.forward_maps(zg, t, cg, images)
                    losses = self._ae_losses(maps)
                if alter:
                    zg = self._step(z0, losses, losses.detach() != 0, alpha)
                else:
                    zg = z0.detach()
            results.append(zg)
            maps_out.extend(m.detach().float().cpu() for m in maps)
            for j, b in enumerate(images):
                self.state["log"].append(
                    {
                        "step": i,
                        "t": int(t),
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


@register
class AStar(_LatentMethod):
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

    def controller(self) -> Controller:
        return AStarController(self)


@register
class AttendAndExcite(_LatentMethod):
    """Attend-and-Excite (Chefer et al., SIGGRAPH 2023), the maintained peer of A-STAR."""

    name = "attend_and_excite"
    description = (
        "Attend-and-Excite (SIGGRAPH 2023): raise each concept's maximum cross-attention by latent updates in "
        "early steps, with iterative refinement at threshold steps; call handle.pipe"
    )
    Params = AttendExciteParams

    def span_mode(self) -> str:
        p = self.params
        if p.softmax_span is not None:
            return p.softmax_span
        if p.ae_compat or self.adapter.variant == "sd1":
            return "ae"
        return "prompt"  # the official SD2.1 mode (and SDXL)

    def check(self) -> None:
        super().check()
        thresholds = self.params.thresholds
        if isinstance(thresholds, dict):  # JSON / CLI give string keys
            thresholds = {int(k) if isinstance(k, str) and k.strip().isdigit() else k: v for k, v in thresholds.items()}
        if not isinstance(thresholds, dict) or not all(
            isinstance(k, int) and not isinstance(k, bool) and isinstance(v, (int, float)) and 0.0 <= v <= 1.0
            for k, v in thresholds.items()
        ):
            raise InvalidParameterError(
                f"attend_and_excite: thresholds must map step indices (int) to thresholds in [0, 1], got {thresholds!r}"
            )
        self.params.thresholds = {int(k): float(v) for k, v in thresholds.items()}

    def controller(self) -> Controller:
        return AttendExciteController(self)


# ---------------------------------------------------------------------------------------------------------
# Detector Guidance


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


@register
class DetectorGuidance(PipelineMethod):
    """Detector Guidance (Liu et al., 2023) with a pluggable mask provider."""

    name = "detector_guidance"
    description = (
        "Detector Guidance (arXiv 2306.02236): locate each object from cross-attention maps during denoising, then "
        "boost its phrase inside its region and use the uncond scores outside; needs CFG; pipe(...) unchanged"
    )
    Params = DetectorGuidanceParams

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
        depths = self.adapter.available_depths()
        bad = [d for d in p.cam_depths if d not in depths]
        if bad or not p.cam_depths:
            raise InvalidParameterError(
                f"detector_guidance: cam_depths {list(p.cam_depths)} must be depths holding attn2 layers: {depths}"
            )
        if p.provider is not None and not callable(p.provider):
            raise InvalidParameterError("detector_guidance: provider must be callable(ObjectMaps, StepInfo)")

    def controller(self) -> Controller:
        return DetectorGuidanceController(self)


@dataclass
class _ImageState:
    next_attempt: int
    masks: torch.Tensor | None = None  # [K, H_lat, W_lat]
    attempts: list[dict[str, Any]] = field(default_factory=list)


class DetectorGuidanceController(Controller):
    name = "detector_guidance"
    params: DetectorGuidanceParams

    def __init__(self, method: DetectorGuidance) -> None:
        super().__init__(method)
        p = self.params
        self.beta = float(p.beta)
        self.cam_depths = {int(d) for d in p.cam_depths}
        self.provider = p.provider or CamMaskProvider(p.cam_depths, p.cam_sigma, p.cam_threshold, p.cam_min_area)
        self.layer_depths = dict(method.adapter.depths)
        self.live = False
        self.recording = False
        self.any_masks = False
        self.images: list[_ImageState] = []
        self.edit_cols: list[tuple[list[int], list[int]]] = []
        self.detect: list[list[list[int]]] = []
        self.phrases: list[list[str]] = []
        self.total_steps = 0
        self.latent_grid: tuple[int, int] = (0, 0)
        self._due: set[int] = set()
        self._maps: dict[int, dict[str, Any]] = {}
        self._layer_cache: dict[tuple[int, tuple[int, int]], torch.Tensor] = {}
        self.call_pipe: Any = None
        self._sample_device = torch.device("cpu")
        self.state.update({"images": [], "tokens": None})

    # ---- processors ----------------------------------------------------------------------------------
    def wrap(self, processors: dict[str, Any]) -> dict[str, Any]:
        out = dict(processors)
        for name, depth in self.layer_depths.items():
            check_wrappable(name, out[name])
            out[name] = DetectorGuidanceProcessor(name, out[name], depth, self)
        return out

    # ---- what the processors ask --------------------------------------------------------------------------
    @property
    def bypassed(self) -> bool:
        return self.runtime is not None and self.runtime.bypassed

    def due(self, b: int) -> bool:
        return b in self._due

    def detect_positions(self, b: int) -> list[list[int]]:
        return self.detect[b]

    def edit_columns(self, b: int) -> tuple[list[int], list[int]]:
        return self.edit_cols[b]

    def grid_for(self, depth: int, n_query: int) -> tuple[int, int]:
        grid = grid_at(self.latent_grid[0], self.latent_grid[1], depth)
        if grid[0] * grid[1] != n_query:
            raise RuntimeError(f"steer detector_guidance: layer at depth {depth} has {n_query} queries, expected {grid}")
        return grid

    def layer_masks(self, b: int, grid: tuple[int, int]) -> torch.Tensor | None:
        """M_k on a layer's grid (nearest from the latent grid), flattened: [K, h·w]."""
        masks = self.images[b].masks
        if masks is None:
            return None
        key = (b, grid)
        cached = self._layer_cache.get(key)
        if cached is None:
            m = masks
            if tuple(m.shape[-2:]) != tuple(grid):
                m = F.interpolate(m[None], size=grid, mode="nearest")[0]
            cached = m.reshape(m.shape[0], -1)
            self._layer_cache[key] = cached
        return cached

    def store_maps(self, b: int, name: str, depth: int, probs: torch.Tensor, logits: torch.Tensor) -> None:
        slot = self._maps.setdefault(b, {"probs": {}, "logits": {}, "depth": {}})
        slot["probs"][name] = probs
        slot["logits"][name] = logits
        slot["depth"][name] = depth

    # ---- per call -----------------------------------------------------------------------------------------
    def on_call(self, info: CallInfo) -> None:
        if not info.cfg:
            raise SteerInputError(
                "detector_guidance needs classifier-free guidance (it edits the cond branch towards the uncond one); "
                "call the pipeline with guidance_scale > 1"
            )
        if info.prompt_2 is not None and info.prompts is not None and info.prompt_2 not in (info.prompts, info.prompts[0]):
            raise SteerInputError("detector_guidance: prompt_2 must be None or equal to prompt")
        tok = info.pipe.tokenizer
        per_prompt = resolve_concepts(
            tok, info.prompts, info.n_prompts, list(self.params.objects or []), what="detector_guidance", single_token=False
        )
        edit_cols, detect, phrases = [], [], []
        for p, concepts in enumerate(per_prompt):
            ids = prompt_ids(tok, info.prompts[p]) if info.prompts is not None else None
            cols = [c for concept in concepts for c in concept]
            objs = [k for k, concept in enumerate(concepts) for _ in concept]
            edit_cols.append((cols, objs))
            if self.params.detect_tokens == "last" or ids is None:
                detect.append([[concept[-1]] for concept in concepts])
            else:
                detect.append([content_positions(tok, ids, concept) for concept in concepts])
            spec = list(self.params.objects or [])
            items = spec[p] if spec and isinstance(spec[0], (list, tuple)) else spec
            phrases.append([str(x) for x in items])
        self.edit_cols = images_of(edit_cols, info.per_prompt)
        self.detect = images_of(detect, info.per_prompt)
        self.phrases = images_of(phrases, info.per_prompt)
        self.call_pipe = info.pipe
        self.images = []
        self.total_steps = 0
        self.live = False
        self.state["images"] = []
        self.state["tokens"] = [{"edit": list(c), "detect": d} for (c, _), d in zip(self.edit_cols, self.detect)]

    def _start(self, call: CallInfo, n_images: int) -> None:
        self.total_steps = call.num_steps()
        first = _r(self.params.first_attempt, self.total_steps)
        self.images = [_ImageState(next_attempt=first) for _ in range(n_images)]
        self._layer_cache = {}
        self.state["images"] = [{"attempts": [], "masks": None} for _ in range(n_images)]

    def before_unet(self, call: CallInfo, i: int, t: Any, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        self.live = False
        self.recording = False
        self.any_masks = False
        if call.pipe is None or call.pipe is not self.call_pipe or not self.edit_cols:
            return None
        sample = args[0] if args else kwargs["sample"]
        n_images = sample.shape[0] // 2
        if n_images != len(self.edit_cols):
            return None
        if i == 0 or not self.images:
            self._start(call, n_images)
        self.latent_grid = (int(sample.shape[-2]), int(sample.shape[-1]))
        self._sample_device = sample.device
        last = self.total_steps - 1
        self._due = {b for b, s in enumerate(self.images) if s.next_attempt == i and i < last}
        self._maps = {}
        self.recording = bool(self._due)
        self.any_masks = any(s.masks is not None for s in self.images)
        self.live = self.recording or self.any_masks
        return None

    def after_unet(self, call: CallInfo, i: int, t: Any) -> None:
        was_live = self.live
        self.live = False
        if not was_live or not self._due:
            return
        p = self.params
        total = self.total_steps
        for b in sorted(self._due):
            img = self.images[b]
            slot = self._maps.get(b)
            detections = None
            if slot:
                maps = ObjectMaps(
                    probs=slot["probs"],
                    logits=slot["logits"],
                    layer_depth=slot["depth"],
                    grid=self.latent_grid,
                    phrases=self.phrases[b],
                )
                detections = self.provider(maps, StepInfo(i, total, int(t), i / total, b))
            k = len(self.detect[b])
            masks = paint(detections, k, self.latent_grid) if detections else None
            success = masks is not None
            halo = i < _r(p.halo_until, total)
            if success:
                assert masks is not None
                if halo:
                    masks = add_halo(masks, p.halo_sigma)
                img.masks = masks.to(self._sample_device)
                img.next_attempt = i + max(1, _r(p.redetect_every, total))
                self._layer_cache = {key: v for key, v in self._layer_cache.items() if key[0] != b}
            else:
                img.next_attempt = i + max(1, _r(p.retry_every, total))
            record = {
                "step": i,
                "t": int(t),
                "success": success,
                "halo": bool(success and halo),
                "areas": None if masks is None else [float((m > 0.5).float().mean()) for m in masks],
            }
            img.attempts.append(record)
            self.state["images"][b]["attempts"].append(record)
            self.state["images"][b]["masks"] = None if img.masks is None else img.masks.detach().cpu()
        self._due = set()
        self._maps = {}


__all__ = [
    "AStar",
    "AStarController",
    "AStarParams",
    "AttendAndExcite",
    "AttendExciteController",
    "AttendExciteParams",
    "Controller",
    "DetectorGuidance",
    "DetectorGuidanceController",
    "DetectorGuidanceParams",
    "LatentController",
    "PipelineMethod",
]
