"""One entry point for key-group reweighting; picks the implementation by name, device and shape."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from torch import Tensor

from steer.kernels.lse import group_reweight
from steer.kernels.reference import Coefficients, group_reweight_reference

__all__ = ["IMPLS", "forced_impl", "reweighted_attention"]

IMPLS = ("auto", "fused", "reference")

_FORCED: list[str] = []


@contextlib.contextmanager
def forced_impl(impl: str) -> Iterator[None]:
    """Within the block, every ``impl="auto"`` call uses ``impl`` (tests compare fused and reference paths
    inside a real model this way)."""
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    _FORCED.append(impl)
    try:
        yield
    finally:
        _FORCED.pop()


def reweighted_attention(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    mask: Tensor | None,
    scale: float,
    labels: Tensor,
    coefficients: Coefficients,
    rows: Tensor | None = None,
    renormalize: bool = False,
    base_out: Tensor | None = None,
    num_groups: int | None = None,
    impl: str = "auto",
) -> Tensor:
    """Attention with post-softmax probabilities reweighted by key group: ``o' = Σ_g c_g m_g out_g``.

    ``m_g = exp(lse_g − lse_all)`` is the softmax mass of key group g, ``out_g`` attention restricted to g,
    ``c = coefficients(m)``; divided by ``Σ_g c_g m_g`` when ``renormalize``. Arguments and conventions as in
    :func:`steer.kernels.lse.group_reweight`.

    ``impl``: ``"fused"`` (LSE merge, no probability tensor), ``"reference"`` (materialised probabilities;
    tests and tiny shapes), ``"auto"`` (currently always fused; a Triton single-pass kernel may be added
    for CUDA).
    """
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    if impl == "auto" and _FORCED:
        impl = _FORCED[-1]
    if impl == "reference":
        out = group_reweight_reference(
            query, key, value, mask, scale, labels, coefficients,
            rows=rows, renormalize=renormalize, base_out=base_out, num_groups=num_groups,
        )  # fmt: skip
        assert isinstance(out, Tensor)
        return out
    return group_reweight(
        query, key, value, mask, scale, labels, coefficients,
        rows=rows, renormalize=renormalize, base_out=base_out, num_groups=num_groups,
    )  # fmt: skip
