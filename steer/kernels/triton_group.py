"""Single-pass Triton attention with per-key group labels (the fast GPU path of key-group reweighting).

For one query row q (of sample b, head h) and keys j with scaled scores ``s_j = scale · q·k_j + bias_qj``
(masked keys: ``s_j = −∞``) the kernel streams over the keys once, with online softmax (running max M):

    L   = Σ_j e^{s_j − M}                 A   = Σ_j e^{s_j − M} v_j          (plain attention: o = A / L)
    L_k = Σ_{j ∈ S_k} e^{s_j − M}         A_k = Σ_{j ∈ S_k} e^{s_j − M} v_j  (one per accumulator slot k)

(every term rescaled by ``e^{M_old − M_new}`` when the running max grows). The slots S_k are sets of key
groups that share one coefficient, so the group masses are ``m_{S_k} = L_k / L`` (= ``exp(lse_k − lse)``,
as on the LSE-merge path) and the reweighted output ``o' = Σ_g c_g m_g out_g`` is, in the epilogue,

    o' = (c_0 A + Σ_k (c_k − c_0) A_k) / L           ÷ (c_0 + Σ_k (c_k − c_0) m_k)   when renormalising,

with the coefficients computed in-kernel from the masses by a registered rule's epilogue
(`steer.kernels.rules`):

* ``"constant"``: ``c = (c_0, …, c_G)`` for every edited row (``GroupReweight(coefficients=[...])``). Groups
  whose coefficient equals ``c_0`` are folded into the background, so only the others get a slot (G ≤ 4).
* ``"gated_transfer"`` (VAR registers its rule on it, ``specs/var.md`` steps 5–6): with the masses of the
  groups (a, b, r) = ``rule.groups``, ``V = m_a + m_r``, a row is selected iff it is edited, its sample's
  ``gate`` is set, ``V ≥ min_mass``, ``m_a / (V + n·1e-6) ≤ 1 − rho`` and ``m_r > 0``; then
  ``c_a = c_b = keep``, ``c_r = 1 + Ω / m_r`` with ``Ω = (1 − keep)(m_a + m_b)``, others 1; otherwise c = 1.
  Two slots (a ∪ b, r) plus one mass-only sum (a).

Arbitrary Python coefficient callables stay on the LSE-merge path (:mod:`steer.kernels.lse`); the
dispatcher (:func:`steer.kernels.dispatch.reweighted_attention`) picks this kernel on CUDA when the edit
carries a rule. Rows with no allowed key give exact zeros (never NaN). Masks: a boolean ``mask`` (True =
attend; CCA, Detector Guidance), an additive float ``bias``, ``causal`` (bottom-right aligned: key j is
allowed for query i iff ``j ≤ i + Lk − Lq``, as for a KV cache), each broadcastable to [B, Hq, Lq, Lk].
A per-head output scale (VHR) multiplies ``o'`` last: ``o'_{b,h} ← s_{b,h} · o'_{b,h}``.

Layout: GQA is packed into the row dimension of a program (the ``Hq/Hkv`` query heads of one KV head
share every K/V tile), so a decode step (Lq = 1) still fills a tile. Long KV caches with few rows are
split over ``num_splits`` key ranges (flash-decoding): each split writes its partial ``(M, L, L_k, A,
A_k)`` and a second kernel merges them (``w_s = e^{M_s − max_s M_s}``) before the same epilogue.
Sparse edits: with ``rows`` and ``base_out`` only the edited rows are computed (gathered per sample) and
written into a copy of ``base_out``. ``base_out`` is the caller's plain output ``o = A / L`` (steer's
attention function has it already), so the kernel does not accumulate ``A`` but uses ``A = L · o``:

    o' = c_0 o + Σ_k (c_k − c_0) A_k / L                (÷ the same total when renormalising),

the form the LSE-merge path uses too. A slot's ``P·V`` product is skipped on key tiles that hold none of
its keys, so for VAR (a few sink keys, one contiguous image span) most tiles cost only the ``Q·Kᵀ``
product and the softmax sums (GPU timings: ``benchmarks/group_kernels.py``, not yet measured).

This module never imports Triton itself (:data:`HAVE_TRITON` says whether it is installed); the kernels
(:mod:`steer.kernels._triton_group_kernels`) load on the first call. Under ``TRITON_INTERPRET=1`` (CPU
tests) set the variable before that first call. The interpreter of Triton 3.x multiplies bf16
operands of ``tl.dot`` as their uint16 bit patterns, so when interpreting, bf16 dot operands are cast to
fp32 (after rounding P to bf16); compiled GPU kernels use the native bf16 dot.
"""

from __future__ import annotations

import importlib.util
import os

import torch
from torch import Tensor

from steer.kernels.rules import CoefficientRule

__all__ = [
    "HAVE_TRITON",
    "MAX_SLOTS",
    "CoefficientRule",
    "interpreting",
    "supports",
    "tiles",
    "triton_group_attention",
]

#: whether triton is importable (the `kernels` extra); the kernels themselves load on first use.
HAVE_TRITON = importlib.util.find_spec("triton") is not None

_RULE_NONE, _RULE_CONSTANT, _RULE_TRANSFER = 0, 1, 2

#: at most this many accumulator slots (groups with a coefficient other than c_0) per kernel.
MAX_SLOTS = 4

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_LOG2E = 1.4426950408889634


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


# --------------------------------------------------------------------------------------------------
# the Python entry point


def _expand4(t: Tensor, b: int, hq: int, lq: int, lk: int, name: str) -> Tensor:
    """View ``t`` (≤ 4-D, broadcastable to [B, Hq, Lq, Lk]) as 4-D with broadcast dims at stride 0."""
    if t.dim() > 4:
        raise ValueError(f"{name} has {t.dim()} dims, expected at most 4")
    t4 = t.reshape((1,) * (4 - t.dim()) + tuple(t.shape))
    for have, full, dim in zip(t4.shape, (b, hq, lq, lk), ("B", "H", "Lq", "Lk")):
        if have not in (1, full):
            raise ValueError(f"{name} shape {tuple(t.shape)} does not broadcast to [B, Hq, Lq, Lk] ({dim})")
    return t4.expand(b, hq, lq, lk)


def _labels2d(labels: Tensor, b: int, lk: int) -> Tensor:
    if labels.dim() == 1:
        labels = labels[None]
    if labels.dim() != 2 or labels.shape[0] not in (1, b) or labels.shape[1] > lk:
        raise ValueError(f"labels must be [B, <=Lk] = [{b}, {lk}], got {tuple(labels.shape)}")
    if labels.shape[1] < lk:
        labels = torch.nn.functional.pad(labels, (0, lk - labels.shape[1]), value=0)
    return labels.expand(b, lk)


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def _sm_count(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 8


def tiles(dtype: torch.dtype, rows_per_bh: int, block_d: int, live: int) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps) for the forward kernel.

    ``rows_per_bh``: query rows per (sample, KV head) = edited rows × Hq/Hkv; ``live``: fp32 [BLOCK_M, BLOCK_D]
    accumulators the kernel keeps. Chosen from sm_90 compiles without spills (``benchmarks/compile_check.py``
    prints registers and spills); not yet timed on a GPU.
    """
    if dtype == torch.float32:  # the exact (ieee) fp32 dot is register-hungry: small tiles
        return 16, 32, 8
    block_m = 16 if rows_per_bh <= 16 else 32 if rows_per_bh <= 32 or live >= 3 or block_d > 128 else 64
    block_n = 32 if block_d > 128 else 64
    return block_m, block_n, 8 if block_m * block_d * live > 4096 else 4


def supports(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    rule: CoefficientRule | None,
    *,
    mask: Tensor | None = None,
) -> str | None:
    """None when :func:`triton_group_attention` can run these arguments, else the reason it cannot."""
    if not HAVE_TRITON:
        return "triton is not installed (pip install 'steer-toolkit[kernels]')"
    if query.device.type != "cuda" and not interpreting():
        return f"tensors are on {query.device.type}; the Triton kernel needs CUDA (or TRITON_INTERPRET=1)"
    if query.dtype not in _DTYPES or key.dtype != query.dtype or value.dtype != query.dtype:
        return f"dtype {query.dtype}/{key.dtype}/{value.dtype} (supported: fp16, bf16, fp32, all equal)"
    if query.dim() != 4 or key.dim() != 4 or value.dim() != 4:
        return "query/key/value must be 4-D"
    d = query.shape[-1]
    if key.shape[-1] != d or value.shape[-1] != d or d > 256:
        return f"head dims q {d}, k {key.shape[-1]}, v {value.shape[-1]} (need equal, <= 256)"
    if key.shape[1] == 0 or query.shape[1] % key.shape[1] != 0:
        return "query heads must be a multiple of key/value heads"
    if mask is not None and mask.dtype != torch.bool:
        return f"mask must be bool, got {mask.dtype}"
    if rule is not None and rule.epilogue is None:
        return f"the coefficient rule {rule.kind!r} has no kernel epilogue (it runs on the LSE-merge path)"
    if rule is not None and rule.epilogue == "constant":
        c0 = rule.values[0]
        if sum(1 for c in rule.values[1:] if c != c0) > MAX_SLOTS:
            return f"more than {MAX_SLOTS} groups with a coefficient other than c_0"
    return None


def triton_group_attention(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    labels: Tensor | None,
    *,
    scale: float,
    rule: CoefficientRule | None = None,
    mask: Tensor | None = None,
    bias: Tensor | None = None,
    causal: bool = False,
    rows: Tensor | None = None,
    head_scale: Tensor | float | None = None,
    renormalize: bool = False,
    base_out: Tensor | None = None,
    return_selected: bool = False,
    num_splits: int | None = None,
    block_m: int | None = None,
    block_n: int | None = None,
    num_warps: int | None = None,
) -> Tensor | tuple[Tensor, Tensor]:
    """Attention with key-group reweighting in one pass: ``o' = Σ_g c_g m_g out_g`` (module docstring).

    Shapes: ``query`` [B, Hq, Lq, D]; ``key``/``value`` [B, Hkv, Lk, D] (GQA: Hq % Hkv == 0, never repeated);
    ``labels`` [B, ≤Lk] ints ≥ 0 (shorter rows padded with 0; None = all 0); ``mask`` bool and ``bias`` float
    (natural-log units, added to the scaled scores) broadcastable to [B, Hq, Lq, Lk]; ``causal``: key j is
    allowed for query i iff j ≤ i + Lk − Lq. ``rows`` bool [B, Lq]: the rows the rule applies to (None = all);
    every other row is plain attention, or, when ``base_out`` [B, Hq, Lq, D] is given, a copy of it — then
    only the edited rows are computed, and from ``base_out``, which must be the plain attention output of
    these arguments. ``head_scale``: a number, [Hq] or [B, Hq], multiplies each head's output (the rows
    copied from ``base_out`` too). ``rule=None``: plain attention (masks and head scale only);
    ``renormalize``: divide by ``Σ_g c_g m_g``. fp16/bf16/fp32 in, same dtype out; sums and coefficients fp32.

    Returns ``out`` [B, Hq, Lq, D], or ``(out, selected)`` with ``return_selected``: bool [B, Hq, Lq], the
    rows the rule edited (VAR: its row test; constant: the edited rows). ``num_splits`` (default: from the
    shape and the SM count), ``block_m``, ``block_n``, ``num_warps`` (default: :func:`tiles`): tuning and tests.
    """
    if not HAVE_TRITON:
        raise RuntimeError("triton_group_attention needs triton (pip install 'steer-toolkit[kernels]')")
    reason = supports(query, key, value, rule, mask=mask)
    if reason is not None:
        raise ValueError(f"triton_group_attention: {reason}")
    b, hq, lq, d = query.shape
    hkv, lk = key.shape[1], key.shape[2]
    if key.shape[0] != b or value.shape[:3] != key.shape[:3]:
        raise ValueError(
            f"key {tuple(key.shape)} / value {tuple(value.shape)} do not match query {tuple(query.shape)}"
        )
    rep = hq // hkv
    dev, dtype = query.device, query.dtype

    # --- rule -> constexprs and per-call tensors ---------------------------------------------------------
    rule_id, nacc, g_sv, g_st, g_nv = _RULE_NONE, 0, 1, 2, 3
    coef = torch.ones(MAX_SLOTS + 1, dtype=torch.float32, device=dev)
    nvis = torch.zeros(b, dtype=torch.float32, device=dev)
    p_coef, one_minus_rho, min_vis = 1.0, 1.0, 0.0
    lab = None
    sample_ok = None
    if rule is not None:
        if labels is None:
            labels = torch.zeros(b, lk, dtype=torch.long, device=dev)
        lab = _labels2d(labels.to(dev), b, lk)
        if rule.epilogue == "constant":
            rule_id = _RULE_CONSTANT
            c0 = rule.values[0]
            kept = [g for g in range(1, len(rule.values)) if rule.values[g] != c0]
            nacc = len(kept)
            lut = torch.zeros(
                max(len(rule.values), int(lab.max()) + 1 if lab.numel() else 1), dtype=torch.int32
            )
            if lab.numel() and int(lab.min()) < 0:
                raise ValueError("labels must be >= 0 (0 = background)")
            if lut.numel() > len(rule.values):
                raise ValueError(
                    f"labels use group {lut.numel() - 1} but the rule has {len(rule.values)} coefficients"
                )
            for slot, g in enumerate(kept, start=1):
                lut[g] = slot
            lab = lut.to(dev)[lab.long()]
            coef[0] = c0
            for slot, g in enumerate(kept, start=1):
                coef[slot] = rule.values[g]
        elif rule.epilogue == "gated_transfer":
            rule_id, nacc = _RULE_TRANSFER, 2
            g_sv, g_st, g_nv = rule.groups
            lab = lab.to(torch.int32)
            nvis = torch.as_tensor(rule.per_sample.get("n_tokens", 0.0), dtype=torch.float32, device=dev)
            nvis = nvis.expand(b).contiguous()
            p_coef = float(rule.params["keep"])
            one_minus_rho = float(torch.tensor(1.0 - rule.params["rho"], dtype=torch.float32))
            min_vis = float(torch.tensor(rule.params["min_mass"], dtype=torch.float32))
            gate = rule.per_sample.get("gate")
            if gate is not None:
                sample_ok = gate.to(dev).bool().reshape(-1).expand(b)
        else:
            raise ValueError(f"the coefficient rule {rule.kind!r} has no kernel epilogue")
        if nacc == 0:
            rule_id = _RULE_CONSTANT  # c_0 only: still a constant (matters with renormalize: c_0 / c_0)
        lab = lab.to(torch.int32).contiguous()

    # --- rows: all, flagged, or gathered (sparse edits into base_out) ------------------------------------
    sel_rows = None
    if rows is not None:
        if rows.dtype != torch.bool:
            raise TypeError(f"rows must be bool [B, Lq], got {rows.dtype}")
        sel_rows = rows.to(dev).reshape(-1, lq) if rows.dim() == 1 else rows.to(dev)
        if sel_rows.shape[0] not in (1, b) or sel_rows.shape[1] != lq:
            raise ValueError(f"rows must be [B, Lq] = [{b}, {lq}], got {tuple(rows.shape)}")
        sel_rows = sel_rows.expand(b, lq)
    if sample_ok is not None:
        sel_rows = sample_ok[:, None].expand(b, lq) if sel_rows is None else sel_rows & sample_ok[:, None]

    hs = None
    if head_scale is not None:
        hs = torch.as_tensor(head_scale, dtype=torch.float32, device=dev)
        hs = hs.reshape(1, 1).expand(b, hq) if hs.dim() == 0 else hs.reshape(-1, hq).expand(b, hq)

    if base_out is not None:
        base_out = base_out.to(dev)
        if base_out.shape != (b, hq, lq, d):
            raise ValueError(
                f"base_out must be [B, Hq, Lq, D] = {(b, hq, lq, d)}, got {tuple(base_out.shape)}"
            )
        out = (
            base_out.to(dtype).clone() if hs is None else (base_out.float() * hs[:, :, None, None]).to(dtype)
        )
    else:
        out = torch.empty(b, hq, lq, d, dtype=dtype, device=dev)
    selected = torch.zeros(b, hq, lq, dtype=torch.int8, device=dev) if return_selected else None

    idx = edit = None
    n_slots = lq
    if sel_rows is not None and base_out is not None:
        counts = sel_rows.sum(1)
        n_slots = int(counts.max()) if b else 0
        if n_slots == 0:
            return (out, selected.bool()) if selected is not None else out
        order = torch.sort((~sel_rows).to(torch.uint8), dim=1, stable=True).indices[:, :n_slots]
        valid = torch.arange(n_slots, device=dev)[None, :] < counts[:, None]
        idx = torch.where(valid, order, torch.full_like(order, -1)).to(torch.int32).contiguous()
    elif sel_rows is not None:
        edit = sel_rows.to(torch.int8).contiguous()
    if b == 0 or hq == 0 or lq == 0 or d == 0:
        return (out, selected.bool()) if selected is not None else out

    # --- masks --------------------------------------------------------------------------------------------
    m4 = None
    if mask is not None:
        m4 = _expand4(mask.to(dev), b, hq, lq, lk, "mask").view(torch.uint8)
    b4 = None
    if bias is not None:
        if not bias.is_floating_point():
            raise TypeError(f"bias must be a float tensor (use mask= for booleans), got {bias.dtype}")
        b4 = _expand4(bias.to(dev), b, hq, lq, lk, "bias")

    # --- launch -------------------------------------------------------------------------------------------
    block_d = max(16, _next_pow2(d))
    rows_per_bh = n_slots * rep
    live = nacc + (0 if base_out is not None else 1)  # fp32 [BLOCK_M, BLOCK_D] accumulators in registers
    tile_m, tile_n, default_warps = tiles(dtype, rows_per_bh, block_d, live)
    if interpreting():  # numpy runs a whole tile at once: fewer, larger programs (tests on CPU)
        tile_m, tile_n = max(tile_m, min(64, _next_pow2(rows_per_bh))), 32
    block_m = block_m or tile_m
    block_n = block_n or tile_n
    num_warps = num_warps or default_warps
    grid_m = _cdiv(rows_per_bh, block_m)
    n_blocks = _cdiv(lk, block_n)
    if num_splits is None:
        programs = grid_m * b * hkv
        target = 2 * _sm_count(dev)
        num_splits = 1
        if programs < target and n_blocks >= 8:
            num_splits = min(_cdiv(target, programs), n_blocks // 4, 64)
    num_splits = max(1, min(int(num_splits), max(n_blocks, 1)))
    chunk = max(1, _cdiv(n_blocks, num_splits)) * block_n
    num_splits = max(1, _cdiv(lk, chunk))
    split = num_splits > 1
    n_rows = b * hq * n_slots

    dummy = torch.zeros(1, dtype=torch.float32, device=dev)
    dummy_i = torch.zeros(1, dtype=torch.int32, device=dev)
    if split:
        pacc = torch.empty(num_splits, n_rows, nacc + 1, block_d, dtype=torch.float32, device=dev)
        pl = torch.empty(num_splits, n_rows, 6, dtype=torch.float32, device=dev)
        pm = torch.empty(num_splits, n_rows, dtype=torch.float32, device=dev)
    else:
        pacc = pl = pm = dummy
    base_ptr = base_out if base_out is not None else dummy
    base_strides = base_out.stride() if base_out is not None else (0, 0, 0, 0)
    ist = idx.stride() if idx is not None else (edit.stride() if edit is not None else (0, 0))
    flags = dict(
        RULE=rule_id,
        NACC=nacc,
        HAS_INDEX=idx is not None,
        HAS_EDIT=edit is not None,
        HAS_HS=hs is not None,
        RENORM=bool(renormalize),
        WRITE_SEL=selected is not None,
        BASE_ACC=base_out is not None,
    )
    upcast = interpreting() and dtype == torch.bfloat16
    scalars = (p_coef, one_minus_rho, min_vis)
    from steer.kernels import _triton_group_kernels as kernels

    kernels.group_attn_fwd[(grid_m, b * hkv, num_splits)](
        query, key, value,
        lab if lab is not None else dummy_i,
        m4 if m4 is not None else dummy_i,
        b4 if b4 is not None else dummy,
        idx if idx is not None else dummy_i,
        edit if edit is not None else dummy_i,
        hs if hs is not None else dummy,
        nvis, coef, out,
        selected if selected is not None else dummy_i,
        pacc, pl, pm, base_ptr,
        *query.stride(), *key.stride(), *value.stride(),
        *(lab.stride() if lab is not None else (0, 0)),
        *(m4.stride() if m4 is not None else (0, 0, 0, 0)),
        *(b4.stride() if b4 is not None else (0, 0, 0, 0)),
        *ist,
        *(hs.stride() if hs is not None else (0, 0)),
        *out.stride(),
        *base_strides,
        hkv, lq, lk, n_slots, chunk, n_rows,
        scale * _LOG2E, *scalars,
        REP=rep, D=d, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d,
        G_SV=g_sv, G_ST=g_st, G_NV=g_nv,
        CAUSAL=bool(causal), HAS_MASK=m4 is not None, HAS_BIAS=b4 is not None,
        SPLIT=split, IEEE=dtype == torch.float32, UPCAST=upcast,
        num_warps=num_warps,
        **flags,
    )  # fmt: skip
    if split:
        block_r = 16
        kernels.group_attn_combine[(_cdiv(n_rows, block_r),)](
            pacc, pl, pm,
            idx if idx is not None else dummy_i,
            edit if edit is not None else dummy_i,
            hs if hs is not None else dummy,
            nvis, coef, out,
            selected if selected is not None else dummy_i,
            base_ptr,
            *ist,
            *(hs.stride() if hs is not None else (0, 0)),
            *out.stride(),
            *base_strides,
            hq, lq, n_slots, n_rows, num_splits,
            *scalars,
            D=d, BLOCK_R=block_r, BLOCK_D=block_d,
            num_warps=4,
            **flags,
        )  # fmt: skip
    if selected is not None:
        return out, selected.bool()
    return out
