"""One entry point for key-group reweighting; picks the implementation by name, device and shape."""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from steer.kernels.lse import causal_mask, group_reweight
from steer.kernels.reference import Coefficients, group_reweight_reference

if TYPE_CHECKING:
    from steer.kernels.rules import CoefficientRule

__all__ = ["IMPLS", "forced_impl", "kernel_may_run", "reweighted_attention"]

IMPLS = ("auto", "fused", "reference", "triton")
ONE_PASS_MAX_ROWS = 16  # query rows up to which the Triton path computes the base output itself (decode)

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


def kernel_may_run(impl: str, device: torch.device) -> bool:
    """Whether a call with ``impl`` on ``device`` may take the Triton path (so a coefficient rule is worth
    building): ``"triton"``, or ``"auto"`` on CUDA, after any :func:`forced_impl`."""
    if impl == "auto" and _FORCED:
        impl = _FORCED[-1]
    return impl == "triton" or (impl == "auto" and device.type == "cuda")


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
    base_out: Tensor | Callable[[], Tensor] | None = None,
    num_groups: int | None = None,
    impl: str = "auto",
    rule: CoefficientRule | None = None,
    base_lse: Tensor | None = None,
    causal: bool = False,
) -> Tensor:
    """Attention with post-softmax probabilities reweighted by key group: ``o' = Σ_g c_g m_g out_g``.

    ``m_g = exp(lse_g − lse_all)`` is the softmax mass of key group g, ``out_g`` attention restricted to g,
    ``c = coefficients(m)``; divided by ``Σ_g c_g m_g`` when ``renormalize``. Arguments and conventions as in
    :func:`steer.kernels.lse.group_reweight` (``causal`` too: the Triton kernel skips the key tiles past
    each row block's diagonal; no [Lq, Lk] mask is built unless every row is edited).

    ``base_out`` may be a function that computes the caller's unedited output: it is called only if needed.
    The Triton path does not need it for at most ``ONE_PASS_MAX_ROWS`` query rows (decode): it computes those
    rows' plain and reweighted output in one pass over K and V, where the base output would cost a second one
    (decode is memory-bound: two passes are two times SDPA). Unedited rows are then the kernel's plain attention
    (equal to the backend's up to rounding) rather than a copy of the backend's output.

    ``impl``: ``"fused"`` (LSE merge, no probability tensor), ``"reference"`` (materialised probabilities;
    tests and tiny shapes), ``"triton"`` (the single-pass kernel of :mod:`steer.kernels.triton_group`; needs
    ``rule``, CUDA or ``TRITON_INTERPRET=1``; an error if it cannot run), ``"auto"``: Triton on CUDA when
    triton is installed and ``rule`` is given and supported, else fused (also when the kernel fails, with a
    warning).

    ``rule``: the same coefficients as ``coefficients``, in the fixed form the kernel evaluates in its
    epilogue (:class:`steer.kernels.rules.CoefficientRule`); the torch paths ignore it and call
    ``coefficients``. After a Triton call ``rule.on_selected(selected [B, Hq, Lq] bool)`` runs, if set.
    """
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    if impl == "auto" and _FORCED:
        impl = _FORCED[-1]
    if impl == "triton" or (impl == "auto" and rule is not None and query.device.type == "cuda"):
        if callable(base_out) and query.shape[2] > ONE_PASS_MAX_ROWS:
            base_out = base_out()
        given = None if callable(base_out) else base_out
        out = _triton(
            query, key, value, mask, scale, labels, rule, rows, renormalize, given, impl == "triton", causal
        )
        if out is not None:
            return out
    if impl == "reference":
        if callable(base_out):
            base_out = base_out()
        if causal:
            tri = causal_mask(query.shape[2], key.shape[2], query.device)
            mask = tri if mask is None else mask.to(query.device) & tri
        ref = group_reweight_reference(
            query, key, value, mask, scale, labels, coefficients,
            rows=rows, renormalize=renormalize, base_out=base_out, num_groups=num_groups,
        )  # fmt: skip
        assert isinstance(ref, Tensor)
        return ref
    return group_reweight(
        query, key, value, mask, scale, labels, coefficients,
        rows=rows, renormalize=renormalize, base_out=base_out, num_groups=num_groups, base_lse=base_lse,
        causal=causal,
    )  # fmt: skip


_WARNED: set[str] = set()


def _triton(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    mask: Tensor | None,
    scale: float,
    labels: Tensor,
    rule: CoefficientRule | None,
    rows: Tensor | None,
    renormalize: bool,
    base_out: Tensor | None,
    strict: bool,
    causal: bool = False,
) -> Tensor | None:
    """The Triton path, or None (not applicable / failed, non-strict) to fall back to the LSE merge."""
    from steer.kernels import triton_group

    if rule is None:
        reason: str | None = "no CoefficientRule given (coefficient callables run on the LSE-merge path)"
    else:
        reason = triton_group.supports(query, key, value, rule, mask=mask)
    if reason is not None:
        if strict:
            raise ValueError(f"impl='triton': {reason}")
        return None
    assert rule is not None
    try:
        result = triton_group.triton_group_attention(
            query, key, value, labels, scale=scale, rule=rule, mask=mask, rows=rows, causal=causal,
            renormalize=renormalize, base_out=base_out, return_selected=rule.on_selected is not None,
        )  # fmt: skip
    except Exception as exc:
        if strict:
            raise
        message = f"{type(exc).__name__}: {exc}"
        if message not in _WARNED:
            _WARNED.add(message)
            warnings.warn(f"steer: Triton group attention failed, using the LSE-merge path ({message})", stacklevel=3)
        return None
    if isinstance(result, tuple):
        out, selected = result
        if rule.on_selected is not None:
            rule.on_selected(selected)
        return out
    return result
