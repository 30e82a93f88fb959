"""VAR — Visual Attention Redistribution (Kang, Kim, Kim, Hwang, "See What You Are Told: Visual Attention
Sink in Large Multimodal Models", ICLR 2025, arXiv 2503.03321; spec: ``specs/var.md``).

Some visual tokens behave like the BOS token: they carry massive activations in a few fixed hidden channels
``D_sink`` and soak up attention without carrying information. VAR takes part of the attention that
image-centric text rows give to sink tokens and hands it to the non-sink visual tokens. No extra pass.

Per call (``model(...)`` / ``generate``), for each decoder layer l ∈ [2, L−1] (minus L−1 with
``exclude_last_layer``) and each sample b:

1. **Sinks** (prefill, a forward pre-hook on the layer; x = the residual stream entering it, fp32)::

       φ_j = max_{d ∈ D_sink} |x_j[d]| / sqrt(mean_d x_j² + 1e-6),   sink_j = (φ_j > τ) ∧ j not padding

2. **Key groups** (labels handed to `GroupReweight`): ``Sv = sink ∩ vis`` (1), ``St = sink \\ vis`` (2),
   ``Nv = vis \\ sink`` (3), everything else (0). Keys decoded later are never sinks (label 0).
3. **Eligible rows**: prefill — text rows after the sample's first image token; decode — the new row.
   A (layer, sample) without visual sinks is left unchanged (``skip_layers_without_visual_sink``).
4. **Masses** ``m_g = Σ_{j∈g} α_qj = exp(lse_g − lse_all)`` per (b, head, row), from the fused kernel.
5. **Row selection**: with ``V = m_Sv + m_Nv`` a row is selected iff
   ``V ≥ min_visual_mass`` and ``m_Sv / (V + |vis|·1e-6) ≤ 1 − ρ`` (and ``m_Nv > 0``: the budget needs a
   receiver). Per (layer, sample, head, row).
6. **Redistribution** (selected rows, post-softmax)::

       Ω = (1 − p)(m_Sv + m_St),   c_Sv = c_St = p,   c_Nv = 1 + Ω / m_Nv,   c_O = 1,   α'_qj = c_{g(j)} α_qj

   Every other row keeps c = 1. The row still sums to 1; nothing goes to text keys.
7. **Output** ``o' = Σ_g c_g m_g out_g`` via `steer.kernels` (LSE merge, no probability tensor);
   ``impl="reference"`` uses the materialised-probability reference instead (tests, tiny shapes).

``Steering.state["var"]``: ``sink_dims`` and where they came from, the edited ``layers`` and, for the last
call, ``samples[b][layer]`` = ``{"visual_sinks": [...], "text_sinks": [...], "skipped": bool,
"selected_rows": LongTensor [H], "eligible_rows": LongTensor []}`` (positions are sequence indices, left
padding included; row counts add up prefill and decode rows; with beams, b is the expanded batch row).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from steer.edits.context import EditContext
from steer.edits.facts import ModelInfo
from steer.edits.kinds import Collect, Edit, GroupReweight
from steer.errors import InvalidParameterError
from steer.kernels.rules import CoefficientRule
from steer.methods.vlm.var.sinks import (
    CALIBRATE_HINT,
    LABEL_NV,
    LABEL_OTHER,
    LABEL_ST,
    LABEL_SV,
    group_labels,
    known_sink_dims,
    model_key,
    sink_flags,
    sink_scores,
    var_coefficients,
    var_rule,
)
from steer.registry import Method, param, register

__all__ = [
    "LABEL_NV",
    "LABEL_OTHER",
    "LABEL_ST",
    "LABEL_SV",
    "VAR",
    "group_labels",
    "known_sink_dims",
    "sink_flags",
    "sink_scores",
    "var_coefficients",
    "var_rule",
]

# --------------------------------------------------------------------------------------------------
# the method


@register
class VAR(Method):
    """Visual Attention Redistribution: sink attention × p, the freed mass to the non-sink visual tokens.

    Edits: a :class:`~steer.edits.kinds.Collect` at ``layer.in`` (prefill) flags each layer's sinks and
    labels the key groups (step 1-2); a :class:`~steer.edits.kinds.GroupReweight` on the same layers selects
    rows and redistributes (steps 3-7), on the kernel path through a registered coefficient rule.
    """

    name = "var"
    description = (
        "VAR (Kang et al., ICLR 2025): image-centric text rows give a fraction of the attention on sink tokens "
        "(massive-activation channels) to the non-sink visual tokens."
    )
    stage = "attention"
    needs_image_tokens = True

    @dataclass
    class Params:
        tau: float = param(20.0, help="sink threshold on φ (> 0)", range=(0.0, None))
        rho: float = param(
            0.5, help="min non-sink share of a row's visual attention (paper ρ)", range=(0.0, 1.0)
        )
        min_visual_mass: float = param(
            0.2, help="min total visual attention of a row (code: summ)", range=(0.0, 1.0)
        )
        p: float = param(
            0.6, help="factor on sink probabilities (released-code meaning; 1 = off)", range=(0.0, 1.0)
        )
        sink_dims: list[int] | None = param(
            None,
            help="massive-activation channels D_sink (default: from the recipes; `steer calibrate sinks`)",
        )
        exclude_last_layer: bool = param(False, help="leave the last decoder layer untouched (paper)")
        skip_layers_without_visual_sink: bool = param(
            True, help="leave a (layer, sample) without visual sinks unchanged (official)"
        )
        impl: str = param(
            "auto",
            help="group-attention implementation (reference = eager, tests only)",
            choices=("auto", "fused", "reference"),
        )

    def __init__(self, params: Any, model: ModelInfo, state: dict[str, Any]) -> None:
        super().__init__(params, model, state)
        self._dims_tensor: Tensor | None = None
        self._source = "parameter"

    # ---- parameters ------------------------------------------------------------------------------
    def resolve(self) -> Any:
        """D_sink from the recipes when not given (keyed by the model's type, width and depth)."""
        p = self.params
        if p.p == 1.0 or not p.tau > 0:  # the identity needs no channels; a bad tau is reported by check()
            return p
        dims = p.sink_dims
        if dims is None:
            key = model_key(self.model)
            found = known_sink_dims(key["model_type"], key["hidden_size"], key["num_layers"], key["text_model_type"])
            if found is None:
                raise InvalidParameterError(
                    f"var: no sink channels (sink_dims) are known for this model ({key['model_type']}, text "
                    f"{key['text_model_type']}, hidden_size {key['hidden_size']}, {key['num_layers']} layers). Find "
                    f"them with `{CALIBRATE_HINT}` (it writes them into a recipe), or pass sink_dims=[...]."
                )
            dims, self._source = found
        if not dims:
            return p
        return dataclasses.replace(p, sink_dims=sorted(set(int(d) for d in dims)))

    def check(self) -> None:
        p = self.params
        if not p.tau > 0:
            raise InvalidParameterError(
                f"var: tau={p.tau!r} is out of range; it must be > 0 (sink threshold on φ)"
            )
        if p.p == 1.0:
            return
        hidden = self.model.hidden_size
        if not p.sink_dims:
            raise InvalidParameterError(
                f"var: sink_dims is empty; give at least one channel in [0, {hidden}) or run `{CALIBRATE_HINT}`"
            )
        bad = [d for d in p.sink_dims if not 0 <= d < hidden]
        if bad:
            raise InvalidParameterError(
                f"var: sink_dims {bad} out of range; channels must be in [0, {hidden}) (hidden_size {hidden})"
            )

    def initial_state(self) -> dict[str, Any]:
        return {"sink_dims": list(self.params.sink_dims), "sink_dims_source": self._source, "layers": self.layers()}

    def layers(self) -> list[int]:
        """Edited decoder layers: 2..L−1, without L−1 when ``exclude_last_layer``."""
        last = self.model.num_layers - (1 if self.params.exclude_last_layer else 0)
        return list(range(2, last))

    def is_noop(self) -> bool:
        return self.params.p == 1.0 or not self.layers()

    def edits(self) -> list[Edit]:
        layers = self.layers()
        return [
            Collect(name="sinks", site="layer.in", layers=layers, fn=self._detect, phase="prefill"),
            GroupReweight(
                layers=layers,
                coefficients=self._coefficients,
                groups=self._groups,
                rows="after_image",
                renormalize=False,
                impl=self.params.impl,
                rule=self._rule,
            ),
        ]

    # ---- step 1: sinks, at prefill ----------------------------------------------------------------
    def _dims(self, device: torch.device) -> Tensor:
        if self._dims_tensor is None or self._dims_tensor.device != device:
            self._dims_tensor = torch.tensor(self.params.sink_dims, dtype=torch.long, device=device)
        return self._dims_tensor

    def _new_call(self, batch: int) -> None:
        self.state["samples"] = [{} for _ in range(batch)]

    def _detect(self, x: Tensor, ectx: EditContext) -> dict[str, Any] | None:
        """Sinks of the residual stream entering the layer, the key labels and the per-sample counters."""
        fwd = ectx.forward
        batch, length = x.shape[0], x.shape[1]
        visual = fwd.key_image_mask(length, x.device)
        if visual is None:  # no input_ids: the runtime has already refused the call
            return None
        ectx.once("call", lambda: self._new_call(batch))
        padding = fwd.padding_mask
        sink = sink_flags(
            x, self._dims(x.device), self.params.tau, None if padding is None else padding.to(x.device)
        )
        labels = group_labels(sink, visual)
        heads = self.model.num_heads
        entry = {
            "labels": labels,
            "has_visual_sink": (labels == LABEL_SV).any(1),
            "n_visual": visual.sum(1).float(),
            "selected": torch.zeros(batch, heads, dtype=torch.long, device=x.device),
            "eligible": torch.zeros(batch, dtype=torch.long, device=x.device),
        }
        where = sink.nonzero().tolist()  # one sync per layer and prefill
        is_visual = visual[sink].tolist()
        samples = self.state["samples"]
        per: list[dict[str, list[int]]] = [{"visual_sinks": [], "text_sinks": []} for _ in range(batch)]
        for (b, j), vis in zip(where, is_visual):
            per[b]["visual_sinks" if vis else "text_sinks"].append(j)
        for b in range(batch):
            samples[b][ectx.layer] = {
                **per[b],
                "skipped": self.params.skip_layers_without_visual_sink and not per[b]["visual_sinks"],
                "selected_rows": entry["selected"][b],
                "eligible_rows": entry["eligible"][b],
            }
        return entry

    # ---- step 2: key groups -----------------------------------------------------------------------
    def _groups(self, ectx: EditContext) -> Tensor:
        entry = ectx.collected("sinks", ectx.layer)
        if entry is None:  # no prefill seen with the edit active (e.g. it ran under `disabled()`): no groups
            return torch.zeros(ectx.forward.batch_size, 1, dtype=torch.long)
        return entry["labels"]

    # ---- steps 3, 5, 6: rows and coefficients -----------------------------------------------------
    def _coefficients(self, masses: Tensor, ectx: EditContext) -> Tensor:
        entry = ectx.collected("sinks", ectx.layer)
        if entry is None or masses.shape[-1] != 4:
            return torch.ones((), dtype=torch.float32, device=masses.device)
        valid = self._valid_slots(masses, ectx)
        p = self.params
        c, selected = var_coefficients(
            masses,
            p=p.p,
            rho=p.rho,
            min_visual_mass=p.min_visual_mass,
            n_visual=entry["n_visual"],
            has_visual_sink=entry["has_visual_sink"] if p.skip_layers_without_visual_sink else None,
            valid=valid,
        )
        entry["selected"] += selected.sum(-1)
        if valid is not None:
            entry["eligible"] += valid.sum(-1)
        return c

    def _rule(self, ectx: EditContext) -> CoefficientRule | None:
        """`_coefficients` as a kernel rule (the Triton path on CUDA): same selection, same coefficients,
        same state counts (through ``on_selected``)."""
        entry = ectx.collected("sinks", ectx.layer)
        if entry is None:
            return None
        p = self.params

        def record(selected: Tensor) -> None:  # bool [B, H, Lq]: the rows the kernel edited
            entry["selected"] += selected.sum(-1)
            eligible = ectx.forward.rows_after_first_image(selected.device)
            if eligible is not None:
                entry["eligible"] += eligible.sum(-1)

        return var_rule(
            p.p,
            p.rho,
            p.min_visual_mass,
            entry["n_visual"],
            sample_ok=entry["has_visual_sink"] if p.skip_layers_without_visual_sink else None,
            on_selected=record,
        )

    @staticmethod
    def _valid_slots(masses: Tensor, ectx: EditContext) -> Tensor | None:
        """bool [B, n]: which of the n query slots handed to the coefficients are eligible rows.

        The reference kernel passes every query row (n = Lq): the eligible rows are ``rows_after_first_image``.
        The fused kernel passes the eligible rows of each sample gathered first, in order, padded to the
        largest count with other rows: sample b's first ``count_b`` slots are valid.
        """
        eligible = ectx.forward.rows_after_first_image(masses.device)
        if eligible is None:
            return None
        n = masses.shape[2]
        if n == eligible.shape[1]:
            return eligible
        count = eligible.sum(1)
        return torch.arange(n, device=masses.device)[None, :] < count[:, None]
