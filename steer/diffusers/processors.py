"""Attention processors: one small object per behaviour, swapped into only the ``attn2`` layers a method needs.

Every processor wraps the processor it replaces (``inner``: the stock `AttnProcessor2_0`, the classic
`AttnProcessor`, or another steer processor) and calls it unchanged whenever it has nothing to do, so that path
is bit-identical to stock. State lives in the processor objects and their controller, never in
``cross_attention_kwargs``. The ``__call__`` parameters are named exactly as diffusers' processors
(``attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs``) so that
`Attention.forward` filters ``cross_attention_kwargs`` for them as it does for the stock processor.

* :class:`RecordingProcessor` (A-STAR, Attend-and-Excite): while its recorder is on (a loss forward) it computes
  P = softmax(q·kᵀ·scale) explicitly with ``attn.get_attention_scores`` (upcast flags honoured), stores P
  (B·heads, h·w, 77) with its graph, and returns ``to_out(P·v)`` so gradients flow through P.
* :class:`DetectorGuidanceProcessor`: records per-object cross-attention maps (pre-edit) at attempt steps, and
  when masks are active edits the cond rows' scores with one additive bias into SDPA (specs/detector_guidance.md
  step 3): ``bias[p, j] = M_k(p)·β + (1 − M_k(p))·(ℓ_u[p, j] − ℓ_c[p, j])`` for j ∈ Φ_k, 0 elsewhere, so that
  softmax(ℓ_c + bias) = softmax(ℓ'_c) with ℓ'_c = M·(ℓ_c + β) + (1 − M)·ℓ_u.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from steer.diffusers.methods import DetectorGuidanceController


def _stock_classes() -> tuple[type, ...]:
    from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

    return (AttnProcessor2_0, AttnProcessor)


def check_wrappable(name: str, processor: Any) -> None:
    """Steer's processors replace the stock attention math; refuse processors that do something else."""
    if isinstance(processor, (*_stock_classes(), SteerProcessor)):
        return
    from steer.diffusers.common import SteerInputError

    raise SteerInputError(
        f"layer {name} uses {type(processor).__name__}; steer's pipeline methods work on the stock attention "
        "processors (AttnProcessor2_0, AttnProcessor). Reset them with pipe.unet.set_default_attn_processor() "
        "or unload the adapter (IP-Adapter, fused QKV, xformers) first."
    )


@dataclass
class _Frame:
    """Shapes and tensors the stock processors keep between projection and output."""

    residual: torch.Tensor
    input_ndim: int
    batch: int
    channel: int = 0
    height: int = 0
    width: int = 0


def _project(
    attn: Any, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None, temb: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, _Frame]:
    """The stock steps before attention: q, k, v as (batch, seq, heads·dim) and the frame to finish with."""
    residual = hidden_states
    if attn.spatial_norm is not None:
        hidden_states = attn.spatial_norm(hidden_states, temb)
    input_ndim = hidden_states.ndim
    frame = _Frame(residual=residual, input_ndim=input_ndim, batch=hidden_states.shape[0])
    if input_ndim == 4:
        b, c, h, w = hidden_states.shape
        frame.channel, frame.height, frame.width = c, h, w
        hidden_states = hidden_states.view(b, c, h * w).transpose(1, 2)
    if attn.group_norm is not None:
        hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
    query = attn.to_q(hidden_states)
    if encoder_hidden_states is None:
        encoder_hidden_states = hidden_states
    elif attn.norm_cross:
        encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
    key = attn.to_k(encoder_hidden_states)
    value = attn.to_v(encoder_hidden_states)
    return query, key, value, frame


def _finish(attn: Any, hidden_states: torch.Tensor, frame: _Frame) -> torch.Tensor:
    """The stock steps after attention: output projection, reshape back, residual, rescale."""
    hidden_states = attn.to_out[0](hidden_states)
    hidden_states = attn.to_out[1](hidden_states)
    if frame.input_ndim == 4:
        hidden_states = hidden_states.transpose(-1, -2).reshape(frame.batch, frame.channel, frame.height, frame.width)
    if attn.residual_connection:
        hidden_states = hidden_states + frame.residual
    return hidden_states / attn.rescale_output_factor


def _heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """(batch, seq, heads·dim) → (batch, heads, seq, dim)."""
    b, n, inner = x.shape
    return x.view(b, n, heads, inner // heads).transpose(1, 2)


class SteerProcessor:
    """Base of steer's processors: ``inner`` is the processor this one replaced, ``name`` its layer key."""

    def __init__(self, name: str, inner: Any) -> None:
        self.name = name
        self.inner = inner

    def _inner(
        self,
        attn: Any,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None,
        attention_mask: torch.Tensor | None,
        temb: torch.Tensor | None,
        kwargs: dict[str, Any],
    ) -> torch.Tensor:
        return self.inner(
            attn,
            hidden_states,
            encoder_hidden_states=encoder_hidden_states,
            attention_mask=attention_mask,
            temb=temb,
            **kwargs,
        )

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r}, inner={type(self.inner).__name__})"


class MapRecorder:
    """Holds the probabilities the recording processors store during one loss forward."""

    def __init__(self) -> None:
        self.active = False
        self.maps: dict[str, torch.Tensor] = {}

    def start(self) -> None:
        self.maps = {}
        self.active = True

    def stop(self) -> dict[str, torch.Tensor]:
        self.active = False
        maps, self.maps = self.maps, {}
        return maps


class RecordingProcessor(SteerProcessor):
    """Records P = softmax(q·kᵀ·scale) (B·heads, h·w, 77) during loss forwards; otherwise calls ``inner``."""

    def __init__(self, name: str, inner: Any, recorder: MapRecorder) -> None:
        super().__init__(name, inner)
        self.recorder = recorder

    def __call__(
        self,
        attn: Any,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> torch.Tensor:
        if not self.recorder.active or encoder_hidden_states is None:
            return self._inner(attn, hidden_states, encoder_hidden_states, attention_mask, temb, kwargs)
        query, key, value, frame = _project(attn, hidden_states, encoder_hidden_states, temb)
        batch, keys = encoder_hidden_states.shape[0], encoder_hidden_states.shape[1]
        mask = attn.prepare_attention_mask(attention_mask, keys, batch)
        query = attn.head_to_batch_dim(query)
        key = attn.head_to_batch_dim(key)
        value = attn.head_to_batch_dim(value)
        probs = attn.get_attention_scores(query, key, mask)
        self.recorder.maps[self.name] = probs
        out = attn.batch_to_head_dim(torch.bmm(probs, value))
        return _finish(attn, out, frame)


class DetectorGuidanceProcessor(SteerProcessor):
    """Detector Guidance on one ``attn2`` layer: CAM recording at attempt steps and the masked score edit."""

    def __init__(self, name: str, inner: Any, depth: int, controller: DetectorGuidanceController) -> None:
        super().__init__(name, inner)
        self.depth = depth
        self.controller = controller

    def __call__(
        self,
        attn: Any,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> torch.Tensor:
        ctrl = self.controller
        if encoder_hidden_states is None or not ctrl.live or ctrl.bypassed:
            return self._inner(attn, hidden_states, encoder_hidden_states, attention_mask, temb, kwargs)
        record = ctrl.recording and self.depth in ctrl.cam_depths
        edit = ctrl.any_masks
        if not record and not edit:
            return self._inner(attn, hidden_states, encoder_hidden_states, attention_mask, temb, kwargs)
        query, key, value, frame = _project(attn, hidden_states, encoder_hidden_states, temb)
        heads = attn.heads
        q, k, v = _heads(query, heads), _heads(key, heads), _heads(value, heads)
        n_images = q.shape[0] // 2
        n_query = q.shape[2]
        if record:
            with torch.no_grad():
                self._record(attn, q, k, n_images, n_query)
        if not edit:
            return self._inner(attn, hidden_states, encoder_hidden_states, attention_mask, temb, kwargs)
        bias = self._bias(attn, q, k, n_images, n_query)
        if attention_mask is not None:
            batch, keys = encoder_hidden_states.shape[0], encoder_hidden_states.shape[1]
            mask = attn.prepare_attention_mask(attention_mask, keys, batch)
            mask = mask.view(batch, heads, -1, mask.shape[-1])
            bias = bias + mask.float()
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=bias.to(q.dtype), dropout_p=0.0, is_causal=False, scale=attn.scale
        )
        out = out.transpose(1, 2).reshape(frame.batch, -1, heads * q.shape[-1]).to(q.dtype)
        return _finish(attn, out, frame)

    def _record(self, attn: Any, q: torch.Tensor, k: torch.Tensor, n_images: int, n_query: int) -> None:
        """Cond rows: per image the head means of Σ_{j∈D_k} p and Σ_{j∈D_k} ℓ as [K, h, w] (pre-edit)."""
        ctrl = self.controller
        grid = ctrl.grid_for(self.depth, n_query)
        for b in range(n_images):
            if not ctrl.due(b):
                continue
            row = n_images + b
            logits = (q[row].float() @ k[row].float().transpose(-1, -2)) * attn.scale  # [heads, N, 77]
            probs = logits.softmax(dim=-1)
            detect = ctrl.detect_positions(b)
            p_maps = torch.stack([probs[..., cols].sum(-1).mean(0) for cols in detect])
            l_maps = torch.stack([logits[..., cols].sum(-1).mean(0) for cols in detect])
            ctrl.store_maps(b, self.name, self.depth, p_maps.reshape(-1, *grid), l_maps.reshape(-1, *grid))

    def _bias(self, attn: Any, q: torch.Tensor, k: torch.Tensor, n_images: int, n_query: int) -> torch.Tensor:
        """Additive score bias [2B, heads, N, 77] (fp32): nonzero only on cond rows of images with masks."""
        ctrl = self.controller
        bias = torch.zeros(q.shape[0], q.shape[1], n_query, k.shape[2], dtype=torch.float32, device=q.device)
        grid = ctrl.grid_for(self.depth, n_query)
        for b in range(n_images):
            masks = ctrl.layer_masks(b, grid)  # [K, N] or None
            if masks is None:
                continue
            cols, objs = ctrl.edit_columns(b)
            cols_t = torch.as_tensor(cols, device=q.device)
            row = n_images + b
            l_c = (q[row].float() @ k[row][:, cols_t].float().transpose(-1, -2)) * attn.scale  # [heads, N, |Φ|]
            l_u = (q[b].float() @ k[b][:, cols_t].float().transpose(-1, -2)) * attn.scale
            m = masks[torch.as_tensor(objs, device=q.device)].transpose(0, 1)[None]  # [1, N, |Φ|]
            bias[row][..., cols_t] = m * ctrl.beta + (1.0 - m) * (l_u - l_c)
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


__all__ = [
    "DetectorGuidanceProcessor",
    "MapRecorder",
    "RecordingProcessor",
    "SteerProcessor",
    "check_wrappable",
    "edited_scores",
]
