"""OPERA's equations and its rollback rule as pure functions, and the per-sample policy built from them
(spec ``shared/specs/opera.md``; the official code shikiw/OPERA is the reference).

Notation: P the padded prompt length; generated token g sits at P + g; step t picks token t. ``â(q, j)`` is a
query token's attention row at the policy's layer: the max over query heads, divided by its sum over keys.

* **Window** ``W`` of candidate c after beam b: (t+1)×(t+1) lower-triangular, rows and columns the generated
  tokens 0..t−1 of b's lineage and the candidate, ``W[i, j] = â(token_i, P + j)`` (the last ``window`` tokens
  when a window is set).
* **Column scores** ``s_j = fp16(1e-7 · Π_{i=j..t} σ·W[i, j])`` (product in fp32, stored as float16: 0 below
  ≈3e-8, +inf above 65504); ``φ = max_j s_j``, ``loc = argmax_j`` (first index on ties; all zero -> 0).
* **Score** of the candidate (logit units): ``y = z + α·I(cand)`` while t + 1 ≤ ``early_steps`` (I = the
  candidate row's image share ``Σ_{j∈image} â``), afterwards ``y = z − α·φ`` (φ = inf -> −inf).
* **History**: ``m_b = mode_c(loc_bc)`` (ties -> smallest) is appended to the history of beam *slot* b (not
  reordered with the beams); ``L = mode_b(m_b)`` over the sample's rows.
* **Rollback** when ``L ≥ min_rollback_pos`` and every slot has more than r entries equal to L: p = L + 1; if
  ``rollbacks[p] ≥ β`` then p = L; if that is spent too, none; ``rollbacks[p] += 1`` (never reset).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from steer.edits.kinds import BeamPolicy, BeamStep

SCALE = 1e-7


def window_matrix(history: list[Tensor], rows: Tensor, prompt_len: int, window: int | None = None) -> Tensor:
    """``W`` [nb, C, n, n] (n = t + 1, or ``window``): rows/cols the lineage's generated tokens and the candidate.

    ``history``: the lineage rows of tokens 0..t−1, each [nb, P + g + 1]; ``rows``: the candidates' rows
    [nb, C, P + t + 1]. Entries above the diagonal are 0.
    """
    nb, count, width = rows.shape
    t = width - prompt_len - 1
    start = 0 if window is None else max(0, t + 1 - window)
    n = t + 1 - start
    out = rows.new_zeros(nb, count, n, n)
    for i, g in enumerate(range(start, t)):
        out[:, :, i, : i + 1] = history[g][:, None, prompt_len + start : prompt_len + g + 1]
    out[:, :, n - 1, :] = rows[:, :, prompt_len + start : prompt_len + t + 1]
    return out


def column_scores(window: Tensor, scale: float) -> Tensor:
    """``s_j = fp16(1e-7 · Π_{i≥j} σ·W[i, j])`` over the last two dims [..., n, n] -> [..., n] (fp32 values of
    the float16 numbers).

    >>> column_scores(torch.full((6, 6), 40.0 / 50).tril(), 50.0)[0].item()
    409.5
    """
    n = window.shape[-1]
    below = torch.ones(n, n, dtype=torch.bool, device=window.device).tril()
    factors = torch.where(below, scale * window.float(), torch.ones_like(window, dtype=torch.float32))
    product = factors.prod(dim=-2)  # column j: Π over rows i ≥ j (the rows above the diagonal give 1)
    return (SCALE * product).to(torch.float16).float()


def penalty(window: Tensor, scale: float) -> tuple[Tensor, Tensor]:
    """``(φ, loc)`` of each window: the largest column score and its first index (all zero -> 0)."""
    scores = column_scores(window, scale)
    return scores.amax(dim=-1), scores.argmax(dim=-1)


def image_share(rows: Tensor, image_keys: Tensor) -> Tensor:
    """``I = Σ_{j∈image} â(cand, j)`` of each candidate row [..., L] (``image_keys`` [P] bool)."""
    keys = torch.zeros(rows.shape[-1], dtype=torch.bool, device=rows.device)
    keys[: image_keys.shape[0]] = image_keys.to(rows.device)
    return (rows * keys).sum(dim=-1)


def candidate_scores(
    logits: Tensor, phi: Tensor, image: Tensor, alpha: float, step: int, early_steps: int
) -> Tensor:
    """``y = z + α·I`` while ``step + 1 ≤ early_steps``, else ``z − α·φ`` (φ = inf -> −inf), fp32."""
    z = logits.float()
    if step + 1 <= early_steps:
        return z + alpha * image.float()
    if alpha == 0:
        return z
    return torch.where(torch.isinf(phi), torch.full_like(z, float("-inf")), z - alpha * phi.float())


def mode(values: Tensor) -> int:
    """The most frequent value of a 1-D int tensor (ties -> the smallest)."""
    counts = torch.bincount(values.flatten().long().cpu())
    return int(counts.argmax())


def rollback_position(
    histories: list[list[int]], location: int, threshold: int, min_pos: int, spent: dict[int, int], max_rollbacks: int
) -> int | None:
    """The step to redo, or None (the rule of the module docstring); updates ``spent`` when it fires."""
    if location < min_pos:
        return None
    if not all(sum(1 for m in h if m == location) > threshold for h in histories):
        return None
    p = location + 1
    if spent.get(p, 0) >= max_rollbacks:
        p = location
        if spent.get(p, 0) >= max_rollbacks:
            return None
    spent[p] = spent.get(p, 0) + 1
    return p


class OperaPolicy(BeamPolicy):
    """OPERA's side of the beam loop for one sample (see the module docstring)."""

    def __init__(
        self,
        alpha: float,
        scale: float,
        threshold: int | None,
        early_steps: int,
        min_rollback_pos: int,
        max_rollbacks: int,
        window: int | None,
        rollback_in_batch: bool = True,
    ) -> None:
        self.alpha = alpha
        self.scale = scale
        self.threshold = threshold
        self.early_steps = early_steps
        self.min_rollback_pos = min_rollback_pos
        self.max_rollbacks = max_rollbacks
        self.window = window
        self.rollback_in_batch = rollback_in_batch
        self.histories: list[list[int]] | None = None
        self.spent: dict[int, int] = {}
        self.location: int | None = None
        self.rollbacks: list[dict[str, int]] = []
        self.dropped: list[int] = []
        self.phi: list[float] = []
        self.batch_size = 1

    def needs_rows(self, step: int) -> bool:
        return self.alpha > 0 or self.threshold is not None

    def scores(self, view: BeamStep) -> Tensor:
        self.batch_size = view.batch_size
        z = view.logits.gather(1, view.candidates).float()
        if view.rows is None:
            return z
        rows = view.rows.float()
        window = window_matrix(view.history, rows, view.prompt_len, self.window)
        phi, loc = penalty(window, self.scale)
        start = view.step + 1 - window.shape[-1]
        loc = loc + start
        y = candidate_scores(z, phi, image_share(rows, view.image_keys), self.alpha, view.step, self.early_steps)
        if not bool(torch.isfinite(y).any()):
            y = z  # every candidate of every beam is -inf: drop the penalty for this step (recorded)
            self.dropped.append(view.step)
        self.phi.append(float(phi[torch.isfinite(phi)].max()) if bool(torch.isfinite(phi).any()) else float("inf"))
        per_beam = [mode(loc[b]) for b in range(loc.shape[0])]
        if self.histories is None:
            self.histories = [[] for _ in per_beam]
        for b, m in enumerate(per_beam):
            self.histories[b].append(m)
        self.location = mode(torch.tensor(per_beam))
        return y

    def rollback(self, step: int) -> int | None:
        if self.threshold is None or self.histories is None or self.location is None:
            return None
        if self.batch_size > 1 and not self.rollback_in_batch:
            return None  # the official code's behaviour with batch > 1
        if self.location + 1 > step:
            return None  # the summary token is the candidate itself: nothing to redo yet
        p = rollback_position(
            self.histories, self.location, self.threshold, self.min_rollback_pos, self.spent, self.max_rollbacks
        )
        if p is not None:
            hits = min(sum(1 for m in h if m == self.location) for h in self.histories)
            self.rollbacks.append({"step": step, "to": p, "location": self.location, "hits": hits})
        return p

    def restore(self, step: int) -> None:
        if self.histories is not None:
            self.histories = [h[: step + 1] for h in self.histories]
        self.location = None

    def redone(self, step: int) -> None:
        self.location = None

    def summary(self) -> dict[str, Any]:
        return {"rollbacks": list(self.rollbacks), "penalty_dropped": list(self.dropped), "max_phi": max(self.phi, default=0.0)}


__all__ = [
    "OperaPolicy",
    "candidate_scores",
    "column_scores",
    "image_share",
    "mode",
    "penalty",
    "rollback_position",
    "window_matrix",
]
