"""The @triton.jit kernels of :mod:`steer.kernels.triton_group` (imported on first use; needs triton).

Kept apart so that ``import steer`` never imports triton, and so that ``TRITON_INTERPRET`` (read when a
kernel is decorated) can still be set after ``steer`` is imported. Math and layout: see
:mod:`steer.kernels.triton_group`.
"""

import triton
import triton.language as tl

__all__ = ["group_attn_combine", "group_attn_fwd"]


@triton.jit
def _mma(a, b, IEEE: tl.constexpr, UPCAST: tl.constexpr):
    """a @ b with fp32 accumulation; IEEE: exact fp32 products (no tf32); UPCAST: interpreter bf16 fix."""
    if UPCAST:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    if IEEE:
        r = tl.dot(a, b, input_precision="ieee")
    else:
        r = tl.dot(a, b)
    return r


@triton.jit
def _epilogue(
    acc, acc1, acc2, acc3, acc4, l_all, l1, l2, l3, l4, lx, edit, nvis,
    COEF, p_coef, one_minus_rho, min_vis,
    RULE: tl.constexpr, NACC: tl.constexpr, RENORM: tl.constexpr,
):  # fmt: skip
    """(o' [M, D] fp32, selected [M] bool) from the unnormalised sums; see the module docstring."""
    has = l_all > 0.0
    inv = tl.where(has, 1.0 / tl.where(has, l_all, 1.0), 0.0)
    total = tl.full(l_all.shape, 1.0, tl.float32)  # Σ_g c_g m_g
    sel = edit
    o = acc
    if RULE == 1:
        one = tl.full(l_all.shape, 1.0, tl.float32)
        c0 = tl.where(edit, tl.load(COEF), one)
        o = acc * c0[:, None]
        total = c0
        if NACC >= 1:
            d1 = tl.where(edit, tl.load(COEF + 1), one) - c0
            o += d1[:, None] * acc1
            total += d1 * (l1 * inv)
        if NACC >= 2:
            d2 = tl.where(edit, tl.load(COEF + 2), one) - c0
            o += d2[:, None] * acc2
            total += d2 * (l2 * inv)
        if NACC >= 3:
            d3 = tl.where(edit, tl.load(COEF + 3), one) - c0
            o += d3[:, None] * acc3
            total += d3 * (l3 * inv)
        if NACC >= 4:
            d4 = tl.where(edit, tl.load(COEF + 4), one) - c0
            o += d4[:, None] * acc4
            total += d4 * (l4 * inv)
    if RULE == 2:
        m_sink = l1 * inv  # m_Sv + m_St
        m_nv = l2 * inv
        m_sv = lx * inv
        visual = m_sv + m_nv
        den = visual + nvis * 1e-6
        share = m_sv / tl.where(den > 0.0, den, 1.0)  # den = 0: no visual mass, never selected
        sel = edit & (visual >= min_vis) & (share <= one_minus_rho) & (m_nv > 0.0)
        omega = (1.0 - p_coef) * m_sink
        w_nv = tl.where(sel, omega / tl.where(m_nv > 0.0, m_nv, 1.0), 0.0)  # c_Nv − 1
        w_sink = tl.where(sel, p_coef - 1.0, 0.0)  # c_Sv − 1 = c_St − 1
        o = acc + w_sink[:, None] * acc1 + w_nv[:, None] * acc2
        total = 1.0 + w_sink * m_sink + w_nv * m_nv
    o = o * inv[:, None]
    if RENORM:
        o = o / tl.where(total > 0.0, total, 1.0)[:, None]
    return o, sel


@triton.jit
def group_attn_fwd(
    Q, K, V, LAB, MASK, BIAS, IDX, EDIT, HS, NVIS, COEF, OUT, SEL, PACC, PL, PM, BASE,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_lb, stride_ln,
    stride_mb, stride_mh, stride_mm, stride_mn,
    stride_bb, stride_bh, stride_bm, stride_bn,
    stride_ib, stride_is,
    stride_hb, stride_hh,
    stride_ob, stride_oh, stride_om, stride_od,
    stride_xb, stride_xh, stride_xm, stride_xd,
    Hkv, Lq, Lk, n_slots, chunk, R,
    qk_scale, p_coef, one_minus_rho, min_vis,
    REP: tl.constexpr, D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    RULE: tl.constexpr, NACC: tl.constexpr,
    G_SV: tl.constexpr, G_ST: tl.constexpr, G_NV: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr, HAS_BIAS: tl.constexpr,
    HAS_INDEX: tl.constexpr, HAS_EDIT: tl.constexpr, HAS_HS: tl.constexpr,
    RENORM: tl.constexpr, WRITE_SEL: tl.constexpr, SPLIT: tl.constexpr, BASE_ACC: tl.constexpr,
    IEEE: tl.constexpr, UPCAST: tl.constexpr,
):  # fmt: skip
    """One program: BLOCK_M rows (slot, query head of one KV head) × one key range (all keys, or a split).

    BASE_ACC: the caller's plain output o = A / L is given (BASE), so A is not accumulated: A = L · o.
    A slot's P·V product is skipped on key tiles that hold none of its keys (sinks and image spans are
    sparse/contiguous), only the rescale by the running max remains.
    """
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    pid_s = tl.program_id(2)
    b = pid_bh // Hkv
    hkv = pid_bh % Hkv
    Hq = Hkv * REP

    r = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    slot = r // REP
    hq = hkv * REP + r % REP
    row_in = slot < n_slots
    if HAS_INDEX:
        qpos = tl.load(IDX + b * stride_ib + slot * stride_is, mask=row_in, other=-1)
    else:
        qpos = tl.where(row_in, slot, -1)
    row_ok = qpos >= 0
    qc = tl.where(row_ok, qpos, 0)
    edit = row_ok
    if HAS_EDIT:
        flag = tl.load(EDIT + b * stride_ib + slot * stride_is, mask=row_in, other=0)
        edit = edit & (flag != 0)

    d = tl.arange(0, BLOCK_D)
    d_ok = d < D
    q = tl.load(
        Q + b * stride_qb + hq[:, None] * stride_qh + qc[:, None] * stride_qm + d[None, :] * stride_qd,
        mask=row_ok[:, None] & d_ok[None, :],
        other=0.0,
    )

    # key range [start, end): causal rows never look past their last allowed key
    end = Lk
    if CAUSAL:
        q_last = tl.max(tl.where(row_ok, qc, -1), axis=0)
        end = tl.minimum(end, q_last + (Lk - Lq) + 1)
    start = 0
    if SPLIT:
        start = pid_s * chunk
        end = tl.minimum(end, start + chunk)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_all = tl.zeros([BLOCK_M], tl.float32)
    l1 = tl.zeros([BLOCK_M], tl.float32)
    l2 = tl.zeros([BLOCK_M], tl.float32)
    l3 = tl.zeros([BLOCK_M], tl.float32)
    l4 = tl.zeros([BLOCK_M], tl.float32)
    lx = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    acc1 = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    acc2 = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    acc3 = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    acc4 = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)

    k_base = K + b * stride_kb + hkv * stride_kh
    v_base = V + b * stride_vb + hkv * stride_vh
    for n0 in range(start, end, BLOCK_N):
        j = n0 + tl.arange(0, BLOCK_N)
        j_ok = j < end
        k = tl.load(
            k_base + j[None, :] * stride_kn + d[:, None] * stride_kd,
            mask=j_ok[None, :] & d_ok[:, None],
            other=0.0,
        )
        s = _mma(q, k, IEEE, UPCAST) * qk_scale  # log2 units
        allowed = j_ok[None, :] & row_ok[:, None]
        if CAUSAL:
            allowed = allowed & (j[None, :] <= qc[:, None] + (Lk - Lq))
        if HAS_MASK:
            mk = tl.load(
                MASK
                + b * stride_mb
                + hq[:, None] * stride_mh
                + qc[:, None] * stride_mm
                + j[None, :] * stride_mn,
                mask=allowed,
                other=0,
            )
            allowed = allowed & (mk != 0)
        if HAS_BIAS:
            bias = tl.load(
                BIAS
                + b * stride_bb
                + hq[:, None] * stride_bh
                + qc[:, None] * stride_bm
                + j[None, :] * stride_bn,
                mask=allowed,
                other=0.0,
            )
            s = s + bias.to(tl.float32) * 1.4426950408889634
        s = tl.where(allowed, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(s - m_safe[:, None])
        m_i = m_new

        v = tl.load(
            v_base + j[:, None] * stride_vn + d[None, :] * stride_vd,
            mask=j_ok[:, None] & d_ok[None, :],
            other=0.0,
        )
        l_all = l_all * alpha + tl.sum(p, axis=1)
        if not BASE_ACC:
            acc = acc * alpha[:, None] + _mma(p.to(v.dtype), v, IEEE, UPCAST)
        if NACC >= 1:
            lab = tl.load(LAB + b * stride_lb + j * stride_ln, mask=j_ok, other=0)
            if RULE == 2:
                in1 = (lab == G_SV) | (lab == G_ST)
            else:
                in1 = lab == 1
            p1 = tl.where(in1[None, :], p, 0.0)
            l1 = l1 * alpha + tl.sum(p1, axis=1)
            acc1 = acc1 * alpha[:, None]
            if tl.max(in1.to(tl.int32), axis=0) > 0:
                acc1 += _mma(p1.to(v.dtype), v, IEEE, UPCAST)
            if RULE == 2:
                lx = lx * alpha + tl.sum(tl.where((lab == G_SV)[None, :], p, 0.0), axis=1)
        if NACC >= 2:
            if RULE == 2:
                in2 = lab == G_NV
            else:
                in2 = lab == 2
            p2 = tl.where(in2[None, :], p, 0.0)
            l2 = l2 * alpha + tl.sum(p2, axis=1)
            acc2 = acc2 * alpha[:, None]
            if tl.max(in2.to(tl.int32), axis=0) > 0:
                acc2 += _mma(p2.to(v.dtype), v, IEEE, UPCAST)
        if NACC >= 3:
            in3 = lab == 3
            p3 = tl.where(in3[None, :], p, 0.0)
            l3 = l3 * alpha + tl.sum(p3, axis=1)
            acc3 = acc3 * alpha[:, None]
            if tl.max(in3.to(tl.int32), axis=0) > 0:
                acc3 += _mma(p3.to(v.dtype), v, IEEE, UPCAST)
        if NACC >= 4:
            in4 = lab == 4
            p4 = tl.where(in4[None, :], p, 0.0)
            l4 = l4 * alpha + tl.sum(p4, axis=1)
            acc4 = acc4 * alpha[:, None]
            if tl.max(in4.to(tl.int32), axis=0) > 0:
                acc4 += _mma(p4.to(v.dtype), v, IEEE, UPCAST)

    if SPLIT:
        # partial state of this key range: PM [S, R], PL [S, R, 6], PACC [S, R, NACC + 1, BLOCK_D]
        rid = (b * Hq + hq) * n_slots + slot
        row = pid_s * R + rid
        tl.store(PM + row, m_i, mask=row_ok)
        tl.store(PL + row * 6, l_all, mask=row_ok)
        tl.store(PL + row * 6 + 1, l1, mask=row_ok)
        tl.store(PL + row * 6 + 2, l2, mask=row_ok)
        tl.store(PL + row * 6 + 3, l3, mask=row_ok)
        tl.store(PL + row * 6 + 4, l4, mask=row_ok)
        tl.store(PL + row * 6 + 5, lx, mask=row_ok)
        pa = PACC + (row * (NACC + 1))[:, None] * BLOCK_D + d[None, :]
        if not BASE_ACC:
            tl.store(pa, acc, mask=row_ok[:, None])
        if NACC >= 1:
            tl.store(pa + BLOCK_D, acc1, mask=row_ok[:, None])
        if NACC >= 2:
            tl.store(pa + 2 * BLOCK_D, acc2, mask=row_ok[:, None])
        if NACC >= 3:
            tl.store(pa + 3 * BLOCK_D, acc3, mask=row_ok[:, None])
        if NACC >= 4:
            tl.store(pa + 4 * BLOCK_D, acc4, mask=row_ok[:, None])
    else:
        nvis = tl.zeros([BLOCK_M], tl.float32)
        if RULE == 2:
            nvis += tl.load(NVIS + b)
        if BASE_ACC:
            base = tl.load(
                BASE
                + b * stride_xb
                + hq[:, None] * stride_xh
                + qc[:, None] * stride_xm
                + d[None, :] * stride_xd,
                mask=row_ok[:, None] & d_ok[None, :],
                other=0.0,
            )
            acc = base.to(tl.float32) * l_all[:, None]
        o, sel = _epilogue(
            acc, acc1, acc2, acc3, acc4, l_all, l1, l2, l3, l4, lx, edit, nvis,
            COEF, p_coef, one_minus_rho, min_vis, RULE, NACC, RENORM,
        )  # fmt: skip
        if HAS_HS:
            hs = tl.load(HS + b * stride_hb + hq * stride_hh, mask=row_ok, other=1.0)
            o = o * hs[:, None]
        tl.store(
            OUT + b * stride_ob + hq[:, None] * stride_oh + qc[:, None] * stride_om + d[None, :] * stride_od,
            o.to(OUT.dtype.element_ty),
            mask=row_ok[:, None] & d_ok[None, :],
        )
        if WRITE_SEL:
            tl.store(SEL + (b * Hq + hq) * Lq + qc, sel.to(tl.int8), mask=row_ok)


@triton.jit
def group_attn_combine(
    PACC, PL, PM, IDX, EDIT, HS, NVIS, COEF, OUT, SEL, BASE,
    stride_ib, stride_is,
    stride_hb, stride_hh,
    stride_ob, stride_oh, stride_om, stride_od,
    stride_xb, stride_xh, stride_xm, stride_xd,
    Hq, Lq, n_slots, R, S,
    p_coef, one_minus_rho, min_vis,
    D: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
    RULE: tl.constexpr, NACC: tl.constexpr,
    HAS_INDEX: tl.constexpr, HAS_EDIT: tl.constexpr, HAS_HS: tl.constexpr,
    RENORM: tl.constexpr, WRITE_SEL: tl.constexpr, BASE_ACC: tl.constexpr,
):  # fmt: skip
    """Merge the S partial states of each row (w_s = exp2(M_s − max M)) and run the epilogue."""
    rid = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    r_in = rid < R
    slot = rid % n_slots
    bh = rid // n_slots
    hq = bh % Hq
    b = bh // Hq
    if HAS_INDEX:
        qpos = tl.load(IDX + b * stride_ib + slot * stride_is, mask=r_in, other=-1)
    else:
        qpos = tl.where(r_in, slot, -1)
    row_ok = qpos >= 0
    qc = tl.where(row_ok, qpos, 0)
    edit = row_ok
    if HAS_EDIT:
        flag = tl.load(EDIT + b * stride_ib + slot * stride_is, mask=r_in, other=0)
        edit = edit & (flag != 0)

    m_max = tl.full([BLOCK_R], float("-inf"), tl.float32)
    for s in range(0, S):
        m_max = tl.maximum(m_max, tl.load(PM + s * R + rid, mask=row_ok, other=float("-inf")))
    m_ref = tl.where(m_max == float("-inf"), 0.0, m_max)

    d = tl.arange(0, BLOCK_D)
    l_all = tl.zeros([BLOCK_R], tl.float32)
    l1 = tl.zeros([BLOCK_R], tl.float32)
    l2 = tl.zeros([BLOCK_R], tl.float32)
    l3 = tl.zeros([BLOCK_R], tl.float32)
    l4 = tl.zeros([BLOCK_R], tl.float32)
    lx = tl.zeros([BLOCK_R], tl.float32)
    acc = tl.zeros([BLOCK_R, BLOCK_D], tl.float32)
    acc1 = tl.zeros([BLOCK_R, BLOCK_D], tl.float32)
    acc2 = tl.zeros([BLOCK_R, BLOCK_D], tl.float32)
    acc3 = tl.zeros([BLOCK_R, BLOCK_D], tl.float32)
    acc4 = tl.zeros([BLOCK_R, BLOCK_D], tl.float32)
    for s in range(0, S):
        row = s * R + rid
        w = tl.exp2(tl.load(PM + row, mask=row_ok, other=float("-inf")) - m_ref)
        pl = PL + row * 6
        l_all += w * tl.load(pl, mask=row_ok, other=0.0)
        l1 += w * tl.load(pl + 1, mask=row_ok, other=0.0)
        l2 += w * tl.load(pl + 2, mask=row_ok, other=0.0)
        l3 += w * tl.load(pl + 3, mask=row_ok, other=0.0)
        l4 += w * tl.load(pl + 4, mask=row_ok, other=0.0)
        lx += w * tl.load(pl + 5, mask=row_ok, other=0.0)
        pa = PACC + (row * (NACC + 1))[:, None] * BLOCK_D + d[None, :]
        if not BASE_ACC:
            acc += w[:, None] * tl.load(pa, mask=row_ok[:, None], other=0.0)
        if NACC >= 1:
            acc1 += w[:, None] * tl.load(pa + BLOCK_D, mask=row_ok[:, None], other=0.0)
        if NACC >= 2:
            acc2 += w[:, None] * tl.load(pa + 2 * BLOCK_D, mask=row_ok[:, None], other=0.0)
        if NACC >= 3:
            acc3 += w[:, None] * tl.load(pa + 3 * BLOCK_D, mask=row_ok[:, None], other=0.0)
        if NACC >= 4:
            acc4 += w[:, None] * tl.load(pa + 4 * BLOCK_D, mask=row_ok[:, None], other=0.0)

    nvis = tl.zeros([BLOCK_R], tl.float32)
    if RULE == 2:
        nvis += tl.load(NVIS + b, mask=row_ok, other=0.0)
    if BASE_ACC:
        base = tl.load(
            BASE
            + b[:, None] * stride_xb
            + hq[:, None] * stride_xh
            + qc[:, None] * stride_xm
            + d[None, :] * stride_xd,
            mask=row_ok[:, None] & (d < D)[None, :],
            other=0.0,
        )
        acc = base.to(tl.float32) * l_all[:, None]
    o, sel = _epilogue(
        acc, acc1, acc2, acc3, acc4, l_all, l1, l2, l3, l4, lx, edit, nvis,
        COEF, p_coef, one_minus_rho, min_vis, RULE, NACC, RENORM,
    )  # fmt: skip
    if HAS_HS:
        hs = tl.load(HS + b * stride_hb + hq * stride_hh, mask=row_ok, other=1.0)
        o = o * hs[:, None]
    tl.store(
        OUT
        + b[:, None] * stride_ob
        + hq[:, None] * stride_oh
        + qc[:, None] * stride_om
        + d[None, :] * stride_od,
        o.to(OUT.dtype.element_ty),
        mask=row_ok[:, None] & (d < D)[None, :],
    )
    if WRITE_SEL:
        tl.store(SEL + (b * Hq + hq) * Lq + qc, sel.to(tl.int8), mask=row_ok)
