"""The attention processor steer swaps into an ``attn2`` layer that some :class:`ProcessorEdit` names.

One :class:`EditProcessor` per steered layer. It holds the layer's per-layer state: its key and depth, the
processor it replaced (``inner``: the stock `AttnProcessor2_0` or the classic `AttnProcessor`), the edits
installed there (in apply order, each with its pipeline's facts), what each edit kept in the current UNet
forward (``kept``) and each edit's ``layer_memo`` for the generation. It asks its runtime for the current pass
(which edits act, their step contexts) and calls ``inner`` unchanged whenever no edit acts, so that path is
bit-identical to stock. The ``__call__`` parameters are named exactly as diffusers' processors so that
`Attention.forward` filters ``cross_attention_kwargs`` for them as it does for the stock processor.

Two paths when edits act (`steer.edits.pipeline.ProcessorEdit`):

* score mode only: q, k, v per head; the edits' biases summed (plus the layer's mask) go into one fused
  ``scaled_dot_product_attention`` call; no bias at all → ``inner``;
* some edit in probability mode: P = ``attn.get_attention_scores(q, k, mask + biases)`` (upcast flags honoured),
  the edits read P, output = ``to_out(P·v)`` so gradients flow through P.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, Protocol

import torch
import torch.nn.functional as F

from steer.backends.diffusers.passes import Pass
from steer.edits.pipeline import ProcessorEdit
from steer.edits.pipeline_context import AttnCall
from steer.edits.pipeline_facts import PipelineInfo, grid_at
from steer.errors import SteerInputError


class PassSource(Protocol):
    """What a processor asks its runtime: the UNet forward running now (None: every edit off)."""

    def current_pass(self) -> Pass | None: ...


def _stock_classes() -> tuple[type, ...]:
    from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

    return (AttnProcessor2_0, AttnProcessor)


def check_wrappable(name: str, processor: Any) -> None:
    """Steer's processor replaces the stock attention math; refuse processors that do something else."""
    if isinstance(processor, (*_stock_classes(), EditProcessor)):
        return
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
    attn: Any, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor, temb: torch.Tensor | None
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
    if attn.norm_cross:
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


def _sum(biases: list[torch.Tensor]) -> torch.Tensor:
    total = biases[0]
    for bias in biases[1:]:
        total = total + bias
    return total


Acting = list[tuple[ProcessorEdit, AttnCall]]


class EditProcessor:
    """The steer processor of one ``attn2`` layer (see the module docstring)."""

    def __init__(self, name: str, depth: int, inner: Any, runtime: PassSource) -> None:
        self.name = name
        self.depth = depth
        self.inner = inner
        self.runtime = runtime
        self.edits: list[tuple[ProcessorEdit, PipelineInfo | None]] = []
        self.kept: dict[int, tuple[int, Any]] = {}  # id(edit) -> (sequence in the forward, value)
        self.memo: dict[int, dict[Any, Any]] = {}  # id(edit) -> the edit's layer_memo for the generation

    def add(self, edit: ProcessorEdit, info: PipelineInfo | None) -> None:
        self.edits.append((edit, info))

    # ---- per-layer state ---------------------------------------------------------------------------------
    def _keep(self, current: Pass, edit: ProcessorEdit, value: Any) -> None:
        self.kept[id(edit)] = (current.next_sequence(), value)

    def take(self, edit: ProcessorEdit) -> tuple[int, Any] | None:
        """Remove and return (sequence, value) of what ``edit`` kept here in the current forward."""
        return self.kept.pop(id(edit), None)

    def new_generation(self) -> None:
        self.kept.clear()
        self.memo.clear()

    # ---- the call ----------------------------------------------------------------------------------------
    def _acting(self, attn: Any) -> Acting:
        """The edits that act in this call, with their contexts."""
        current = self.runtime.current_pass()
        if current is None:
            return []
        grid = grid_at(current.latent_grid[0], current.latent_grid[1], self.depth)
        acting: Acting = []
        for edit, info in self.edits:
            if not current.admits(edit):
                continue
            call = AttnCall(
                step=current.step(edit.owner, info),
                layer=self.name,
                depth=self.depth,
                grid=grid,
                heads=int(attn.heads),
                scale=float(attn.scale),
                keep=functools.partial(self._keep, current, edit),
                layer_memo=self.memo.setdefault(id(edit), {}),
            )
            if edit.acts is None or edit.acts(call):
                acting.append((edit, call))
        return acting

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

    def __call__(
        self,
        attn: Any,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> torch.Tensor:
        acting = self._acting(attn) if encoder_hidden_states is not None and self.edits else []
        if not acting:
            return self._inner(attn, hidden_states, encoder_hidden_states, attention_mask, temb, kwargs)
        assert encoder_hidden_states is not None
        query, key, value, frame = _project(attn, hidden_states, encoder_hidden_states, temb)
        grid = acting[0][1].grid
        if grid[0] * grid[1] != query.shape[1]:
            raise RuntimeError(
                f"steer: layer {self.name} at depth {self.depth} has {query.shape[1]} queries, expected {grid}"
            )
        if any(edit.probs is not None for edit, _ in acting):
            return self._explicit(attn, query, key, value, frame, encoder_hidden_states, attention_mask, acting)
        heads = attn.heads
        q, k, v = _heads(query, heads), _heads(key, heads), _heads(value, heads)
        biases = [b for b in (edit.scores(q, k, call) for edit, call in acting if edit.scores) if b is not None]
        if not biases:
            return self._inner(attn, hidden_states, encoder_hidden_states, attention_mask, temb, kwargs)
        bias = _sum(biases)
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

    def _explicit(
        self,
        attn: Any,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        frame: _Frame,
        encoder_hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None,
        acting: Acting,
    ) -> torch.Tensor:
        """Probability mode: P explicit (with the score-mode biases added), read by the edits, output P·v."""
        batch, keys = encoder_hidden_states.shape[0], encoder_hidden_states.shape[1]
        mask = attn.prepare_attention_mask(attention_mask, keys, batch)
        scoring = [(edit, call) for edit, call in acting if edit.scores is not None]
        if scoring:
            heads = attn.heads
            q, k = _heads(query, heads), _heads(key, heads)
            biases = [b for b in (edit.scores(q, k, call) for edit, call in scoring if edit.scores) if b is not None]
            if biases:
                n_query = query.shape[1]
                bias = _sum(biases).expand(batch, heads, n_query, keys).reshape(batch * heads, n_query, keys)
                bias = bias.to(query.dtype)
                mask = bias if mask is None else mask + bias
        query = attn.head_to_batch_dim(query)
        key = attn.head_to_batch_dim(key)
        value = attn.head_to_batch_dim(value)
        probs = attn.get_attention_scores(query, key, mask)
        for edit, call in acting:
            if edit.probs is not None:
                edit.probs(probs, call)
        out = attn.batch_to_head_dim(torch.bmm(probs, value))
        return _finish(attn, out, frame)

    def __repr__(self) -> str:
        owners = ", ".join(edit.owner or type(edit).__name__ for edit, _ in self.edits)
        return f"EditProcessor({self.name!r}, depth={self.depth}, edits=[{owners}], inner={type(self.inner).__name__})"


__all__ = ["EditProcessor", "PassSource", "check_wrappable"]
