"""VAR's math as pure functions (specs/var.md steps 1, 2, 5, 6): sink scores and flags, key-group labels, row
selection and redistribution coefficients (also registered as the ``"var"`` kernel rule), and the known sink
channels of the recipes. Used by `steer.methods.vlm.var`."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from steer.edits.facts import ModelInfo
from steer.kernels.rules import CoefficientRule, register_rule

#: Key-group labels handed to `GroupReweight` (0 = every other key).
LABEL_OTHER, LABEL_SV, LABEL_ST, LABEL_NV = 0, 1, 2, 3

#: The eps of φ's denominator, sqrt(mean_d x² + eps) (spec step 1).
PHI_EPS = 1e-6

#: The per-visual-token eps of the sink share m_Sv / (V + |vis|·eps) (official code).
SHARE_EPS = 1e-6

CALIBRATE_HINT = "steer calibrate sinks --model PATH --images DIR"


# --------------------------------------------------------------------------------------------------
# the math, as pure functions


def sink_scores(x: Tensor) -> Tensor:
    """z = |x| / sqrt(mean_d x² + 1e-6) per token and channel, fp32 [..., T, D] (no learned norm gain)."""
    x = x.float()
    rms = torch.sqrt(x.pow(2).mean(-1, keepdim=True) + PHI_EPS)
    return x.abs() / rms


def sink_flags(
    x: Tensor, sink_dims: Sequence[int] | Tensor, tau: float, padding: Tensor | None = None
) -> Tensor:
    """bool [B, T]: ``φ_j = max_{d∈D_sink} |x_j[d]| / sqrt(mean_d x_j² + 1e-6) > τ`` and j is not padding.

    ``x`` [B, T, D] is the residual stream entering a decoder layer; ``padding`` [B, T] bool (True = real).
    """
    x = x.float()
    dims = torch.as_tensor(sink_dims, dtype=torch.long, device=x.device)
    rms = torch.sqrt(x.pow(2).mean(-1) + PHI_EPS)  # [B, T]
    phi = x.index_select(-1, dims).abs().amax(-1) / rms
    sink = phi > tau
    if padding is not None:
        sink = sink & padding[:, : sink.shape[1]].to(sink.device).bool()
    return sink


def group_labels(sink: Tensor, visual: Tensor) -> Tensor:
    """Key labels [B, T]: 1 = Sv (sink ∩ vis), 2 = St (sink \\ vis), 3 = Nv (vis \\ sink), 0 = other."""
    visual = visual.to(sink.device).bool()
    labels = torch.zeros(sink.shape, dtype=torch.long, device=sink.device)
    labels[sink & visual] = LABEL_SV
    labels[sink & ~visual] = LABEL_ST
    labels[~sink & visual] = LABEL_NV
    return labels


def var_coefficients(
    masses: Tensor,
    p: float,
    rho: float,
    min_visual_mass: float,
    n_visual: Tensor | float,
    has_visual_sink: Tensor | None = None,
    valid: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Row selection (step 5) and redistribution coefficients (step 6) from the group masses.

    ``masses`` [B, H, n, 4] fp32 with columns (O, Sv, St, Nv). A row is selected iff
    ``V = m_Sv + m_Nv ≥ min_visual_mass``, ``m_Sv / (V + |vis|·1e-6) ≤ 1 − ρ`` and ``m_Nv > 0``
    (and, when given, the sample has a visual sink and the row slot is ``valid`` [B, n]). For selected rows
    ``c = (1, p, p, 1 + Ω/m_Nv)`` with ``Ω = (1 − p)(m_Sv + m_St)``; every other row gets c = 1.
    ``n_visual``: |vis| per sample ([B] or a number). Returns ``(c [B, H, n, 4], selected bool [B, H, n])``.
    """
    m_sv, m_st, m_nv = masses[..., LABEL_SV], masses[..., LABEL_ST], masses[..., LABEL_NV]
    visual = m_sv + m_nv
    nvis = torch.as_tensor(n_visual, dtype=masses.dtype, device=masses.device)
    if nvis.dim() == 1:
        nvis = nvis[:, None, None]
    share = m_sv / (visual + nvis * SHARE_EPS)
    selected = (visual >= min_visual_mass) & (share <= 1.0 - rho) & (m_nv > 0)
    if has_visual_sink is not None:
        selected = selected & has_visual_sink.to(masses.device)[:, None, None]
    if valid is not None:
        selected = selected & valid.to(masses.device)[:, None, :]
    omega = (1.0 - p) * (m_sv + m_st)
    c_nv = 1.0 + omega / torch.where(m_nv > 0, m_nv, torch.ones_like(m_nv))
    ones = torch.ones_like(m_sv)
    sink_c = torch.full_like(m_sv, p)
    c = torch.stack([ones, sink_c, sink_c, c_nv], dim=-1)
    c = torch.where(selected[..., None], c, torch.ones_like(c))
    return c, selected


def _rule_coefficients(rule: CoefficientRule, masses: Tensor) -> Tensor:
    """The ``"var"`` coefficient rule in torch: :func:`var_coefficients` with the rule's parameters."""
    sv, st, nv = rule.groups
    if (sv, st, nv) != (LABEL_SV, LABEL_ST, LABEL_NV):  # the rule's groups, in VAR's column order
        index = torch.tensor([0, sv, st, nv], device=masses.device)
        order = torch.arange(masses.shape[-1], device=masses.device)
        masses = masses.index_select(-1, index)
    else:
        order = None
    gate = rule.per_sample.get("gate")
    c, _ = var_coefficients(
        masses,
        p=rule.params["keep"],
        rho=rule.params["rho"],
        min_visual_mass=rule.params["min_mass"],
        n_visual=rule.per_sample.get("n_tokens", 0.0),
        has_visual_sink=gate,
    )
    if order is None:
        return c
    out = torch.ones(*c.shape[:-1], order.numel(), dtype=c.dtype, device=c.device)
    out[..., [sv, st, nv]] = c[..., 1:]
    return out


#: VAR's rule, evaluated by the kernel's gated-transfer epilogue (`steer.kernels.rules`).
register_rule("var", _rule_coefficients, epilogue="gated_transfer")


def var_rule(
    p: float,
    rho: float,
    min_visual_mass: float,
    n_visual: Tensor | float,
    *,
    groups: tuple[int, int, int] = (LABEL_SV, LABEL_ST, LABEL_NV),
    sample_ok: Tensor | None = None,
    on_selected: Any = None,
) -> CoefficientRule:
    """Steps 5-6 as a kernel rule: ``groups`` = the labels of (Sv, St, Nv); ``n_visual`` = |vis| per sample
    ([B] or a number); ``sample_ok`` bool [B] (False = leave the sample unchanged: no visual sink)."""
    if len(set(groups)) != 3 or min(groups) < 1:
        raise ValueError(f"var_rule: groups must be three distinct labels >= 1, got {groups}")
    per_sample: dict[str, Any] = {"n_tokens": n_visual}
    if sample_ok is not None:
        per_sample["gate"] = sample_ok
    return CoefficientRule(
        kind="var",
        params={"keep": float(p), "rho": float(rho), "min_mass": float(min_visual_mass)},
        groups=tuple(int(g) for g in groups),
        per_sample=per_sample,
        on_selected=on_selected,
    )


# --------------------------------------------------------------------------------------------------
# known sink channels (recipes)


def model_key(model: ModelInfo) -> dict[str, Any]:
    return {
        "model_type": model.model_type,
        "text_model_type": model.text_model_type,
        "hidden_size": model.hidden_size,
        "num_layers": model.num_layers,
    }


def known_sink_dims(
    model_type: str, hidden_size: int, num_layers: int, text_model_type: str | None = None
) -> tuple[list[int], str] | None:
    """D_sink for a model from the recipes' ``sink_dims_for`` tables, with a description of the source.

    Recipes key D_sink by (top-level ``model_type``, text ``hidden_size``, ``num_hidden_layers``); an entry may
    add ``text_model_type`` to tell apart models that share the key (LLaVA-NeXT vicuna-7b and mistral-7b).
    The last matching entry wins, so a calibration appended to a recipe file overrides the shipped value.
    """
    from steer.recipe_files import all_recipes

    found: tuple[list[int], str] | None = None
    for recipe in all_recipes().values():
        for entry in recipe.extra.get("sink_dims_for") or []:
            if not isinstance(entry, dict):
                continue
            if entry.get("model_type") != model_type:
                continue
            if (
                int(entry.get("hidden_size", -1)) != hidden_size
                or int(entry.get("num_layers", -1)) != num_layers
            ):
                continue
            want_text = entry.get("text_model_type")
            if want_text is not None and text_model_type is not None and want_text != text_model_type:
                continue
            dims = [int(d) for d in entry.get("sink_dims") or []]
            if dims:
                status = entry.get("status", "")
                found = (dims, f"recipe {recipe.full_name}" + (f" ({status})" if status else ""))
    return found


__all__ = [
    "CALIBRATE_HINT",
    "LABEL_NV",
    "LABEL_OTHER",
    "LABEL_ST",
    "LABEL_SV",
    "PHI_EPS",
    "SHARE_EPS",
    "group_labels",
    "known_sink_dims",
    "model_key",
    "sink_flags",
    "sink_scores",
    "var_coefficients",
    "var_rule",
]
