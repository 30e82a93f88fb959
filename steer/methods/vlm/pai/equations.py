"""PAI's equations as pure tensor functions (spec ``shared/specs/pai.md``).

**Attention boost** (step 2), for the edited query row, with ``a_j = q·k_j/√d + mask_j`` the scaled, masked
pre-softmax score of key j and I the image keys:

    a'_j = a_j + α·|a_j|   for j ∈ I        (= (1+α) a_j if a_j ≥ 0, (1−α) a_j if a_j < 0)

then softmax and ·V. Every image score rises by α|a_j|: not a post-softmax multiply, not ``+log α``, not a
constant factor (the edit depends on the sign).

**Image-free contrast** (step 5), last position, fp32, with z the logits and z_u those of the prompt without
its image:

    c = log_softmax(z),  u = log_softmax(z_u)
    out = c + (γ − 1)(c − u)  (= γc − (γ − 1)u);   out_k = −inf where c_k < max c + log β

Output in log-prob units, unnormalised (greedy, sampling warpers and beam search then run as usual).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def boost(scores: Tensor, alpha: float) -> Tensor:
    """``a + α|a|`` (the image keys' scores of the edited row).

    >>> boost(torch.tensor([1.0, -0.5]), 0.5).tolist()
    [1.5, -0.25]
    """
    return scores + alpha * scores.abs()


def cfg(logits: Tensor, unconditioned: Tensor, gamma: float, beta: float) -> Tensor:
    """``c + (γ − 1)(c − u)`` on log-probs with the cutoff ``c_k ≥ max c + log β`` (fp32).

    >>> out = cfg(torch.tensor([2.0, 1.9, 0.0, -1.0]), torch.tensor([3.0, 0.0, 0.0, -1.0]), 1.1, 0.1)
    >>> [round(v, 6) for v in out.tolist()]
    [-0.799715, -0.609715, -2.699715, -inf]
    """
    c = torch.log_softmax(logits.float(), dim=-1)
    u = torch.log_softmax(unconditioned.float(), dim=-1)
    out = c + (gamma - 1.0) * (c - u)
    cutoff = c.amax(dim=-1, keepdim=True) + math.log(beta)
    return out.masked_fill(c < cutoff, float("-inf"))


def default_layers(num_layers: int) -> tuple[int, int]:
    """The edited layers [2, L) (half-open): all but the first two, as the official code."""
    return (min(2, num_layers - 1), num_layers)


__all__ = ["boost", "cfg", "default_layers"]
