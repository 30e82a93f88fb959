"""OPERA — Over-trust Penalty and Retrospection-Allocation (Huang et al., "OPERA: Alleviating Hallucination in
Multi-Modal Large Language Models via Over-Trust Penalty and Retrospection-Allocation", CVPR 2024, arXiv
2311.17911; code shikiw/OPERA, the reference). Spec: ``shared/specs/opera.md``; the equations and the rollback
rule are in :mod:`steer.methods.vlm.opera.penalty`.

A beam search (``num_beams`` ≥ 2) that, per beam, looks at its top-C candidates' attention rows at the last
decoder layer: a "column" (generated tokens all leaning on one earlier summary token) is penalised,

    s_j = fp16(1e-7 · Π_{i≥j} σ·W[i, j]),   φ = max_j s_j,   y = z − α·φ      (z + α·I in the first 10 tokens)

and when the same column keeps winning (more than r hits in every beam's history) the search rolls back to just
after the summary token and redoes that step with the earlier choices banned.

Edits: one :class:`~steer.edits.kinds.BeamLookahead` (the backend runs ``generate``'s beam search through its
``custom_generate`` hook with the method's policy; ``model.generate`` stays the caller's only call). Fix of the
official code, on by default: rollback works with batch > 1 (one beam loop per sample); ``rollback_in_batch=False``
reproduces the code, which silently skips rollback there.

``Steering.state["opera"]`` after a call: ``{"samples": [{"rollbacks": [{"step", "to", "location", "hits"}],
"penalty_dropped": [steps], "max_phi": float}]}`` plus the resolved settings.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from steer.edits.kinds import BeamLookahead, BeamPolicy, Edit
from steer.errors import InvalidParameterError
from steer.methods.vlm.opera.penalty import (
    OperaPolicy,
    candidate_scores,
    column_scores,
    image_share,
    mode,
    penalty,
    rollback_position,
    window_matrix,
)
from steer.registry import Method, param, register

__all__ = [
    "OPERA",
    "OperaPolicy",
    "candidate_scores",
    "column_scores",
    "image_share",
    "mode",
    "penalty",
    "rollback_position",
    "window_matrix",
]


@register
class OPERA(Method):
    name = "opera"
    description = (
        "OPERA (Huang et al., CVPR 2024): beam search that penalises candidates whose last-layer attention shows "
        "a column on an earlier summary token, and rolls back past it when it keeps winning (num_beams >= 2)."
    )
    stage = "logits"
    needs_image_tokens = True  # the early image bonus reads the image keys

    @dataclass
    class Params:
        scale_factor: float = param(50.0, help="sigma, the scale of attention entries in the column product (paper 40-60)", range=(0.0, None))
        threshold: int | None = param(15, help="rollback after more than r hits of one location in every beam; None = no rollback", range=(1, None))
        num_attn_candidates: int = param(5, help="C, candidates per beam (top-C raw logits)", range=(1, None))
        penalty_weights: float = param(1.0, help="alpha, the weight of the penalty (and of the early image bonus)", range=(0.0, None))
        max_rollbacks: int | None = param(None, help="beta, rollbacks allowed per position; None = C (the code)", range=(0, None))
        early_steps: int = param(10, help="tokens scored by the image bonus instead of the penalty", range=(0, None))
        min_rollback_pos: int = param(10, help="smallest summary location a rollback may return to", range=(0, None))
        window: int | None = param(None, help="generated-token window of the column product; None = all (paper's k: unvalidated)", range=(2, None))
        layer: int = param(-1, help="decoder layer whose attention rows are read (non-last: unvalidated)")
        lookahead: str = param("tree", help="candidate forwards: 'tree' (one forward) or 'sequential' (C forwards)", choices=("tree", "sequential"))
        rollback_in_batch: bool = param(True, help="rollback with batch > 1 (False = the official code: skipped)")

    def check(self) -> None:
        n = int(self.model.num_layers)
        if not -n <= self.params.layer < n:
            raise InvalidParameterError(f"opera: layer={self.params.layer} does not exist (the model has {n} layers)")

    def initial_state(self) -> dict[str, Any]:
        p = self.params
        return {
            "scale_factor": p.scale_factor, "threshold": p.threshold, "num_attn_candidates": p.num_attn_candidates,
            "penalty_weights": p.penalty_weights, "max_rollbacks": self.max_rollbacks, "samples": [],
        }  # fmt: skip

    @property
    def max_rollbacks(self) -> int:
        p = self.params
        return int(p.num_attn_candidates if p.max_rollbacks is None else p.max_rollbacks)

    def policies(self, batch_size: int) -> Callable[[int], BeamPolicy]:
        p = self.params

        def make(sample: int) -> BeamPolicy:
            return OperaPolicy(
                alpha=p.penalty_weights, scale=p.scale_factor, threshold=p.threshold, early_steps=p.early_steps,
                min_rollback_pos=p.min_rollback_pos, max_rollbacks=self.max_rollbacks, window=p.window,
                rollback_in_batch=p.rollback_in_batch,
            )  # fmt: skip

        return make

    def _done(self, policies: list[BeamPolicy]) -> None:
        self.state["samples"] = [pol.summary() for pol in policies if isinstance(pol, OperaPolicy)]

    def edits(self) -> list[Edit]:
        p = self.params
        return [
            BeamLookahead(
                policy=self.policies, candidates=p.num_attn_candidates, layer=p.layer, lookahead=p.lookahead,
                on_done=self._done,
            )  # fmt: skip
        ]
