"""VHR — Vision-aware Head Reinforcement (He et al., "Cracking the Code of Hallucination in LVLMs with
Vision-aware Head Divergence", ACL 2025; spec: ``shared/specs/vhr.md``).

Notation: target layers L_r; H query heads of size d; ``A_{l,i}`` is head i's output in layer l, i.e. the
slice ``[i*d, (i+1)*d)`` of the input of the layer's attention output projection (softmax(QK^T/sqrt(d)) V
before the projection; site ``layer.attn.head_out``). At the first generation step, per sample b and target
layer l (increasing order), with ``a_i`` the head output at the last prompt position *with* the image and
``n_i`` the same *without* it:

- Eq. 4:  VHD_i = || a_i - n_i ||_2            (vision-aware head divergence); TA_i = || n_i ||_2^2
- Eq. 6:  VHD_i <- 0  if  VHD_i > mu_VHD + sigma_VHD  and  TA_i > mu_TA + sigma_TA   (outlier filter;
          mean and std over the H heads of the layer, computed before zeroing)
- Eq. 7:  H_l = { i : VHD_i > m },  m = lower median of the filtered VHD (``torch.median``)
- Reinforcement: A_{l,i} <- alpha * A_{l,i} for i in H_l, at every position, before the projection runs,
  so later layers (and their cached K/V) see the reinforced state. H_l stays fixed for every decode step.

Edits (``branch="separate"``): a :class:`~steer.edits.kinds.SourceRun` of the text-only prompt (the adapter's
fact), a :class:`~steer.edits.kinds.Collect` of each target layer's head outputs at the last token in that
run, and a :class:`~steer.edits.kinds.HeadOutputEdit` that selects H_l in the real prefill and scales the
selected heads at every position. ``branch="lockstep"``: one 2B-row auxiliary run (the prefill's rows, then
the text-only rows) whose head-output edit selects and reinforces on both branches, then the same scaling in
the real pass.

``Steering.state["vhr"]`` after a call (rows are the model's batch rows, beams included)::

    {"layers": [1, 18, ...], "branch": "separate", "alpha": 2.0,
     "heads":    [{layer: [selected head indices]} per row],
     "vhd":      [{layer: [VHD_i after the filter, H floats]} per row],
     "outliers": [{layer: [head indices zeroed by Eq. 6]} per row]}

Limits: the prefill must be one call (no chunked prefill). In ``lockstep`` the with-image rows of the
auxiliary run are the language model's inputs as the real prefill receives them, so position edits of other
methods are part of them; their attention, residual and logits edits are off, as for every auxiliary run.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from steer.edits.context import EditContext
from steer.edits.facts import last_positions
from steer.edits.kinds import Collect, Edit, HeadOutputEdit, SourceRun
from steer.errors import InvalidParameterError
from steer.registry import Method, param, register

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


# ---------------------------------------------------------------------------------------------------
# the method


def at_last(heads: torch.Tensor, last: torch.Tensor | None) -> torch.Tensor:
    """[B, T, H, d] -> [B, H, d] at each row's last prompt position (``last`` None: the last column)."""
    if last is None:
        return heads[:, -1]
    return heads[torch.arange(heads.shape[0], device=heads.device), last.to(heads.device)]


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

    # ---- parameters -------------------------------------------------------------------------------
    @property
    def target_layers(self) -> list[int]:
        layers = self.params.layers
        if isinstance(layers, str):
            return auto_layers(self.model.num_layers)
        return sorted(set(layers))

    def check(self) -> None:
        p = self.params
        if not p.alpha > 0:
            raise InvalidParameterError(
                f"vhr: alpha={p.alpha!r} is out of range; it must be in (0, 10] (0 is excluded)"
            )
        n = self.model.num_layers
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

    def initial_state(self) -> dict[str, Any]:
        return {"layers": self.target_layers, "branch": self.params.branch, "alpha": self.params.alpha}

    def edits(self) -> list[Edit]:
        layers = self.target_layers
        if self.params.branch == "separate":
            return [
                SourceRun(name="no_image", inputs="text_only"),
                Collect(
                    name="n", site="layer.attn.head_out", layers=layers, select="last", runs=("no_image",),
                    fn=lambda out, ectx: out.float().clone(),
                ),
                HeadOutputEdit(layers=layers, fn=self._at_heads),
            ]  # fmt: skip
        return [
            SourceRun(name="lockstep", inputs=("same", "text_only")),
            HeadOutputEdit(layers=layers, fn=self._lockstep, runs=("lockstep",)),
            HeadOutputEdit(layers=layers, fn=self._at_heads),
        ]

    # ---- selection (Eqs. 4, 6, 7) ------------------------------------------------------------------
    def _select(self, layer: int, a: torch.Tensor, n: torch.Tensor, memo: dict[Any, Any]) -> torch.Tensor:
        vhd, ta = head_divergence(a, n)
        sel = select_heads(vhd, ta, self.params.filter_outliers, self.params.std)
        memo.setdefault("masks", {})[layer] = sel.mask
        memo.setdefault("records", {})[layer] = sel
        return sel.mask

    def _lockstep(self, out: torch.Tensor, ectx: EditContext) -> torch.Tensor:
        """The 2B-row auxiliary run: select from the with-image rows' last token and the no-image rows' last
        column (left padded), then reinforce both branches."""
        assert ectx.layer is not None
        batch = out.shape[0] // 2
        padding = ectx.forward.padding_mask
        last = last_positions(padding[:batch]) if padding is not None else None
        chosen = self._select(ectx.layer, at_last(out[:batch], last), out[batch:, -1], ectx.memo)
        return reinforce(out, torch.cat([chosen, chosen], dim=0), self.params.alpha)

    # ---- the real forward: select online (separate), scale at every step ---------------------------
    def _at_heads(self, out: torch.Tensor, ectx: EditContext) -> torch.Tensor | None:
        memo = ectx.memo
        layer = ectx.layer
        assert layer is not None
        prefill = ectx.phase == "prefill"
        if prefill and self.params.branch == "separate" and layer not in memo.get("masks", {}):
            n = ectx.collected("n", layer)
            if n is None:
                return None  # the prefill ran with VHR disabled: nothing selected for this call
            padding = ectx.forward.padding_mask
            last = last_positions(padding) if padding is not None and padding.shape[1] == out.shape[1] else None
            self._select(layer, at_last(out, last), n.to(out.device), memo)
        masks = memo.get("masks")
        mask = None if masks is None else masks.get(layer)
        if mask is None:
            return None
        if mask.shape[0] != out.shape[0]:
            raise RuntimeError(
                f"vhr: heads were selected for {mask.shape[0]} rows but this step has {out.shape[0]}; the batch "
                "must keep its rows between the prefill and the decode steps"
            )
        if prefill and layer == self.target_layers[-1]:
            self._record(memo)
        return reinforce(out, mask, self.params.alpha)

    # ---- state, once per prefill -------------------------------------------------------------------
    def _record(self, memo: dict[Any, Any]) -> None:
        """Copy the per-row selection into ``Steering.state["vhr"]`` (one host sync per prefill)."""
        records: dict[int, Selection] = memo.get("records") or {}
        if memo.get("recorded") or not records:
            return
        memo["recorded"] = True
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
