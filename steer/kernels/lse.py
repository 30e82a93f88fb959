"""Fused attention with log-sum-exp, and key-group reweighting by LSE merge (no probability tensor).

For one query row split the keys into disjoint groups g. Attention restricted to group g gives
``out_g = Σ_{j∈g} e^{s_j} v_j / Z_g`` and ``lse_g = log Z_g``; the full softmax puts mass

    m_g = Σ_{j∈g} p_j = exp(lse_g − lse_all)

on the group, and ``o_all = Σ_g m_g out_g``. Reweighting post-softmax probabilities by a per-group factor
``p'_j = c_{g(j)} p_j`` therefore gives

    o' = Σ_g c_g m_g out_g                     (÷ Σ_g c_g m_g when renormalising)
       = o_all + Σ_{g≥1} (c_g − 1) m_g out_g + (c_0 − 1) m_0 out_0,

which needs one fused pass per named group (only over the edited query rows and the keys that group can
hold), and a pass over the background group 0 only when some ``c_0 ≠ 1``. Conventions: see
:mod:`steer.kernels.reference`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from steer.kernels.reference import (
    Coefficients,
    _as_4d_mask,
    _check_shapes,
    _coefficients,
    _gather_keys,
    _num_groups,
    _pad_labels,
    _repeat_kv,
    _rows_mask,
    _selection,
    explicit_scores,
)

__all__ = ["attention_with_lse", "explicit_score_attention", "group_reweight"]

# On CPU (torch 2.13, 2 cores) the aten kernel beat the math path at every shape tried, down to Lq=1, Lk=8
# (0.05 ms vs 0.22 ms at 32 heads, D=128), so "auto" never picks math for size alone.
_CPU_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
_CUDA_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _float_bias(mask: Tensor, dtype: torch.dtype) -> Tensor:
    """0 where allowed, -inf where masked, in ``dtype`` (the kernels' additive-mask form)."""
    zero = torch.zeros((), dtype=dtype, device=mask.device)
    return torch.where(mask, zero, torch.full((), float("-inf"), dtype=dtype, device=mask.device))


def _math_attention_with_lse(
    query: Tensor, key: Tensor, value: Tensor, mask: Tensor | None, scale: float
) -> tuple[Tensor, Tensor]:
    """fp32 math path (fp64 stays fp64 inside); GQA by reshaping the query, never repeating K/V."""
    b, hq, lq, d = query.shape
    hkv = key.shape[1]
    r = hq // hkv
    cdt = torch.float64 if query.dtype == torch.float64 else torch.float32
    q = query.to(cdt).reshape(b, hkv, r, lq, d)
    k = key.to(cdt)[:, :, None]
    v = value.to(cdt)[:, :, None]
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale  # [B, Hkv, r, Lq, Lk]
    if mask is not None:
        m = mask
        m = m[:, :, None] if m.shape[1] == 1 else m.reshape(m.shape[0], hkv, r, m.shape[2], m.shape[3])
        scores = scores.masked_fill(~m, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)  # -inf for fully masked rows
    finite = torch.isfinite(lse)
    probs = torch.exp(scores - torch.where(finite, lse, torch.zeros_like(lse))[..., None])
    out = torch.matmul(probs, v)  # fully masked rows: exp(-inf) = 0 -> out 0
    return out.reshape(b, hq, lq, -1).to(query.dtype), lse.reshape(b, hq, lq).float()


def _cpu_attention_with_lse(
    query: Tensor, key: Tensor, value: Tensor, mask: Tensor | None, scale: float, is_causal: bool = False
) -> tuple[Tensor, Tensor]:
    bias = None if mask is None else _float_bias(mask, query.dtype)
    op = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
    try:  # GQA is native in torch 2.13's CPU flash kernel
        out, lse = op(query, key, value, 0.0, is_causal, attn_mask=bias, scale=scale)
    except RuntimeError:
        r = query.shape[1] // key.shape[1]
        out, lse = op(
            query,
            key.repeat_interleave(r, 1),
            value.repeat_interleave(r, 1),
            0.0,
            is_causal,
            attn_mask=bias,
            scale=scale,
        )
    return out, lse.float()


def _cuda_attention_with_lse(
    query: Tensor, key: Tensor, value: Tensor, mask: Tensor | None, scale: float
) -> tuple[Tensor, Tensor]:
    """Memory-efficient CUDA kernel with ``compute_log_sumexp`` (untested off-device; caller falls back)."""
    b, hq, lq, _ = query.shape
    lk = key.shape[2]
    r = hq // key.shape[1]
    if r > 1:
        key, value = key.repeat_interleave(r, 1), value.repeat_interleave(r, 1)
    bias = None
    if mask is not None:
        # the kernel wants the bias' last dim 16-element aligned: allocate padded, hand over a view
        pad = (lk + 15) // 16 * 16
        full = torch.empty(b, mask.shape[1], mask.shape[2], pad, dtype=query.dtype, device=query.device)
        bias = full[..., :lk]
        bias.copy_(_float_bias(mask, query.dtype))
        bias = bias.expand(b, hq, lq, lk)
    out, lse = torch.ops.aten._scaled_dot_product_efficient_attention(
        query, key, value, bias, True, 0.0, False, scale=scale
    )[:2]
    return out, lse[..., :lq].float()  # lse may be padded along Lq (to a multiple of 32)


#: at most this many query rows go through the explicit (math) path under ``backend="auto"``.
MATH_MAX_ROWS = 16


def attention_with_lse(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    mask: Tensor | None,
    scale: float,
    *,
    backend: str = "auto",
    causal: bool = False,
) -> tuple[Tensor, Tensor]:
    """Fused softmax attention returning ``(out, lse)``.

    ``out = softmax(s) v`` with ``s = scale · q kᵀ`` (masked entries −inf) and ``lse = log Σ_j e^{s_j}``
    (natural log). Shapes: query [B, Hq, Lq, D], key/value [B, Hkv, Lk, D] (GQA inside), mask bool
    broadcastable to [B, Hq, Lq, Lk] or None. Returns ``out`` [B, Hq, Lq, D] in the input dtype and ``lse``
    [B, Hq, Lq] fp32; rows with no allowed key give ``out = 0`` and ``lse = -inf``.

    CPU: ``aten._scaled_dot_product_flash_attention_for_cpu``; CUDA: ``aten._scaled_dot_product_efficient_attention``
    with ``compute_log_sumexp``; other devices/dtypes and any kernel error: plain math (``torch.logsumexp``).
    ``backend``: ``"auto"``, ``"kernel"`` (an error if no kernel applies or it fails) or ``"math"``.
    ``causal=True`` with ``mask=None``: key j <= query row i (upper-left, Lq == Lk); the CPU kernel then skips
    the masked blocks instead of reading a materialised mask.
    """
    if backend not in ("auto", "kernel", "math"):
        raise ValueError(f"backend must be 'auto', 'kernel' or 'math', got {backend!r}")
    b, hq, hkv, lq, lk = _check_shapes(query, key, value)
    if causal and mask is None:
        if backend != "math" and query.device.type == "cpu" and query.dtype in _CPU_DTYPES and lq == lk:
            try:
                return _cpu_attention_with_lse(query, key, value, None, scale, is_causal=True)
            except Exception:
                if backend == "kernel":
                    raise
        mask = torch.ones(lq, lk, dtype=torch.bool, device=query.device).tril()[None, None]
    m = None if mask is None else _as_4d_mask(mask.to(query.device), b, hq, lq, lk)
    if lq == 0 or lk == 0 or query.shape[-1] == 0:
        out = query.new_zeros(b, hq, lq, value.shape[-1])
        return out, torch.full((b, hq, lq), float("-inf"), device=query.device)

    dev, dt = query.device.type, query.dtype
    if backend == "auto" and lq <= MATH_MAX_ROWS:
        # few query rows (decode, sparse edits): the explicit score row is memory-bound like the kernel and
        # avoids its per-call overhead (the CPU kernel takes ~12 ms for one unmasked row at Lk≈1k, DESIGN.md)
        return _math_attention_with_lse(query, key, value, m, scale)
    result = None
    if backend != "math" and value.shape[-1] == query.shape[-1]:
        kernel: Callable[[Tensor, Tensor, Tensor, Tensor | None, float], tuple[Tensor, Tensor]] | None = None
        if dev == "cpu" and dt in _CPU_DTYPES:
            kernel = _cpu_attention_with_lse
        elif dev == "cuda" and dt in _CUDA_DTYPES:
            kernel = _cuda_attention_with_lse
        if kernel is not None:
            try:
                result = kernel(query, key, value, m, scale)
            except Exception:
                if backend == "kernel":
                    raise
                result = None
    if result is None:
        if backend == "kernel":
            raise RuntimeError(f"no fused attention kernel for {dev}/{dt} with these shapes")
        return _math_attention_with_lse(query, key, value, m, scale)

    out, lse = result
    if m is not None:
        # kernels give out 0 / lse 0 (CPU) or possibly NaN for rows with no allowed key: normalise
        has_key = m.any(-1, keepdim=True)  # [Bm, Hm, Lqm, 1]
        # (on CPU the check is free and skips two full-size passes in the common case)
        if dev != "cpu" or not bool(has_key.all()):
            out = out.masked_fill(~has_key, 0)
            lse = lse.masked_fill(~has_key[..., 0], float("-inf"))
    return out, lse


def causal_mask(q_len: int, k_len: int, device: torch.device | str) -> Tensor:
    """bool [1, 1, Lq, Lk]: key j allowed for query row i iff j ≤ i + Lk − Lq (the rows are the last Lq
    positions; the Triton kernel's ``causal``)."""
    rows = torch.arange(k_len - q_len, k_len, device=device)[:, None]
    return (torch.arange(k_len, device=device)[None, :] <= rows)[None, None]


def _gather_rows(x: Tensor, idx: Tensor) -> Tensor:
    """x [B|1, H, Lq, N] gathered along Lq with idx [B, n] -> [B, H, n, N]."""
    b, n = idx.shape
    x = x.expand(b, *x.shape[1:])
    return torch.gather(x, 2, idx[:, None, :, None].expand(b, x.shape[1], n, x.shape[3]))


def _group_columns(labels: Tensor, g: int) -> Tensor | slice | None:
    """Key columns that hold group g in some sample: a slice when (nearly) contiguous, else an index; None if
    empty. A span with at most ``max(16, n // 8)`` foreign columns in it is still a slice (the foreign keys
    are masked out by label): a strided view beats copying K and V (e.g. VAR's non-sink visual tokens, an
    image span with a few sinks taken out)."""
    cols = (labels == g).any(0).nonzero().flatten()
    if cols.numel() == 0:
        return None
    lo, hi = int(cols[0]), int(cols[-1]) + 1
    if hi - lo - cols.numel() <= max(16, cols.numel() // 8):
        return slice(lo, hi)
    return cols


def _group_pass(
    q: Tensor,
    key: Tensor,
    value: Tensor,
    mask: Tensor | None,
    labels: Tensor,
    g: int,
    scale: float,
) -> tuple[Tensor, Tensor] | None:
    """(out_g, lse_g) of attention restricted to the keys of group g; None when no sample has such a key.

    When the caller's mask allows every key of the group's columns for every row (text after an image
    looking at that image), it is dropped and only the label test remains: a [B, 1, 1, Kg] mask instead of a
    [B, H, n, Kg] one, which the fused kernel reads once per row block instead of per row.
    """
    cols = _group_columns(labels, g)
    if cols is None:
        return None
    if isinstance(cols, slice):
        k, v, lab = key[:, :, cols], value[:, :, cols], labels[:, cols]
        m = None if mask is None else mask[..., cols]
    else:
        k, v, lab = key.index_select(2, cols), value.index_select(2, cols), labels.index_select(1, cols)
        m = None if mask is None else mask.index_select(3, cols)
    in_group = lab == g  # [B, Kg]
    gm: Tensor | None  # None: no mask
    gm = in_group[:, None, None, :]
    if m is not None and bool((m | ~gm).all()):
        m = None
    if m is not None:
        gm = m & gm
    elif bool(in_group.all()):
        gm = None
    return attention_with_lse(q, k, v, gm, scale)


def group_reweight(
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
    base_lse: Tensor | None = None,
    causal: bool = False,
) -> Tensor:
    """Reweight post-softmax attention by key group without materialising probabilities.

    ``labels`` [B, Lk] (shorter rows padded with 0) puts key j in group g(j) ∈ {0..G} (0 = background).
    Per (b, h, q): masses ``m_g = exp(lse_g − lse_all)`` for g ≥ 1, ``m_0 = max(0, 1 − Σ_{g≥1} m_g)``
    (all 0 for a row with no allowed key), group outputs ``out_g`` (0 for an empty group), coefficients
    ``c = coefficients(m)`` with ``m`` [B, Hq, n, G+1] fp32 over the n edited rows (must act row-wise;
    broadcastable result, c_g ≥ 0), and

        o' = Σ_g c_g m_g out_g = o_all + Σ_{g≥1} (c_g − 1) m_g out_g + (c_0 − 1) m_0 out_0

    divided by ``Σ_g c_g m_g`` (guarded against 0) when ``renormalize``. The background pass runs only if
    some ``c_0 ≠ 1``. A group with ``m_g = 0`` contributes nothing whatever its coefficient.

    ``rows`` [B, Lq] bool selects the edited query rows (None = all); every other row is returned exactly as
    ``base_out`` (the caller's unedited output, [B, Hq, Lq, D]) or, without it, as :func:`attention_with_lse`
    computes it. The per-group passes run only on the edited rows (gathered per sample, padded to the
    largest count) and only on the key columns each group can occupy; no [B, H, Lq, Lk] tensor is built
    beyond the caller's mask. ``base_lse`` [B, Hq, Lq] (the log-sum-exp that came with ``base_out``, e.g. from
    :func:`attention_with_lse`) saves the pass that would recompute it. ``num_groups`` fixes G (default
    ``labels.max()``). ``causal``: key j is allowed for row i only if j ≤ i + Lk − Lq (ANDed with ``mask``,
    usually None then); with gathered rows and ``base_out`` it costs a [B, 1, n, Lk] mask, never an
    [Lq, Lk] one. The result is a new tensor, except that ``base_out`` itself is returned when no row is edited.
    ``base_out`` may be a function computing it: it is called only if needed (not when every row is edited and
    the rows are few: the explicit path computes them from one probability block).
    """
    b, hq, _, lq, lk = _check_shapes(query, key, value)
    lab = _pad_labels(labels.to(query.device), b, lk)
    n_groups = _num_groups(lab, num_groups)
    sel = _rows_mask(None if rows is None else rows.to(query.device), b, lq)
    m4 = None if mask is None else _as_4d_mask(mask.to(query.device), b, hq, lq, lk)
    dtype = query.dtype
    make_base = base_out if callable(base_out) else None
    plain: Tensor | None = None if callable(base_out) else base_out

    def resolved_base() -> Tensor | None:
        nonlocal plain, make_base
        if make_base is not None:
            plain, make_base = make_base(), None
        if plain is not None:
            if plain.shape != (b, hq, lq, value.shape[-1]):
                raise ValueError(f"base_out must be [B, Hq, Lq, D] = {(b, hq, lq, value.shape[-1])}")
            plain = plain.to(dtype)
        return plain

    if make_base is None:
        resolved_base()
    has_base = plain is not None or make_base is not None

    # --- the edited rows: gathered per sample (idx [B, n], valid [B, n]) ---------------------------------
    if sel is not None and bool(sel.all()):
        sel = None
    if causal and (sel is None or not has_base):  # every row is needed: the whole triangle
        tri = causal_mask(lq, lk, query.device)
        m4 = tri if m4 is None else m4 & tri
        causal = False
    n = lq if sel is None else int(sel.sum(1).max())
    explicit = n <= MATH_MAX_ROWS
    o_all: Tensor | None = None
    if sel is None:
        idx = valid = None
        q_sel, m_sel = query, m4
        lse_sel = base_lse
        if not explicit:  # the merge starts from the plain output; the explicit path does not need it
            o_all = resolved_base()
            if o_all is None:
                o_all = attention_with_lse(query, key, value, m4, scale)[0]
    else:
        base = resolved_base()
        if n == 0:
            return base if base is not None else attention_with_lse(query, key, value, m4, scale)[0]
        order = torch.sort((~sel).to(torch.uint8), dim=1, stable=True).indices  # edited rows first
        idx = order[:, :n]
        valid = torch.gather(sel, 1, idx)
        q_sel = _gather_rows(query, idx)
        lse_sel = None if base_lse is None else _gather_rows(base_lse[..., None], idx)[..., 0]
        m_sel = None if m4 is None else (m4 if m4.shape[2] == 1 else _gather_rows(m4, idx))
        if causal:  # the gathered rows' part of the triangle only: [B, 1, n, Lk]
            keys = torch.arange(lk, device=query.device)
            tri = keys[None, None, None, :] <= (idx + (lk - lq))[:, None, :, None]
            m_sel = tri if m_sel is None else m_sel & tri
        if base is None:
            base = attention_with_lse(query, key, value, m4, scale)[0]
        o_all = _gather_rows(base, idx)

    if explicit:
        new = _explicit_reweight(q_sel, key, value, m_sel, lab, n_groups, scale, coefficients, valid, renormalize)
    else:
        assert o_all is not None  # set above whenever the merge runs
        new = _merged_reweight(
            q_sel, key, value, m_sel, lab, n_groups, scale, coefficients, valid, renormalize, o_all, lse_sel
        )

    if idx is None:
        return new
    assert valid is not None and o_all is not None and base is not None  # set together with idx
    new = torch.where(valid[:, None, :, None], new, o_all)
    result = base.clone()
    result.scatter_(2, idx[:, None, :, None].expand_as(new), new)
    return result


def _explicit_reweight(
    q_sel: Tensor,
    key: Tensor,
    value: Tensor,
    m_sel: Tensor | None,
    lab: Tensor,
    n_groups: int,
    scale: float,
    coefficients: Coefficients,
    valid: Tensor | None,
    renormalize: bool,
) -> Tensor:
    """Few edited rows (decode): one explicit [B, H, n, Lk] probability block, alpha'_qj = c_{g(j)} alpha_qj.

    Memory-bound like a fused kernel at n <= MATH_MAX_ROWS, one pass over K and V, no per-group gathers.
    """
    hq = q_sel.shape[1]
    k = _repeat_kv(key, hq // key.shape[1]).float()
    v = _repeat_kv(value, hq // value.shape[1]).float()
    scores = torch.matmul(q_sel.float(), k.transpose(-1, -2)) * scale
    if m_sel is not None:
        scores = scores.masked_fill(~m_sel, float("-inf"))
    probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # rows without an allowed key -> 0
    onehot = torch.nn.functional.one_hot(lab, n_groups + 1).to(probs.dtype)  # [B, Lk, G+1]
    masses = torch.matmul(probs, onehot[:, None])  # [B, H, n, G+1]
    c = _coefficients(coefficients, masses)
    if valid is not None:
        c = torch.where(valid[:, None, :, None], c, torch.ones((), dtype=c.dtype, device=c.device))
    c = torch.where(masses > 0, c, torch.ones((), dtype=c.dtype, device=c.device))
    per_key = torch.gather(c, 3, lab[:, None, None, :].expand(*c.shape[:3], lab.shape[1]))
    edited = probs * per_key
    if renormalize:
        total = edited.sum(-1, keepdim=True)
        edited = edited / torch.where(total > 0, total, torch.ones_like(total))
    return torch.matmul(edited, v).to(q_sel.dtype)


def _merged_reweight(
    q_sel: Tensor,
    key: Tensor,
    value: Tensor,
    m_sel: Tensor | None,
    lab: Tensor,
    n_groups: int,
    scale: float,
    coefficients: Coefficients,
    valid: Tensor | None,
    renormalize: bool,
    o_all: Tensor,
    lse_all: Tensor | None = None,
) -> Tensor:
    """Many edited rows (prefill): per-group fused passes merged by log-sum-exp; no probability tensor."""
    b, hq = q_sel.shape[0], q_sel.shape[1]
    dtype = q_sel.dtype
    if lse_all is None:
        lse_all = attention_with_lse(q_sel, key, value, m_sel, scale)[1]
    # --- named groups: masses and outputs -------------------------------------------------------------
    row_ok = torch.isfinite(lse_all)  # rows with at least one allowed key
    lse_ref = torch.where(row_ok, lse_all, torch.zeros_like(lse_all))
    shape = (b, hq, q_sel.shape[2])
    masses = torch.zeros(*shape, n_groups + 1, dtype=torch.float32, device=q_sel.device)
    outs: dict[int, Tensor] = {}
    for g in range(1, n_groups + 1):
        res = _group_pass(q_sel, key, value, m_sel, lab, g, scale)
        if res is None:
            continue
        out_g, lse_g = res
        outs[g] = out_g
        masses[..., g] = torch.where(row_ok, torch.exp(lse_g - lse_ref), torch.zeros_like(lse_g))
    rest = (1.0 - masses[..., 1:].sum(-1)).clamp_(min=0.0)
    masses[..., 0] = torch.where(row_ok, rest, torch.zeros_like(rest))

    c = _coefficients(coefficients, masses)
    if valid is not None:  # padding slots of the gather: leave untouched
        c = torch.where(valid[:, None, :, None], c, torch.ones((), dtype=c.dtype, device=c.device))
    w = (c - 1.0) * masses  # [B, Hq, n, G+1]

    acc = o_all.float()
    for g, out_g in outs.items():
        acc = acc + w[..., g : g + 1] * out_g.float()
    if bool((c[..., 0] != 1.0).any()):
        res = _group_pass(q_sel, key, value, m_sel, lab, 0, scale)
        if res is not None:
            acc = acc + w[..., 0:1] * res[0].float()
    if renormalize:
        total = (c * masses).sum(-1, keepdim=True)
        acc = acc / torch.where(total > 0, total, torch.ones_like(total))
    return acc.to(dtype)


# --------------------------------------------------------------------------------------------------
# explicit scores for a few rows (ScoreEdit)


def explicit_score_attention(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    mask: Tensor | None,
    scale: float,
    rows: Tensor,
    keys: Tensor,
    fn: Callable[[Tensor], Tensor],
    base: Tensor | Callable[[], Tensor],
) -> Tensor:
    """Attention where the scores of the selected keys are ``fn(a)`` for the selected rows (fused form).

    For an edited row, with T the other allowed keys and I the selected ones:
    ``o_T, lse_T`` = fused attention over T; ``lse_I = logsumexp(a'_I)``, ``o_I = softmax(a'_I) V_I`` (explicit,
    fp32); ``o = (e^{lse_T} o_T + e^{lse_I} o_I) / (e^{lse_T} + e^{lse_I})`` (via ``logaddexp``). With at most
    ``MATH_MAX_ROWS`` edited rows per batch row the same output comes from one explicit score row over every key
    (GQA by reshaping the query, K/V never repeated), ``fn`` written into its selected columns, softmax, ·V (as
    the math path of :func:`attention_with_lse` would compute it anyway). Other rows are ``base`` [B, H, Lq, D]
    (the unedited output, or the function that computes it: not called when every row is edited) unchanged.
    ``rows`` bool [B, Lq], ``keys`` bool [B, Lk], ``mask`` as in :func:`attention_with_lse` (None = every key
    allowed), ``fn`` maps [B, H, R, K] fp32 scores to the same shape. Returns [B, H, Lq, D].
    """
    b, hq, hkv, lq, lk = _check_shapes(query, key, value)
    rows = rows.to(query.device).bool()
    if not bool(rows.any()):
        return base() if callable(base) else base
    keys = keys.to(query.device).bool()[:, :lk]
    if keys.shape[1] < lk:
        keys = torch.cat([keys, keys.new_zeros(b, lk - keys.shape[1])], dim=1)
    row_index, row_valid = _selection(rows)
    key_index, key_valid = _selection(keys)
    if row_index.shape[1] <= MATH_MAX_ROWS:
        merged = _explicit_rows(query, key, value, mask, scale, row_index, row_valid, key_index, key_valid, fn)
    else:
        merged = _merged_rows(query, key, value, mask, scale, keys, row_index, row_valid, key_index, key_valid, fn)
    if callable(base):
        base = query.new_zeros(b, hq, lq, value.shape[-1]) if bool(rows.all()) else base()
    out = base.clone()
    bi, ri = row_valid.nonzero(as_tuple=True)
    out[bi, :, row_index[bi, ri]] = merged[bi, :, ri].to(out.dtype)
    return out


def _row_mask(mask: Tensor | None, b: int, hq: int, lq: int, lk: int, row_index: Tensor) -> Tensor | None:
    """The mask of the selected rows, [B, 1|H, R, Lk]."""
    if mask is None:
        return None
    m = _as_4d_mask(mask.to(row_index.device), b, hq, lq, lk)
    m = m.expand(b, m.shape[1], lq, lk)
    return torch.gather(m, 2, row_index[:, None, :, None].expand(b, m.shape[1], row_index.shape[1], lk))


def _explicit_rows(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    mask: Tensor | None,
    scale: float,
    row_index: Tensor,
    row_valid: Tensor,
    key_index: Tensor,
    key_valid: Tensor,
    fn: Callable[[Tensor], Tensor],
) -> Tensor:
    """Few rows: the whole score row explicit (fp32), the selected columns replaced by ``fn``, softmax, ·V."""
    b, hq, lq, d = query.shape
    hkv, lk = key.shape[1], key.shape[2]
    r, n = hq // hkv, row_index.shape[1]
    q = torch.gather(query, 2, row_index[:, None, :, None].expand(b, hq, n, d)).float()
    scores = torch.matmul(q.reshape(b, hkv, r, n, d), key.float()[:, :, None].transpose(-1, -2)) * scale
    scores = scores.reshape(b, hq, n, lk)
    allowed = row_valid[:, None, :, None].expand(b, 1, n, lk)
    m = _row_mask(mask, b, hq, lq, lk, row_index)
    if m is not None:
        allowed = allowed & m
    allowed = allowed.expand(b, hq, n, lk)
    scores = scores.masked_fill(~allowed, float("-inf"))
    # padded key slots point at the row's first selected key and carry its value (a deterministic scatter)
    index = torch.where(key_valid, key_index, key_index[:, :1])[:, None, None, :].expand(b, hq, n, -1)
    a = scores.gather(-1, index)
    ok = allowed.gather(-1, index) & key_valid[:, None, None, :]
    edited = fn(torch.where(ok, a, torch.zeros_like(a))).float()
    if edited.shape != a.shape:
        raise ValueError(f"a score function returned shape {tuple(edited.shape)} for scores {tuple(a.shape)}")
    edited = torch.where(ok, edited, torch.full_like(edited, float("-inf")))
    edited = torch.where(key_valid[:, None, None, :], edited, edited[..., :1])
    scores = scores.scatter(-1, index, edited)
    probs = torch.nan_to_num(torch.softmax(scores, dim=-1), nan=0.0)
    out = torch.matmul(probs.reshape(b, hkv, r, n, lk), value.float()[:, :, None])
    return out.reshape(b, hq, n, -1)


def _merged_rows(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    mask: Tensor | None,
    scale: float,
    keys: Tensor,
    row_index: Tensor,
    row_valid: Tensor,
    key_index: Tensor,
    key_valid: Tensor,
    fn: Callable[[Tensor], Tensor],
) -> Tensor:
    """Many rows: the fused kernel over the other keys, the selected block explicit, merged by log-sum-exp."""
    b, hq, lq, _ = query.shape
    lk = key.shape[2]
    scores, _ = explicit_scores(query, key, mask, scale, row_index, row_valid, key_index, key_valid, fn)
    lse_i = torch.logsumexp(scores, dim=-1)  # [B, H, R]
    finite = torch.isfinite(lse_i)
    probs = torch.exp(scores - torch.where(finite, lse_i, torch.zeros_like(lse_i))[..., None])
    o_i = torch.matmul(probs, _gather_keys(value, key_index, hq).float())  # [B, H, R, D]
    q_sel = torch.gather(query, 2, row_index[:, None, :, None].expand(b, hq, row_index.shape[1], query.shape[-1]))
    other = ~keys[:, None, None, :]
    m = _row_mask(mask, b, hq, lq, lk, row_index)
    if m is not None:
        other = other & m
    o_t, lse_t = attention_with_lse(q_sel, key, value, other, scale)
    lse = torch.logaddexp(lse_t, lse_i)
    safe = torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))
    w_t = torch.where(torch.isfinite(lse_t), torch.exp(lse_t - safe), torch.zeros_like(lse_t))
    w_i = torch.where(finite, torch.exp(lse_i - safe), torch.zeros_like(lse_i))
    return w_t[..., None] * o_t.float() + w_i[..., None] * o_i
