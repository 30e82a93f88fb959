"""steer.kernels: fused attention with LSE, key-group reweighting (fused LSE merge vs eager reference)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from steer.kernels import (
    attention_with_lse,
    causal_mask,
    eager_attention,
    group_reweight,
    group_reweight_reference,
    reweighted_attention,
)

# --------------------------------------------------------------------------------------------------------
# 1. The worked row of specs/var.md, "Checks" §1
# --------------------------------------------------------------------------------------------------------
# keys [BOS, t1, v0, v1, v2, v3, v4, t2]; groups: 0 = other {1, 7}, 1 = Sv {3}, 2 = St {0}, 3 = Nv {2, 4, 5, 6}
ALPHA = [0.30, 0.05, 0.05, 0.25, 0.10, 0.10, 0.05, 0.10]
LABELS = [2, 0, 3, 1, 3, 3, 3, 0]
EXPECTED_ROW = [0.18, 0.05, 0.086667, 0.15, 0.173333, 0.173333, 0.086667, 0.10]


@pytest.fixture(autouse=True, params=[0, 16], ids=["merged-path", "explicit-few-rows"])
def _math_max_rows(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """Run every test with few rows on the LSE-merge path (0) and on the explicit path (default 16)."""
    from steer.kernels import lse as lse_module

    monkeypatch.setattr(lse_module, "MATH_MAX_ROWS", request.param)



def var_coefficients(p: float = 0.6):
    """VAR step 6: c_Sv = c_St = p, c_Nv = 1 + Ω / m_Nv with Ω = (1 − p)(m_Sv + m_St), c_O = 1."""

    def fn(m: torch.Tensor) -> torch.Tensor:
        omega = (1 - p) * (m[..., 1] + m[..., 2])
        c_nv = torch.where(m[..., 3] > 0, 1 + omega / m[..., 3].clamp_min(1e-30), torch.ones_like(omega))
        pp = torch.full_like(omega, p)
        return torch.stack([torch.ones_like(omega), pp, pp, c_nv], dim=-1)

    return fn


def _worked_row():
    q = torch.ones(1, 1, 1, 1)
    k = torch.tensor(ALPHA).log().view(1, 1, 8, 1)  # scores = q·k = ln α, so softmax = α
    v = torch.arange(8, dtype=torch.float32).view(1, 1, 8, 1)  # value of key j = j
    return q, k, v, torch.tensor([LABELS])


@pytest.mark.parametrize("backend", ["kernel", "math"])
def test_worked_row_stock_output(backend: str) -> None:
    q, k, v, _ = _worked_row()
    out, lse = attention_with_lse(q, k, v, None, 1.0, backend=backend)
    assert out.item() == pytest.approx(2.80, abs=1e-5)
    assert lse.item() == pytest.approx(0.0, abs=1e-6)  # Σ α = 1
    out_e, probs = eager_attention(q, k, v, None, 1.0)
    assert out_e.item() == pytest.approx(2.80, abs=1e-5)
    torch.testing.assert_close(probs.flatten(), torch.tensor(ALPHA), atol=1e-6, rtol=0)


def test_worked_row_var_output_both_paths() -> None:
    q, k, v, labels = _worked_row()
    seen: list[torch.Tensor] = []
    base = var_coefficients(0.6)

    def coeffs(m: torch.Tensor) -> torch.Tensor:
        seen.append(m.clone())
        return base(m)

    out_f = group_reweight(q, k, v, None, 1.0, labels, coeffs)
    out_r, new_probs = group_reweight_reference(q, k, v, None, 1.0, labels, coeffs, return_probs=True)
    out_d = reweighted_attention(q, k, v, None, 1.0, labels, coeffs, impl="reference")
    for out in (out_f, out_r, out_d):
        assert out.item() == pytest.approx(3.453333, abs=1e-5)
    # the edited probability row of the spec, summing to 1
    torch.testing.assert_close(new_probs.flatten(), torch.tensor(EXPECTED_ROW), atol=1e-6, rtol=0)
    assert new_probs.sum().item() == pytest.approx(1.0, abs=1e-6)
    # group masses (O, Sv, St, Nv) = (0.15, 0.25, 0.30, 0.30), seen identically by both paths
    for m in seen:
        torch.testing.assert_close(m.flatten(), torch.tensor([0.15, 0.25, 0.30, 0.30]), atol=1e-6, rtol=0)
    # after the edit: (0.15, 0.15, 0.18, 0.52)
    new_masses = [new_probs.flatten()[torch.tensor(LABELS) == g].sum().item() for g in range(4)]
    assert new_masses == pytest.approx([0.15, 0.15, 0.18, 0.52], abs=1e-6)


# --------------------------------------------------------------------------------------------------------
# shared random inputs: B=3, Hq=4, Hkv=2 (GQA), causal + left padding
# --------------------------------------------------------------------------------------------------------
B, HQ, HKV, D = 3, 4, 2, 16
PADS = (0, 3, 7)


def _inputs(lq: int, lk: int, dtype=torch.float32, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, HQ, lq, D, generator=g)
    k = torch.randn(B, HKV, lk, D, generator=g)
    v = torch.randn(B, HKV, lk, D, generator=g)
    keep = torch.arange(lk)[None, :] >= torch.tensor(PADS)[:, None]  # left padding [B, Lk]
    qpos = torch.arange(lk - lq, lk)  # query positions (decode: the last one)
    causal = qpos[:, None] >= torch.arange(lk)[None, :]  # [Lq, Lk]
    mask = causal[None, None] & keep[:, None, None, :]  # [B, 1, Lq, Lk]
    return q.to(dtype), k.to(dtype), v.to(dtype), mask


def _expected(q, k, v, mask, scale):
    r = q.shape[1] // k.shape[1]
    kr, vr = k.repeat_interleave(r, 1), v.repeat_interleave(r, 1)
    out = F.scaled_dot_product_attention(q, kr, vr, attn_mask=mask, scale=scale)
    scores = (q @ kr.transpose(-1, -2)) * scale
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return out, torch.logsumexp(scores, dim=-1)


# --------------------------------------------------------------------------------------------------------
# 2. attention_with_lse vs SDPA and torch.logsumexp
# --------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", ["auto", "kernel", "math"])
@pytest.mark.parametrize("case", ["prefill", "decode", "no_mask", "per_head_mask"])
def test_attention_with_lse_matches_sdpa(backend: str, case: str) -> None:
    lq, lk = (1, 40) if case == "decode" else (37, 37)
    q, k, v, mask = _inputs(lq, lk)
    if case == "no_mask":
        mask = None
    elif case == "per_head_mask":  # a different mask per query head (exercises GQA + head-wise masks)
        drop = torch.rand(B, HQ, lq, lk, generator=torch.Generator().manual_seed(1)) < 0.3
        mask = mask & ~drop
    scale = 1 / math.sqrt(D)
    out, lse = attention_with_lse(q, k, v, mask, scale, backend=backend)
    exp_out, exp_lse = _expected(q, k, v, mask, scale)
    assert out.shape == (B, HQ, lq, D) and out.dtype == torch.float32
    assert lse.shape == (B, HQ, lq) and lse.dtype == torch.float32
    assert not out.isnan().any() and not lse.isnan().any()
    if mask is not None:
        empty = ~mask.expand(B, HQ, lq, lk).any(-1)
        if case == "prefill":
            assert empty.sum() == HQ * sum(PADS)  # the left-padded query rows
        assert (out[empty] == 0).all()
        assert torch.isneginf(lse[empty]).all()
        assert torch.isfinite(lse[~empty]).all()
    torch.testing.assert_close(out, torch.nan_to_num(exp_out), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse, exp_lse, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("backend", ["kernel", "math"])
def test_attention_with_lse_half(dtype: torch.dtype, backend: str) -> None:
    q, k, v, mask = _inputs(37, 37, dtype)
    out, lse = attention_with_lse(q, k, v, mask, 0.25, backend=backend)
    assert out.dtype == dtype and lse.dtype == torch.float32
    exp_out, exp_lse = _expected(q.float(), k.float(), v.float(), mask, 0.25)
    torch.testing.assert_close(out.float(), torch.nan_to_num(exp_out), atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(lse, exp_lse, atol=2e-2, rtol=2e-2)


# --------------------------------------------------------------------------------------------------------
# 3. fused group_reweight == eager reference
# --------------------------------------------------------------------------------------------------------
def _labels(lk: int) -> torch.Tensor:
    """Per sample: group 1 = scattered 'sinks' (incl. the first real token), group 2 = a contiguous span,
    group 3 = empty; everything else 0. Labels cover lk - 2 keys (the rest padded with 0 inside)."""
    lab = torch.zeros(B, lk - 2, dtype=torch.long)
    for b, pad in enumerate(PADS):
        lab[b, pad] = 1
        lab[b, pad + 4 : pad + 20] = 2
        lab[b, pad + 9] = 1
    return lab


def coeffs_background(m: torch.Tensor) -> torch.Tensor:
    """Depends on the masses; c_0 ≠ 1, so the background pass runs."""
    return 0.5 + m * torch.tensor([1.0, 2.0, 3.0, 4.0])


COEFFS = {"var": var_coefficients(0.6), "background": coeffs_background}


def _rows(lq: int, kind: str) -> torch.Tensor | None:
    if kind == "all":
        return None
    g = torch.Generator().manual_seed(2)
    rows = torch.rand(B, lq, generator=g) < 0.4
    rows[0, 0] = True  # prefill: a row that sees one key only; decode: the new row
    if lq > 1:
        rows[1, 1] = True  # padded query row of sample 1: no allowed key
        rows[2] = False  # a sample with no edited row at all
    else:
        rows[2] = True
    return rows


@pytest.mark.parametrize("renormalize", [False, True])
@pytest.mark.parametrize("coeffs", sorted(COEFFS))
@pytest.mark.parametrize("rows_kind", ["all", "subset"])
@pytest.mark.parametrize("phase", ["prefill", "decode"])
def test_fused_matches_reference(phase: str, rows_kind: str, coeffs: str, renormalize: bool) -> None:
    lq, lk = (37, 37) if phase == "prefill" else (1, 40)
    q, k, v, mask = _inputs(lq, lk, seed=3)
    labels, rows, fn, scale = _labels(lk), _rows(lq, rows_kind), COEFFS[coeffs], 0.3
    kw = dict(rows=rows, renormalize=renormalize, num_groups=3)
    ref = group_reweight_reference(q, k, v, mask, scale, labels, fn, **kw)
    fused = group_reweight(q, k, v, mask, scale, labels, fn, **kw)
    assert not fused.isnan().any()
    torch.testing.assert_close(fused, ref, atol=1e-5, rtol=1e-5)
    # the edit really acts on the selected rows
    plain = attention_with_lse(q, k, v, mask, scale)[0]
    assert (fused - plain).abs().max() > 1e-2

    # with the caller's own (different backend) unedited output: untouched rows are bit-identical to it
    base = F.scaled_dot_product_attention(
        q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1), attn_mask=mask, scale=scale
    ).nan_to_num()
    fused_b = reweighted_attention(q, k, v, mask, scale, labels, fn, base_out=base, impl="auto", **kw)
    torch.testing.assert_close(fused_b, ref, atol=1e-5, rtol=1e-5)
    if rows is not None:
        outside = ~rows[:, None, :, None].expand_as(base)
        assert torch.equal(fused_b[outside], base[outside])
        assert torch.equal(fused[outside], plain[outside])


@pytest.mark.parametrize("phase", ["prefill", "decode"])
def test_fused_matches_reference_bf16(phase: str) -> None:
    lq, lk = (37, 37) if phase == "prefill" else (1, 40)
    q, k, v, mask = _inputs(lq, lk, torch.bfloat16, seed=4)
    labels, rows = _labels(lk), _rows(lq, "subset")
    for fn in COEFFS.values():
        ref = group_reweight_reference(q, k, v, mask, 0.3, labels, fn, rows=rows, num_groups=3)
        fused = group_reweight(q, k, v, mask, 0.3, labels, fn, rows=rows, num_groups=3)
        assert fused.dtype == torch.bfloat16
        torch.testing.assert_close(fused.float(), ref.float(), atol=2e-2, rtol=2e-2)


class _Recorder(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.shapes: list[tuple[str, tuple[int, ...]]] = []
        self.kernel_q_rows: list[int] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func is torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default:
            self.kernel_q_rows.append(args[0].shape[2])
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.shapes.append((str(func), tuple(t.shape)))
        return out


@pytest.mark.parametrize("math_max_rows", [0, 16])
def test_fused_runs_only_on_edited_rows_without_probabilities(math_max_rows: int, monkeypatch) -> None:
    """Edited rows are gathered; few rows take the explicit path (MATH_MAX_ROWS), more the fused kernel."""
    from steer.kernels import lse as lse_module

    monkeypatch.setattr(lse_module, "MATH_MAX_ROWS", math_max_rows)
    lq = lk = 37
    q, k, v, mask = _inputs(lq, lk, seed=5)
    base = attention_with_lse(q, k, v, mask, 0.3)[0]
    rows = torch.zeros(B, lq, dtype=torch.bool)
    rows[0, [20, 30]] = True
    rows[1, 25] = True
    rows[2, [10, 11, 36]] = True  # at most 3 rows in a sample -> passes over 3 gathered rows
    with _Recorder() as rec:
        group_reweight(
            q, k, v, mask, 0.3, _labels(lk), coeffs_background, rows=rows, base_out=base, num_groups=3
        )
    # lse_all, group 1, group 2, background: each over the 3 gathered rows
    assert rec.kernel_q_rows == ([3, 3, 3, 3] if math_max_rows < 3 else [])
    big = [(f, s) for f, s in rec.shapes if len(s) == 4 and s[1] == HQ and s[-1] == lk and s[-2] == lq]
    assert not big, big  # no [B, Hq, Lq, Lk] tensor anywhere


# --------------------------------------------------------------------------------------------------------
# 4. all-ones coefficients == plain attention
# --------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("renormalize", [False, True])
@pytest.mark.parametrize("phase", ["prefill", "decode"])
def test_all_ones_is_plain_attention(phase: str, renormalize: bool) -> None:
    lq, lk = (37, 37) if phase == "prefill" else (1, 40)
    q, k, v, mask = _inputs(lq, lk, seed=6)

    def ones(m: torch.Tensor) -> torch.Tensor:
        return torch.ones_like(m)

    exp_out, _ = _expected(q, k, v, mask, 0.3)
    exp_out = exp_out.nan_to_num()
    for impl in ("fused", "reference"):
        out = reweighted_attention(
            q, k, v, mask, 0.3, _labels(lk), ones, renormalize=renormalize, num_groups=3, impl=impl
        )
        torch.testing.assert_close(out, exp_out, atol=1e-6, rtol=1e-6)
    base = attention_with_lse(q, k, v, mask, 0.3)[0]
    out = group_reweight(q, k, v, mask, 0.3, _labels(lk), ones, renormalize=renormalize)
    torch.testing.assert_close(out, base, atol=1e-6, rtol=0)


# --------------------------------------------------------------------------------------------------------
# argument checks
# --------------------------------------------------------------------------------------------------------
def test_bad_arguments() -> None:
    q, k, v, mask = _inputs(4, 6)
    with pytest.raises(ValueError, match="multiple"):
        attention_with_lse(q, k[:, :1].expand(B, 3, 6, D), v[:, :1].expand(B, 3, 6, D), mask, 1.0)
    with pytest.raises(ValueError, match="only 6"):
        group_reweight(q, k, v, mask, 1.0, torch.zeros(B, 7, dtype=torch.long), torch.ones_like)
    with pytest.raises(ValueError, match="num_groups"):
        group_reweight(q, k, v, mask, 1.0, torch.full((B, 6), 2), torch.ones_like, num_groups=1)
    with pytest.raises(TypeError, match="bool"):
        attention_with_lse(q, k, v, mask.float(), 1.0)
    with pytest.raises(ValueError, match="impl"):
        reweighted_attention(
            q, k, v, mask, 1.0, torch.zeros(B, 6, dtype=torch.long), torch.ones_like, impl="x"
        )


def test_causal_flag_equals_explicit_causal_mask() -> None:
    q, k, v, _ = _inputs(37, 37, seed=9)
    tril = torch.ones(37, 37, dtype=torch.bool).tril()[None, None]
    out_m, lse_m = attention_with_lse(q, k, v, tril, 0.3)
    out_c, lse_c = attention_with_lse(q, k, v, None, 0.3, causal=True)
    torch.testing.assert_close(out_c, out_m, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse_c, lse_m, atol=1e-5, rtol=1e-5)
    out_math, _ = attention_with_lse(q, k, v, None, 0.3, causal=True, backend="math")
    torch.testing.assert_close(out_math, out_m, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("rows_kind", ["all", "subset"])
@pytest.mark.parametrize("shape", [(37, 37), (5, 40)], ids=["prefill", "chunk"])
def test_reweight_causal_flag_equals_explicit_triangle(shape: tuple[int, int], rows_kind: str) -> None:
    """``causal=True`` with no mask (SDPA's is_causal prefill) gives what the materialised triangle gives, on
    every path (the LSE merge with gathered rows, all rows, the explicit few-row path: the module's fixture;
    the reference), with and without the caller's base output; the rows are the last Lq positions (a chunk:
    Lq < Lk)."""
    lq, lk = shape
    q, k, v, _ = _inputs(lq, lk, seed=11)
    tri = causal_mask(lq, lk, "cpu")
    assert torch.equal(tri[0, 0], torch.ones(lq, lk, dtype=torch.bool).tril(lk - lq))
    labels, fn = _labels(lk), COEFFS["background"]
    rows = _rows(lq, rows_kind)
    kw = dict(rows=rows, num_groups=3)
    ref = group_reweight_reference(q, k, v, tri, 0.3, labels, fn, **kw)
    base = attention_with_lse(q, k, v, tri, 0.3)[0]
    for base_out in (None, base):
        got = group_reweight(q, k, v, None, 0.3, labels, fn, base_out=base_out, causal=True, **kw)
        torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
    for impl in ("fused", "reference"):
        got = reweighted_attention(q, k, v, None, 0.3, labels, fn, base_out=base, impl=impl, causal=True, **kw)
        torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
    assert (ref - base).abs().max() > 1e-2


def test_group_column_paths_and_dropped_mask_match_reference(monkeypatch: pytest.MonkeyPatch) -> None:
    """A group spread wide goes through an index, a span with a few foreign keys through a slice (the foreign
    keys masked out by label), and when the caller's mask allows every key of a group for the edited rows it
    is replaced by the row-broadcast label mask. All three agree with the eager reference."""
    from steer.kernels import lse as lse_module

    lk = 64
    labels = torch.zeros(1, lk, dtype=torch.long)
    labels[0, [2, 60]] = 1  # 57 foreign columns between them: index path
    labels[0, 10:41] = 2
    labels[0, 20] = 1  # one foreign column inside group 2's span: slice path
    labels[0, 45:51] = 3
    assert isinstance(lse_module._group_columns(labels, 1), torch.Tensor)
    assert lse_module._group_columns(labels, 2) == slice(10, 41)
    assert lse_module._group_columns(labels, 3) == slice(45, 51)

    g = torch.Generator().manual_seed(11)
    q, k, v = (torch.randn(2, h, lk, D, generator=g) for h in (HQ, HKV, HKV))
    mask = torch.ones(lk, lk, dtype=torch.bool).tril()[None, None]
    rows = (torch.arange(lk) >= 41)[None].expand(2, lk)  # rows after group 2: they see all of it
    group_masks: list[tuple[int, ...]] = []
    real = lse_module.attention_with_lse

    def spy(q_, k_, v_, m_, *args, **kwargs):
        if k_.shape[2] < lk:  # a group pass
            group_masks.append(tuple(m_.shape) if m_ is not None else ())
        return real(q_, k_, v_, m_, *args, **kwargs)

    monkeypatch.setattr(lse_module, "attention_with_lse", spy)
    for sel in (rows, None):
        ref = group_reweight_reference(q, k, v, mask, 0.3, labels, coeffs_background, rows=sel, num_groups=3)
        fused = group_reweight(q, k, v, mask, 0.3, labels, coeffs_background, rows=sel, num_groups=3)
        torch.testing.assert_close(fused, ref, atol=1e-5, rtol=1e-5)
    # with the late rows only, group 2's causal mask is all-True on its columns and was dropped
    assert (2, 1, 1, 31) in group_masks
