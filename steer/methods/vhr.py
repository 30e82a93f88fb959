"""VHR — Vision-aware Head Reinforcement (He et al., "Cracking the Code of Hallucination in LVLMs with
Vision-aware Head Divergence", ACL 2025; spec: ``shared/specs/vhr.md``).

Notation: target layers L_r; H query heads of size d; ``A_{l,i}`` is head i's output in layer l, i.e. the
slice ``[i*d, (i+1)*d)`` of the input of ``layers[l].self_attn.o_proj`` (softmax(QK^T/sqrt(d)) V before the
output projection). At the first generation step, per sample b and target layer l (increasing order), with
``a_i`` the head output at the last prompt position *with* the image and ``n_i`` the same *without* it:

- Eq. 4:  VHD_i = || a_i - n_i ||_2            (vision-aware head divergence); TA_i = || n_i ||_2^2
- Eq. 6:  VHD_i <- 0  if  VHD_i > mu_VHD + sigma_VHD  and  TA_i > mu_TA + sigma_TA   (outlier filter;
          mean and std over the H heads of the layer, computed before zeroing)
- Eq. 7:  H_l = { i : VHD_i > m },  m = lower median of the filtered VHD (``torch.median``)
- Reinforcement: A_{l,i} <- alpha * A_{l,i} for i in H_l, at every position, before ``o_proj`` runs,
  so later layers (and their cached K/V) see the reinforced state. H_l stays fixed for every decode step.

How it reaches the model (all through core edits, nothing patched by hand):

- a ``ModuleHook`` pre-hook on the text model triggers the no-image branch once per prefill. That is the
  first point of a forward where the language model's inputs exist (embeddings with the image merged,
  mask, positions), it runs once per call, and it runs *before* the text model's own forward begins, so
  the auxiliary call never re-enters a half-finished forward. The branch runs under
  ``runtime.disabled()`` (every edit off, DESIGN.md);
- ``ModuleHook`` pre-hooks on the target layers' ``o_proj`` with ``in_aux=True`` capture ``n_i`` inside
  that auxiliary pass (``branch="separate"``), or select and reinforce on both branches of the 2B-row
  auxiliary pass (``branch="lockstep"``); they do nothing outside VHR's own auxiliary pass;
- a ``HeadOutputEdit`` on the target layers selects H_l online in the real prefill (``separate``) and
  scales the selected heads at every position, prefill and decode;
- a ``ModuleHook`` forward hook on the text model copies the per-sample result into
  ``Steering.state["vhr"]`` once per prefill (one host sync instead of one per layer).

``Steering.state["vhr"]`` after a call (rows are the model's batch rows, beams included)::

    {"layers": [1, 18, ...], "branch": "separate", "alpha": 2.0,
     "heads":    [{layer: [selected head indices]} per row],
     "vhd":      [{layer: [VHD_i after the filter, H floats]} per row],
     "outliers": [{layer: [head indices zeroed by Eq. 6]} per row]}

Limits: the prefill must be one call (no chunked prefill). In ``lockstep`` the with-image rows of the
auxiliary pass are the text model's inputs as the real prefill receives them, so input-stage edits of
other methods that act before VHR's pre-hook (e.g. changed position ids) are part of them; their attention,
residual and logits edits are off, as for every auxiliary pass.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

import torch

from steer.edits import Edit, EditContext, HeadOutputEdit, ModuleHook
from steer.errors import InvalidParameterError
from steer.registry import Method, param, register

if TYPE_CHECKING:
    from steer.adapters.base import Adapter
    from steer.adapters.families import Qwen2VLAdapter


# ---------------------------------------------------------------------------------------------------
# the paper's equations as pure functions


def auto_layers(num_layers: int) -> list[int]:
    """The default target layers: ``[1] + last n_last``, n_last = 14 for 32 layers (paper), otherwise
    ``floor(14 * L / 32 + 0.5)`` (proportional rule, unvalidated). Indices >= L are dropped."""
    n_last = 14 if num_layers == 32 else math.floor(14 * num_layers / 32 + 0.5)
    layers = {1, *range(max(num_layers - n_last, 0), num_layers)}
    return sorted(layer for layer in layers if 0 <= layer < num_layers)


def head_divergence(
    with_image: torch.Tensor, without_image: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Eq. 4: ``VHD_i = ||a_i - n_i||_2`` and ``TA_i = ||n_i||_2^2`` over the head dimension, in fp32.

    ``with_image`` (a) and ``without_image`` (n): [..., H, d]. Returns (VHD, TA), each [..., H].
    """
    a, n = with_image.float(), without_image.float()
    return (a - n).norm(dim=-1), n.pow(2).sum(dim=-1)


@dataclass
class Selection:
    """Result of :func:`select_heads`: bool ``mask`` [..., H] (H_l), the ``vhd`` after the outlier filter
    and the bool ``outliers`` [..., H] that Eq. 6 zeroed."""

    mask: torch.Tensor
    vhd: torch.Tensor
    outliers: torch.Tensor


def select_heads(
    vhd: torch.Tensor, ta: torch.Tensor, filter_outliers: bool = True, std: str = "unbiased"
) -> Selection:
    """Eqs. 6-7 over the last dimension (the H heads of one layer; leading dims are rows).

    Eq. 6 (``filter_outliers``): with mean mu and std sigma over the heads (``std="unbiased"``: sample
    std, ``"population"``: divide by H), set ``VHD_i = 0`` where ``VHD_i > mu_VHD + sigma_VHD`` and
    ``TA_i > mu_TA + sigma_TA``. Eq. 7: ``H = {i : VHD_i > m}`` with m the lower median of the filtered
    VHD (ascending sort, element floor((H-1)/2), as ``torch.median``), strict ``>``.

    >>> s = select_heads(torch.tensor([0.9, 0.2, 3.5, 0.4, 1.1, 0.3, 0.8, 0.6]),
    ...                  torch.tensor([1.0, 1.2, 9.0, 0.9, 1.1, 1.0, 1.3, 0.8]))
    >>> s.mask.nonzero().flatten().tolist()
    [0, 4, 6, 7]
    """
    if std not in ("unbiased", "population"):
        raise ValueError(f"std must be 'unbiased' or 'population', got {std!r}")
    vhd, ta = vhd.float(), ta.float()
    if filter_outliers:
        correction = 1 if std == "unbiased" else 0
        vhd_bar = vhd.mean(dim=-1, keepdim=True) + vhd.std(dim=-1, keepdim=True, correction=correction)
        ta_bar = ta.mean(dim=-1, keepdim=True) + ta.std(dim=-1, keepdim=True, correction=correction)
        outliers = (vhd > vhd_bar) & (ta > ta_bar)
        vhd = vhd.masked_fill(outliers, 0.0)
    else:
        outliers = torch.zeros_like(vhd, dtype=torch.bool)
    median = vhd.median(dim=-1, keepdim=True).values
    return Selection(mask=vhd > median, vhd=vhd, outliers=outliers)


def reinforce(heads: torch.Tensor, mask: torch.Tensor, alpha: float) -> torch.Tensor:
    """``A_i <- alpha * A_i`` for the selected heads at every position; the others stay bit-identical.

    ``heads``: [B, L, H, d] (the input of ``o_proj`` split by head); ``mask``: bool [B, H].
    """
    scaled = (heads.float() * alpha).to(heads.dtype)
    return torch.where(mask.to(heads.device)[:, None, :, None], scaled, heads)


def strip_image_tokens(
    input_ids: torch.Tensor,
    padding: torch.Tensor,
    drop_ids: tuple[int, ...],
    length: int | None = None,
    pad_id: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The no-image rows (spec step 1): per row, keep the real tokens that are not image tokens
    (``drop_ids``: placeholders, and Qwen's vision start/end), then re-pad on the left.

    Returns ``(ids, mask)`` [B, L'] with L' = the longest kept row (or ``length`` when given, >= that).
    """
    keep = padding.bool() & ~torch.isin(input_ids, torch.tensor(drop_ids, device=input_ids.device))
    counts = keep.sum(dim=1)
    kept = counts.tolist()  # the one host sync: the width of the new rows
    empty = [row for row, n in enumerate(kept) if n == 0]
    if empty:
        raise ValueError(
            f"prompt row(s) {empty} hold nothing but image tokens; the no-image branch needs the rest of the "
            "prompt (e.g. the question)"
        )
    width = max(kept) if length is None else length
    if width < max(kept):
        raise ValueError(f"length {width} is shorter than the longest no-image row ({max(kept)})")
    # kept token j of a row goes to column width - count + j; dropped tokens to a spare column cut off below
    dest = (width - counts)[:, None] + keep.long().cumsum(dim=1) - 1
    dest = torch.where(keep, dest, torch.full_like(dest, width))
    ids = input_ids.new_full((input_ids.shape[0], width + 1), pad_id).scatter_(1, dest, input_ids)[:, :width]
    columns = torch.arange(width, device=input_ids.device)
    mask = (columns[None, :] >= (width - counts)[:, None]).long()
    return ids, mask


def last_positions(mask: torch.Tensor) -> torch.Tensor:
    """Index of the last real token per row of a 2-D mask (the query that predicts the first token)."""
    width = mask.shape[1]
    return (width - 1) - mask.bool().flip(dims=[1]).long().argmax(dim=1)


# ---------------------------------------------------------------------------------------------------
# the method


@register
class VHR(Method):
    name = "vhr"
    description = (
        "Vision-aware Head Reinforcement: per sample, scale by alpha the heads whose output changes most when "
        "the image is removed (VHD, He et al. ACL 2025); heads chosen once at the first step."
    )
    stage = "attention"
    needs_image_tokens = True

    @dataclass
    class Params:
        alpha: float = param(
            2.0, help="scale of the selected heads' outputs (vhr_aug_ratio); 1 = identity", range=(0.0, 10.0)
        )
        layers: str | list[int] = param(
            "auto", help="target layers L_r: 'auto' = [1] + last 14 of 32 (proportional for other depths)"
        )
        filter_outliers: bool = param(True, help="Eq. 6 outlier filter on (VHD, TA) (vhr_filter)")
        std: str = param(
            "unbiased", help="sigma convention of the filter", choices=("unbiased", "population")
        )
        branch: str = param(
            "separate",
            help="how the no-image branch runs: separate extra prefill, or lockstep (both branches reinforced)",
            choices=("separate", "lockstep"),
        )

    def __init__(self, params: Any, adapter: Adapter, state: dict[str, Any]) -> None:
        super().__init__(params, adapter, state)
        self._key = ("vhr", id(self))

    # ---- parameters -------------------------------------------------------------------------------
    @property
    def target_layers(self) -> list[int]:
        layers = self.params.layers
        if isinstance(layers, str):
            return auto_layers(self.adapter.num_layers)
        return sorted(set(layers))

    def check(self) -> None:
        p = self.params
        if not p.alpha > 0:
            raise InvalidParameterError(
                f"vhr: alpha={p.alpha!r} is out of range; it must be in (0, 10] (0 is excluded)"
            )
        n = self.adapter.num_layers
        if isinstance(p.layers, str):
            if p.layers != "auto":
                raise InvalidParameterError(
                    f"vhr: layers={p.layers!r} is not valid; use 'auto' or a list of ints"
                )
            return
        for layer in p.layers:
            if not 0 <= layer < n:
                raise InvalidParameterError(
                    f"vhr: layer {layer} does not exist; the model has {n} decoder layers (valid: 0..{n - 1})"
                )

    def is_noop(self) -> bool:
        return self.params.alpha == 1.0 or not self.target_layers

    def edits(self) -> list[Edit]:
        layers = self.target_layers
        out: list[Edit] = [
            ModuleHook(module=lambda a: a.text_model, fn=self._before_text_model, pre=True),
            HeadOutputEdit(layers=layers, fn=self._at_heads),
        ]
        for layer in layers:
            out.append(
                ModuleHook(
                    # mypy cannot infer the type of a lambda that binds the loop variable as a default
                    module=lambda a, layer=layer: a.attention(layer).o_proj,  # type: ignore[misc]
                    fn=self._o_proj_hook(layer),
                    pre=True,
                    in_aux=True,
                )
            )
        out.append(ModuleHook(module=lambda a: a.text_model, fn=self._after_text_model))
        return out

    # ---- per-call state ---------------------------------------------------------------------------
    def _shared(self, ectx: EditContext) -> dict[str, Any]:
        """State of this call (one `generate` or forward): reset at every prefill with the context."""
        return ectx.forward.scratch.setdefault(self._key, {})

    # ---- the no-image branch ----------------------------------------------------------------------
    def no_image_branch(
        self, kwargs: dict[str, Any], ectx: EditContext, length: int | None = None
    ) -> dict[str, Any]:
        """Text-model inputs of the no-image rows (spec step 1), built per sample from the prompt.

        Image placeholder tokens (and Qwen's ``<|vision_start|>``/``<|vision_end|>``) are removed, every
        other token is kept, rows are re-padded on the left (to ``length`` when given). Positions are
        those `generate` builds for a text-only prompt: ``cumsum(mask) - 1`` (0 on padding); for M-RoPE
        the model's ``get_rope_index`` over text-only tokens, with the text row prepended ([4, B, L]).
        ``kwargs`` (the real call's text-model inputs) is unused here; tests substitute this method.
        """
        ctx = ectx.forward
        ids = ctx.prompt_ids
        assert ids is not None  # guaranteed by needs_image_tokens (the runtime raises before)
        padding = ctx.padding_mask if ctx.padding_mask is not None else torch.ones_like(ids, dtype=torch.bool)
        pad_id = getattr(self.adapter.text_config, "pad_token_id", None) or 0
        ids, mask = strip_image_tokens(
            ids, padding.to(ids.device), self.adapter.image_related_token_ids, length, pad_id
        )
        embeds = self.adapter.embed_tokens(ids)
        return {
            "inputs_embeds": embeds,
            "attention_mask": mask,
            "position_ids": self._text_positions(ids, mask, ectx),
        }

    def _text_positions(self, ids: torch.Tensor, mask: torch.Tensor, ectx: EditContext) -> torch.Tensor:
        """Positions of text-only rows: [B, L] (1-D RoPE) or [4, B, L] (M-RoPE: text row, then t/h/w)."""
        text = (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 0)
        if self.adapter.position_scheme != "mrope":
            return text
        owner: Any = cast("Qwen2VLAdapter", self.adapter).rope_index_owner
        with ectx.runtime.disabled():  # other methods' position edits (a wrapped get_rope_index) stay off
            mrope, _ = owner.get_rope_index(ids, mm_token_type_ids=torch.zeros_like(ids), attention_mask=mask)
        return torch.cat([text[None], mrope.to(text.device)], dim=0)

    # ---- step 0 trigger: before the text model's prefill ------------------------------------------
    def _before_text_model(
        self, module: torch.nn.Module, args: tuple, kwargs: dict, ectx: EditContext
    ) -> None:
        if ectx.phase != "prefill":
            return None
        shared = self._shared(ectx)
        if shared.get("started"):
            return None
        shared.update(started=True, n={}, masks={}, records={})
        self.state.clear()
        self.state.update(layers=self.target_layers, branch=self.params.branch, alpha=self.params.alpha)
        if self.params.branch == "separate":
            inputs = self.no_image_branch(kwargs, ectx)
            self._run_aux(module, inputs, shared, "capture", ectx)
            missing = [layer for layer in self.target_layers if layer not in shared["n"]]
            if missing:  # pragma: no cover - every target layer's o_proj runs in the pass
                raise RuntimeError(f"vhr: the no-image pass did not reach layer(s) {missing}")
        else:
            inputs = self._lockstep_inputs(kwargs, ectx)
            shared["lockstep_last"] = last_positions(
                inputs["attention_mask"][: inputs["attention_mask"].shape[0] // 2]
            )
            self._run_aux(module, inputs, shared, "lockstep", ectx)
        return None

    def _run_aux(
        self,
        module: torch.nn.Module,
        inputs: dict[str, Any],
        shared: dict[str, Any],
        mode: str,
        ectx: EditContext,
    ) -> None:
        shared["aux"] = mode
        try:
            with ectx.runtime.disabled(), torch.no_grad():
                module(**inputs, use_cache=False)
        finally:
            shared["aux"] = None

    def _lockstep_inputs(self, kwargs: dict[str, Any], ectx: EditContext) -> dict[str, Any]:
        """2B rows: the real rows (as the text model got them) then the no-image rows, left padded to T."""
        embeds = kwargs.get("inputs_embeds")
        if embeds is None:
            embeds = self.adapter.embed_tokens(kwargs["input_ids"])
        batch, width = embeds.shape[:2]
        mask = kwargs.get("attention_mask")
        if not (isinstance(mask, torch.Tensor) and mask.dim() == 2):
            padding = ectx.forward.padding_mask
            mask = padding if padding is not None else torch.ones(batch, width, dtype=torch.long)
        mask = mask.to(embeds.device).long()
        mrope = self.adapter.position_scheme == "mrope"
        positions = self._explicit_positions(kwargs.get("position_ids"), batch, width, embeds.device)
        other = self.no_image_branch(kwargs, ectx, length=width)
        other_pos = self._explicit_positions(other.get("position_ids"), batch, width, embeds.device)
        if mrope and positions.shape[0] != other_pos.shape[0]:  # [3, B, T] with [4, B, T]: keep t/h/w
            positions, other_pos = positions[-3:], other_pos[-3:]
        return {
            "inputs_embeds": torch.cat([embeds, other["inputs_embeds"].to(embeds.dtype)], dim=0),
            "attention_mask": torch.cat([mask, other["attention_mask"].to(mask.device).long()], dim=0),
            "position_ids": torch.cat([positions, other_pos], dim=-2),
        }

    def _explicit_positions(
        self, positions: torch.Tensor | None, batch: int, width: int, device: Any
    ) -> torch.Tensor:
        """Position ids as the text model would use them, with the batch dimension spelled out:
        [B, T] (1-D RoPE) or [R, B, T] (M-RoPE, R = 3 or 4). ``None`` means the model's default 0..T-1."""
        mrope = self.adapter.position_scheme == "mrope"
        if positions is None:
            positions = torch.arange(width, device=device)
        positions = positions.to(device)
        if mrope:
            if positions.dim() < 3:
                positions = positions.reshape(-1, width)[None].expand(3, -1, width)
            return positions.expand(positions.shape[0], batch, width)
        return positions.reshape(-1, width).expand(batch, width)

    # ---- o_proj pre-hook: acts only inside VHR's own auxiliary pass -------------------------------
    def _o_proj_hook(self, layer: int):
        def hook(module: torch.nn.Module, args: tuple, kwargs: dict, ectx: EditContext) -> Any:
            if not ectx.runtime.bypassed:
                return None  # the real pass is handled by the HeadOutputEdit
            shared = self._shared(ectx)
            mode = shared.get("aux")
            if mode is None:
                return None  # another method's auxiliary pass
            x = args[0]
            heads = x.view(*x.shape[:-1], self.adapter.num_heads, -1)  # [N, T, H, d]
            if mode == "capture":  # no-image rows are left padded: the last index is the last token
                shared["n"][layer] = heads[:, -1].float().clone()
                return None
            batch = heads.shape[0] // 2
            a = self._last(heads[:batch], shared["lockstep_last"])
            chosen = self._select(layer, a, heads[batch:, -1], shared)
            scaled = reinforce(heads, torch.cat([chosen, chosen], dim=0), self.params.alpha)
            return (scaled.view_as(x), *args[1:]), kwargs

        return hook

    @staticmethod
    def _last(heads: torch.Tensor, last: torch.Tensor | None) -> torch.Tensor:
        """[B, T, H, d] -> [B, H, d] at each row's last prompt position."""
        if last is None:
            return heads[:, -1]
        return heads[torch.arange(heads.shape[0], device=heads.device), last.to(heads.device)]

    def _select(self, layer: int, a: torch.Tensor, n: torch.Tensor, shared: dict[str, Any]) -> torch.Tensor:
        vhd, ta = head_divergence(a, n)
        sel = select_heads(vhd, ta, self.params.filter_outliers, self.params.std)
        shared["masks"][layer] = sel.mask
        shared["records"][layer] = sel
        return sel.mask

    # ---- the real forward: select online (separate), scale at every step ---------------------------
    def _at_heads(self, out: torch.Tensor, ectx: EditContext) -> torch.Tensor | None:
        shared = self._shared(ectx)
        layer = ectx.layer
        assert layer is not None
        masks = shared.get("masks")
        if masks is None:
            return None  # the prefill ran with VHR disabled: nothing selected for this call
        if layer not in masks and ectx.phase == "prefill" and self.params.branch == "separate":
            padding = ectx.forward.padding_mask
            last = (
                last_positions(padding) if padding is not None and padding.shape[1] == out.shape[1] else None
            )
            self._select(layer, self._last(out, last), shared["n"][layer].to(out.device), shared)
        mask = masks.get(layer)
        if mask is None:
            return None
        if mask.shape[0] != out.shape[0]:
            raise RuntimeError(
                f"vhr: heads were selected for {mask.shape[0]} rows but this step has {out.shape[0]}; the batch "
                "must keep its rows between the prefill and the decode steps"
            )
        return reinforce(out, mask, self.params.alpha)

    # ---- state, once per prefill -------------------------------------------------------------------
    def _after_text_model(self, module: torch.nn.Module, args: tuple, output: Any, ectx: EditContext) -> None:
        if ectx.runtime.bypassed or ectx.phase != "prefill":
            return None
        shared = self._shared(ectx)
        records: dict[int, Selection] = shared.get("records") or {}
        if shared.get("recorded") or not records:
            return None
        shared["recorded"] = True
        rows = next(iter(records.values())).mask.shape[0]
        heads: list[dict[int, list[int]]] = [{} for _ in range(rows)]
        vhd: list[dict[int, list[float]]] = [{} for _ in range(rows)]
        outliers: list[dict[int, list[int]]] = [{} for _ in range(rows)]
        for layer in sorted(records):
            sel = records[layer]
            mask, values, zeroed = sel.mask.cpu(), sel.vhd.cpu(), sel.outliers.cpu()
            for b in range(rows):
                heads[b][layer] = mask[b].nonzero().flatten().tolist()
                vhd[b][layer] = values[b].tolist()
                outliers[b][layer] = zeroed[b].nonzero().flatten().tolist()
        self.state.update(heads=heads, vhd=vhd, outliers=outliers)
        return None
