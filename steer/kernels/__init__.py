"""steer.kernels: attention math as pure tensor functions (no model code).

* :func:`attention_with_lse` — fused attention returning the output and the natural-log LSE;
* :func:`group_reweight` — post-softmax reweighting by key group via LSE merge,
  ``o' = Σ_g c_g m_g out_g`` with ``m_g = exp(lse_g − lse_all)``, no probability tensor;
* :func:`causal_mask` — the bool triangle for query rows that are the last Lq of Lk positions;
* :func:`eager_attention`, :func:`group_reweight_reference` — the materialised-probability reference;
* :func:`reweighted_attention` — the dispatcher (``impl="auto" | "fused" | "reference"``).
"""

from steer.kernels.dispatch import IMPLS, reweighted_attention
from steer.kernels.lse import attention_with_lse, causal_mask, group_reweight
from steer.kernels.reference import eager_attention, group_reweight_reference

__all__ = [
    "IMPLS",
    "attention_with_lse",
    "causal_mask",
    "eager_attention",
    "group_reweight",
    "group_reweight_reference",
    "reweighted_attention",
]
