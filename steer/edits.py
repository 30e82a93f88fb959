"""The low-level edit API: interventions declared as data.

An *edit* says what to change and where; it never touches a model itself. The hook manager
(`steer.hooks`) installs edits on a model and removes them again. Every registered method is a thin
declaration over these kinds (DESIGN.md, "How an intervention reaches the model"):

====================  ====================================================================
edit                  what it does
====================  ====================================================================
`HeadScale`           o_{l,i} <- s_i * o_{l,i}: scale chosen heads' outputs (before `o_proj`)
`HeadOutputEdit`      any function of the per-head attention output [B, Lq, H, D]
`AttentionMask`       AND / replace / add a mask to the attention of chosen layers
`GroupReweight`       reweight post-softmax attention by key groups (the LSE-merge primitive)
`ResidualAdd`         h_l <- h_l + v at the output of chosen decoder layers
`LogitsTransform`     f <- g(f) on the final logits
`InputEdit`           change the language model's forward inputs (positions, masks)
`ModuleHook`          escape hatch: a forward (pre-)hook on any named submodule
`MethodWrap`          wrap a method of a submodule (e.g. Qwen's ``get_rope_index``)
====================  ====================================================================

Values that depend on the input (a per-sample head set, a mask built from image positions) are
given as callables that receive an :class:`EditContext` at run time.

Example, no method involved::

    from steer import edits
    h = steer.apply(model, [edits.HeadScale(layers=[1], heads=[0, 2], scale=2.0),
                            edits.ResidualAdd(layers=[0], vector=v)])
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, Union

import torch

if TYPE_CHECKING:
    from steer.adapters.base import Adapter
    from steer.hooks.context import ForwardContext
    from steer.kernels.triton_group import CoefficientRule

LayerSelection = Union[Sequence[int], Literal["all"]]
Phase = Literal["prefill", "decode", "all"]


@dataclass
class EditContext:
    """What an edit sees when it runs: the per-forward context, the layer and the model's adapter.

    ``forward`` holds phase (prefill/decode), image-token positions per sample and padding;
    ``query_len``/``key_len`` are set inside attention; ``scratch`` is a dict private to the edit for
    the current `generate`/forward call (cleared at every prefill); ``runtime`` gives methods that run
    auxiliary passes the guard ``runtime.disabled()`` (every edit off).
    """

    forward: ForwardContext
    adapter: Adapter
    layer: int | None = None
    query_len: int | None = None
    key_len: int | None = None
    scratch: dict[str, Any] = field(default_factory=dict)
    runtime: Any = None

    @property
    def phase(self) -> str:
        return self.forward.phase


class Edit:
    """Base class of every edit. ``stage`` orders composition: input, vision, attention, residual, logits."""

    stage: str = "attention"
    phase: Phase = "all"

    def active_in(self, phase: str) -> bool:
        return self.phase == "all" or self.phase == phase


def _layers_of(selection: LayerSelection, num_layers: int) -> list[int]:
    if isinstance(selection, str):
        if selection != "all":
            raise ValueError(f"layers must be a list of ints or 'all', got {selection!r}")
        return list(range(num_layers))
    out = []
    for layer in selection:
        if not isinstance(layer, int) or isinstance(layer, bool):
            raise ValueError(f"layer indices must be ints, got {layer!r}")
        index = layer + num_layers if layer < 0 else layer
        if not 0 <= index < num_layers:
            raise ValueError(f"layer {layer} is out of range for a model with {num_layers} decoder layers")
        out.append(index)
    return sorted(set(out))


class AttentionEdit(Edit):
    """An edit that runs inside steer's registered attention function for chosen decoder layers."""

    stage = "attention"
    layers: LayerSelection

    def resolve_layers(self, num_layers: int) -> list[int]:
        return _layers_of(self.layers, num_layers)


TensorOrFn = Union[torch.Tensor, float, Callable[[EditContext], Union[torch.Tensor, float, None]]]


def evaluate(value: TensorOrFn, ectx: EditContext) -> Any:
    """A constant stays as is; a callable is called with the edit context."""
    return value(ectx) if callable(value) else value


@dataclass
class HeadOutputEdit(AttentionEdit):
    """Apply ``fn(out, ectx) -> out`` to the attention output of each chosen layer.

    ``out`` is the per-head output softmax(QK^T/sqrt(d)) V of shape [B, Lq, H, D], i.e. the input of
    ``o_proj`` split by head. Returning ``None`` leaves it unchanged.
    """

    layers: LayerSelection
    fn: Callable[[torch.Tensor, EditContext], torch.Tensor | None]
    phase: Phase = "all"

    def apply(self, out: torch.Tensor, ectx: EditContext) -> torch.Tensor:
        new = self.fn(out, ectx)
        return out if new is None else new


@dataclass
class HeadScale(AttentionEdit):
    """Scale chosen heads' outputs: A_{l,i} <- s_i * A_{l,i} before the output projection.

    ``scale`` is a float (applied to ``heads``, all heads when ``heads`` is None), a tensor of shape
    [H] or [B, H], or a callable returning one of those (or None for "no change this call").
    """

    layers: LayerSelection
    scale: TensorOrFn
    heads: Sequence[int] | None = None
    phase: Phase = "all"

    def scales(self, ectx: EditContext, num_heads: int, batch: int, device, dtype) -> torch.Tensor | None:
        value = evaluate(self.scale, ectx)
        if value is None:
            return None
        if not isinstance(value, torch.Tensor):
            s = torch.ones(num_heads, dtype=torch.float32)
            if self.heads is None:
                s[:] = float(value)
            else:
                s[list(self.heads)] = float(value)
            value = s
        value = value.to(device=device, dtype=torch.float32)
        if value.dim() == 1:
            value = value.expand(batch, -1)
        if value.shape != (batch, num_heads):
            raise ValueError(f"HeadScale: scale must have shape [H]={num_heads} or [B, H], got {tuple(value.shape)}")
        return value

    def apply(self, out: torch.Tensor, ectx: EditContext) -> torch.Tensor:
        s = self.scales(ectx, out.shape[2], out.shape[0], out.device, out.dtype)
        if s is None:
            return out
        return (out.float() * s[:, None, :, None]).to(out.dtype)


MaskMode = Literal["and", "replace", "add"]


@dataclass
class AttentionMask(AttentionEdit):
    """Add a mask to chosen layers' attention.

    ``mask`` (tensor or callable of the edit context) broadcasts to [B, H, Lq, Lk]:
    - ``mode="and"``: boolean, True = may attend; ANDed with the model's causal/padding mask;
    - ``mode="replace"``: boolean, replaces the model's mask (e.g. CCA lets keys after the query in);
    - ``mode="add"``: float, added to the pre-softmax scores (use ``torch.finfo(dtype).min``, not -inf).
    ``None`` from a callable means "no change for this call".
    """

    layers: LayerSelection
    mask: TensorOrFn
    mode: MaskMode = "and"
    phase: Phase = "all"

    def __post_init__(self) -> None:
        if self.mode not in ("and", "replace", "add"):
            raise ValueError(f"AttentionMask.mode must be 'and', 'replace' or 'add', got {self.mode!r}")


Groups = Union[Literal["image"], Callable[[EditContext], torch.Tensor]]
Rows = Union[Literal["all", "after_image", "new"], Callable[[EditContext], Union[torch.Tensor, None]], None]


@dataclass
class GroupReweight(AttentionEdit):
    """Reweight post-softmax attention by key group (DESIGN.md, "Attention math").

    Keys are labelled 0..G per sample (0 = every other key). With the group masses
    m_g = sum_{j in g} alpha_qj = exp(lse_g - lse_all) and the group outputs out_g (attention restricted
    to g), the edited output of an eligible query row is

        o' = sum_g c_g * m_g * out_g            (divided by sum_g c_g * m_g when ``renormalize``)

    ``groups``: ``"image"`` (group 1 = the sample's image tokens) or a callable returning labels
    [B, L_prompt] (decoded keys get label 0). ``coefficients``: a list of G+1 floats, or a callable
    ``(masses [B, H, Lq, G+1], ectx) -> c`` broadcastable to it. ``rows``: which query rows are edited:
    ``"all"``, ``"after_image"`` (prefill: text rows after the sample's first image token; decode: the
    new rows), ``"new"`` (decode rows only) or a callable returning bool [B, Lq]. ``impl`` is handed to
    `steer.kernels.dispatch.reweighted_attention`: ``"auto"``/``"fused"`` (LSE merge) or ``"reference"``
    (materialised probabilities; tests and tiny shapes), ``"triton"`` (single-pass kernel, needs a rule).
    ``rule``: the same coefficients as a `steer.kernels.triton_group.CoefficientRule` (or a callable of the
    edit context returning one or None) that the Triton kernel evaluates in its epilogue; ``"auto"`` uses
    it on CUDA. A list of ``coefficients`` is its own rule (``CoefficientRule.constant``).
    """

    layers: LayerSelection
    coefficients: Sequence[float] | Callable[[torch.Tensor, EditContext], torch.Tensor]
    groups: Groups = "image"
    rows: Rows = "all"
    renormalize: bool = False
    phase: Phase = "all"
    impl: Literal["auto", "fused", "reference", "triton"] = "auto"
    rule: CoefficientRule | Callable[[EditContext], CoefficientRule | None] | None = None

    def coefficient_rule(self, ectx: EditContext) -> CoefficientRule | None:
        """The kernel form of the coefficients for this call: ``rule`` (evaluated), else a constant list."""
        if self.rule is not None:
            return self.rule(ectx) if callable(self.rule) else self.rule
        if callable(self.coefficients):
            return None
        from steer.kernels.triton_group import CoefficientRule

        try:
            return CoefficientRule.constant(self.coefficients)
        except ValueError:
            return None

    def coefficient_fn(self, ectx: EditContext) -> Callable[[torch.Tensor], torch.Tensor]:
        if callable(self.coefficients):
            fn = self.coefficients
            return lambda masses: fn(masses, ectx)
        values = torch.tensor([float(c) for c in self.coefficients], dtype=torch.float32)

        def constant(masses: torch.Tensor) -> torch.Tensor:
            if values.numel() != masses.shape[-1]:
                raise ValueError(
                    f"GroupReweight: {values.numel()} coefficients for {masses.shape[-1]} groups (incl. group 0)"
                )
            return values.to(masses.device)

        return constant


@dataclass
class ResidualAdd(Edit):
    """Add a vector to the residual stream at the output of chosen decoder layers: h_l <- h_l + v_l.

    ``vector``: tensor [D] or [B, D] (same for every chosen layer), or a callable of the edit context
    (``ectx.layer`` is set) returning one of those or None. ``positions``: ``"all"`` (prompt and
    generated tokens), ``"prompt"`` (prefill only) or ``"new"`` (decode steps only).
    """

    layers: LayerSelection
    vector: TensorOrFn
    positions: Literal["all", "prompt", "new"] = "all"
    stage = "residual"

    def resolve_layers(self, num_layers: int) -> list[int]:
        return _layers_of(self.layers, num_layers)


@dataclass
class LogitsTransform(Edit):
    """Change the final logits: f <- fn(f, ectx) (the output of ``lm_head``, [B, Lq, V])."""

    fn: Callable[[torch.Tensor, EditContext], torch.Tensor | None]
    stage = "logits"


@dataclass
class InputEdit(Edit):
    """Change the language model's forward keyword arguments before it runs.

    ``fn(kwargs, ectx) -> kwargs | None`` sees ``position_ids``, ``attention_mask``, ``inputs_embeds``...
    (the call into ``adapter.text_model``), prefill and decode.
    """

    fn: Callable[[dict[str, Any], EditContext], dict[str, Any] | None]
    stage = "input"


@dataclass
class ModuleHook(Edit):
    """A forward hook (or pre-hook) on a submodule named by a dotted path or chosen by the adapter.

    ``fn`` follows PyTorch's hook signatures with the edit context appended:
    forward hook ``fn(module, args, output, ectx) -> output | None``;
    pre-hook (``pre=True``, kwargs included) ``fn(module, args, kwargs, ectx) -> (args, kwargs) | None``.
    ``in_aux=True``: the hook also runs inside auxiliary passes (``runtime.disabled()``), e.g. to capture
    activations there; ``fn`` then sees ``ectx.runtime.bypassed`` and must act only in its own pass.
    ``prepend=True``: run before the hooks already on the module; on the top-level model a pre-hook then
    runs before the per-forward context capture and may rewrite the inputs it records (token pruning).
    """

    module: str | Callable[[Adapter], torch.nn.Module]
    fn: Callable[..., Any]
    pre: bool = False
    in_aux: bool = False
    prepend: bool = False
    stage = "residual"

    def target(self, adapter: Adapter) -> torch.nn.Module:
        if callable(self.module):
            return self.module(adapter)
        return adapter.model.get_submodule(self.module)


@dataclass
class MethodWrap(Edit):
    """Wrap a method of a submodule while installed: ``module.name(*args, **kwargs)`` returns
    ``fn(original, args, kwargs, ectx)``, where ``original`` is the callable it replaces (the bound
    method, or an earlier wrap of it: wraps of one method chain in ``apply`` order).

    Installed as an instance attribute of the module and removed again on ``remove()``. With every edit
    disabled (``runtime.disabled()``) the wrapper calls ``original`` directly. The method may run
    outside the model's forward (``generate`` prepares positions before the prefill), so
    ``ectx.forward`` can still be the previous call's context there.
    """

    module: str | Callable[[Adapter], torch.nn.Module]
    name: str
    fn: Callable[..., Any]
    stage = "input"

    def target(self, adapter: Adapter) -> torch.nn.Module:
        if callable(self.module):
            return self.module(adapter)
        return adapter.model.get_submodule(self.module)


ATTENTION_EDITS = (HeadOutputEdit, HeadScale, AttentionMask, GroupReweight)
