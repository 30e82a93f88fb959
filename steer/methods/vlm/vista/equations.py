"""VISTA's equations as pure functions (specs/vista.md): the SLA window, the steering vector, the MLP rotation
and the residual renormalisation, the logits mix. Used by `steer.methods.vlm.vista`."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
import torch.nn.functional as F

from steer.errors import InvalidParameterError

EPS = 1e-12


# ---------------------------------------------------------------------------------------------------
# the paper's equations as pure functions


def resolve_window(window: str | list[int] | tuple[int, int], num_layers: int) -> tuple[int, int]:
    """SLA window W (0-based, inclusive): ``"code"`` = [L-7, L-2], ``"paper"`` = [L-6, L-2], clipped into
    [0, L-1] (so a 4-layer model gets [0, 2]); an explicit (s, e) is returned as given (validate it with
    :func:`check_window`)."""
    last = num_layers - 1
    if isinstance(window, str):
        if window == "code":
            start, end = num_layers - 7, num_layers - 2
        elif window == "paper":
            start, end = num_layers - 6, num_layers - 2
        else:
            raise ValueError(f"window must be 'code', 'paper' or (start, end), got {window!r}")
        return min(max(start, 0), last), min(max(end, 0), last)
    start, end = window
    return int(start), int(end)


def check_window(window: Any, num_layers: int) -> None:
    """Raise :class:`InvalidParameterError` unless ``window`` is 'code', 'paper' or (s, e), 0 <= s <= e <= L-1."""
    if isinstance(window, str):
        if window not in ("code", "paper"):
            raise InvalidParameterError(
                f"vista: window={window!r} is not valid; use 'code' ([L-7, L-2]), 'paper' ([L-6, L-2]) or "
                f"[start, end] with 0 <= start <= end <= {num_layers - 1}"
            )
        return
    ok = (
        isinstance(window, (list, tuple))
        and len(window) == 2
        and all(isinstance(x, int) and not isinstance(x, bool) for x in window)
        and 0 <= window[0] <= window[1] <= num_layers - 1
    )
    if not ok:
        raise InvalidParameterError(
            f"vista: window={window!r} is not valid; give [start, end] (blocks, 0-based, inclusive) with "
            f"0 <= start <= end <= {num_layers - 1} (the model has {num_layers} decoder layers), or 'code'/'paper'"
        )


def steering_vector(positive: torch.Tensor, negative: torch.Tensor) -> torch.Tensor:
    """Spec step 2: ``v = h^pos - h^neg`` (last real token, per layer) in fp32; no normalisation."""
    return positive.float() - negative.float()


def similarity_scale(m: torch.Tensor, v: torch.Tensor, eps: float = EPS) -> torch.Tensor:
    """``s = 1 + max(0, cos(m, -v̂))`` over the last dimension (keepdim), in fp32; 1 <= s <= 2."""
    m_hat = F.normalize(m.float(), dim=-1, eps=eps)
    v_hat = F.normalize(v.float(), dim=-1, eps=eps)
    return 1.0 + (-(m_hat * v_hat).sum(dim=-1, keepdim=True)).clamp_min(0.0)


def rotate(m: torch.Tensor, v_hat: torch.Tensor, lam: float, eps: float = EPS) -> torch.Tensor:
    """``m' = ‖m‖ · normalize(m̂ + λ s v̂)`` with a unit ``v_hat`` (fp32 in, fp32 out)."""
    norm = m.norm(dim=-1, keepdim=True)
    m_hat = m / norm.clamp_min(eps)
    s = 1.0 + (-(m_hat * v_hat).sum(dim=-1, keepdim=True)).clamp_min(0.0)
    return norm * F.normalize(m_hat + lam * s * v_hat, dim=-1, eps=eps)


def steer_mlp_output(m: torch.Tensor, v: torch.Tensor, lam: float, eps: float = EPS) -> torch.Tensor:
    """Spec step 3 (``mode="mlp"``): ``m' = ‖m‖ · normalize(m̂ + λ · s · v̂)``, s = 1 + max(0, cos(m, -v̂)).

    Computed in fp32 over the last dimension (``v`` broadcasts against ``m``), cast back to ``m``'s dtype.
    ‖m'‖ = ‖m‖ and cos(m', v) >= cos(m, v).

    >>> steer_mlp_output(torch.tensor([-3.0, 4.0]), torch.tensor([2.0, 0.0]), 0.5)
    tensor([1.2127, 4.8507])
    """
    v_hat = F.normalize(v.float(), dim=-1, eps=eps)
    return rotate(m.float(), v_hat, lam, eps).to(m.dtype)


def steer_residual(h: torch.Tensor, v: torch.Tensor, lam: float, eps: float = EPS) -> torch.Tensor:
    """Spec step 4 (``mode="residual"``, paper Eqs. 5-6): ``h̃ = h + λ v``, ``h ← h̃ · ‖h‖ / ‖h̃‖`` (raw v).

    >>> steer_residual(torch.tensor([-3.0, 4.0]), torch.tensor([2.0, 0.0]), 0.5)
    tensor([-2.2361,  4.4721])
    """
    hf = h.float()
    tilde = hf + lam * v.float()
    scale = hf.norm(dim=-1, keepdim=True) / tilde.norm(dim=-1, keepdim=True).clamp_min(eps)
    return (tilde * scale).to(h.dtype)


def augment_logits(f: torch.Tensor, window_logits: Iterable[torch.Tensor], gamma: float) -> torch.Tensor:
    """Spec step 5: ``f' = f + γ · (mean_k S_k - f)`` in fp32, cast back to ``f``'s dtype.

    ``window_logits`` are the S_k (for k = L-1 that is ``f`` itself); exact when the mean equals ``f``.

    >>> augment_logits(torch.tensor([2.0, 0.0, -1.0]),
    ...                [torch.tensor([0.0, 1.0, 0.0]), torch.tensor([1.0, 1.0, -2.0])], 0.3)
    tensor([ 1.5500,  0.3000, -1.0000])
    """
    total: torch.Tensor | None = None
    count = 0
    for s in window_logits:
        s = s.to(device=f.device, dtype=torch.float32)
        total = s.clone() if total is None else total.add_(s)
        count += 1
    if total is None:
        raise ValueError("augment_logits needs at least one window logit tensor")
    base = f.float()
    return (base + gamma * (total / count - base)).to(f.dtype)


# ---------------------------------------------------------------------------------------------------
# the method


__all__ = [
    "EPS",
    "augment_logits",
    "check_window",
    "resolve_window",
    "rotate",
    "similarity_scale",
    "steer_mlp_output",
    "steer_residual",
    "steering_vector",
]
