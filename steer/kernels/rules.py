"""Coefficient rules: a coefficient function of the group masses, registered by name.

Key-group reweighting (`steer.kernels.dispatch.reweighted_attention`) edits a row as
``o' = Σ_g c_g m_g out_g`` with ``c = rule(m)``. The torch paths (LSE merge, reference) call the rule's
registered torch function; the Triton kernel evaluates a rule in its epilogue when the rule's kind names one
of the kernel's epilogues:

* ``"constant"``: ``c = (c_0, …, c_G)`` for every edited row (registered here; ``GroupReweight`` with a list of
  coefficients uses it);
* ``"gated_transfer"``: with three groups (``a``, ``b``, ``r``) = ``rule.groups`` and per-sample token counts
  ``n``, a row is edited iff ``V = m_a + m_r ≥ min_mass``, ``m_a / (V + n·1e-6) ≤ 1 − rho``, ``m_r > 0`` and its
  sample's ``gate`` is set; then ``c_a = c_b = keep`` and ``c_r = 1 + (1 − keep)(m_a + m_b) / m_r`` (the mass
  taken from a and b goes to r), every other group keeps 1; other rows keep c = 1. VAR registers its rule on
  this epilogue (``steer.methods.vlm.var``).

A method registers its rule with :func:`register_rule` and builds instances with :class:`CoefficientRule`
(``kind``, scalar ``params``, ``groups``, per-sample tensors ``per_sample``, and ``on_selected``, called after a
Triton call with the bool [B, Hq, Lq] rows the rule edited).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

#: the kernel epilogues a rule can name (`steer.kernels.triton_group`).
EPILOGUES = ("constant", "gated_transfer")


@dataclass(frozen=True)
class RuleKind:
    """A registered rule: its torch form ``coefficients(rule, masses) -> c`` and the kernel epilogue that
    computes the same (None: torch paths only)."""

    name: str
    coefficients: Callable[[CoefficientRule, Tensor], Tensor]
    epilogue: str | None = None


RULES: dict[str, RuleKind] = {}


def register_rule(
    name: str, coefficients: Callable[[CoefficientRule, Tensor], Tensor], epilogue: str | None = None
) -> RuleKind:
    """Register the rule ``name``; ``epilogue`` names the Triton epilogue that evaluates it (`EPILOGUES`)."""
    if epilogue is not None and epilogue not in EPILOGUES:
        raise ValueError(f"unknown kernel epilogue {epilogue!r}; the kernel has {', '.join(EPILOGUES)}")
    kind = RuleKind(name, coefficients, epilogue)
    RULES[name] = kind
    return kind


@dataclass(frozen=True)
class CoefficientRule:
    """One rule instance for one call: ``kind`` (registered name), ``values`` (constant coefficients),
    ``params`` (scalars), ``groups`` (the labels the rule names), ``per_sample`` (tensors [B] such as token
    counts or a gate) and ``on_selected`` (called with the rows the Triton kernel edited)."""

    kind: str
    values: tuple[float, ...] = ()
    params: Mapping[str, float] = field(default_factory=dict)
    groups: tuple[int, ...] = ()
    per_sample: Mapping[str, Any] = field(default_factory=dict)
    on_selected: Callable[[Tensor], None] | None = None

    @classmethod
    def constant(cls, values: Sequence[float]) -> CoefficientRule:
        """``c_g = values[g]`` for every edited row (g = 0..G, 0 = background); values ≥ 0, finite."""
        vals = tuple(float(v) for v in values)
        if not vals:
            raise ValueError("CoefficientRule.constant needs at least one value (c_0)")
        if any(not math.isfinite(v) or v < 0 for v in vals):
            raise ValueError(f"CoefficientRule.constant: coefficients must be finite and >= 0, got {vals}")
        return cls(kind="constant", values=vals)

    @property
    def registered(self) -> RuleKind:
        found = RULES.get(self.kind)
        if found is None:
            raise ValueError(f"unknown coefficient rule {self.kind!r}; registered: {', '.join(sorted(RULES))}")
        return found

    @property
    def epilogue(self) -> str | None:
        return self.registered.epilogue

    @property
    def num_groups(self) -> int:
        """G: the highest label the rule gives a coefficient to."""
        return len(self.values) - 1 if self.kind == "constant" else max(self.groups)

    def coefficients(self, masses: Tensor) -> Tensor:
        """The rule in torch: ``masses`` [B, H, n, G+1] fp32 -> ``c`` broadcastable to it (fp32)."""
        return self.registered.coefficients(self, masses)


def _constant(rule: CoefficientRule, masses: Tensor) -> Tensor:
    if len(rule.values) != masses.shape[-1]:
        raise ValueError(f"{len(rule.values)} coefficients for {masses.shape[-1]} groups (incl. 0)")
    return torch.tensor(rule.values, dtype=torch.float32, device=masses.device)


register_rule("constant", _constant, epilogue="constant")

__all__ = ["EPILOGUES", "RULES", "CoefficientRule", "RuleKind", "register_rule"]
