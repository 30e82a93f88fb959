"""The single-pass Triton group-attention kernel (steer.kernels.triton_group) against the eager reference.

Without CUDA the kernels run in Triton's CPU interpreter (``TRITON_INTERPRET=1``, set here before the first
kernel is decorated); shapes are small (B=2, Hq=4, Hkv=2, D=16, Lq/Lk ≤ 64). Skipped without triton.
Tolerances: fp32 1e-5, fp16/bf16 2e-2 (the interpreter computes bf16 dots in fp32 after rounding P to
bf16, see the module docstring; on CUDA the native bf16 dot runs).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
triton = pytest.importorskip("triton")

from steer.kernels import dispatch, group_reweight_reference, reweighted_attention  # noqa: E402
from steer.kernels.rules import CoefficientRule  # noqa: E402
from steer.kernels.triton_group import supports, triton_group_attention  # noqa: E402
from steer.methods.vlm.var import var_coefficients, var_rule  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"
B, HQ, HKV, D = 2, 4, 2, 16
PAD = 5  # left padding of sample 1
SCALE = D**-0.5

# labels as VAR uses them: 0 = other, 1 = Sv, 2 = St, 3 = Nv; key 0 (and 0 after the padding) is the text sink
RULES = {
    "none": None,
    "constant": CoefficientRule.constant([1.0, 0.3, 0.6, 1.8]),
    "constant-c0": CoefficientRule.constant([0.5, 0.5, 2.0, 0.5]),  # c_0 != 1; groups 1, 3 folded into 0
    "var": var_rule(0.6, 0.5, 0.2, torch.tensor([24.0, 20.0])),
}


def _labels(lk: int) -> torch.Tensor:
    lab = torch.zeros(B, lk, dtype=torch.long)
    for b, start in ((0, 0), (1, PAD)):
        lab[b, start] = 2  # St: first real token
        img = torch.arange(start + 3, min(start + 3 + 24, lk))
        lab[b, img] = 3  # Nv
        lab[b, img[::7]] = 1  # Sv
    return lab


def _inputs(lq: int, lk: int, dtype: torch.dtype = torch.float32, seed: int = 0, hkv: int = HKV):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, HQ, lq, D, generator=g) * 1.5
    k = torch.randn(B, hkv, lk, D, generator=g)
    v = torch.randn(B, hkv, lk, D, generator=g)
    k[:, :, 0] += 2.0 * q.mean((1, 2))[:, None]  # a strong sink on key 0 (sample 0)
    k[1, :, PAD] += 2.0 * q[1].mean((0, 1))  # and on sample 1's first real key
    keep = torch.ones(B, lk, dtype=torch.bool)
    keep[1, :PAD] = False
    cast = [t.to(DEV, dtype) for t in (q, k, v)]
    return (*cast, keep.to(DEV), _labels(lk).to(DEV))


def _causal(lq: int, lk: int) -> torch.Tensor:
    return torch.ones(lq, lk, dtype=torch.bool, device=DEV).tril(lk - lq)


def _fn(rule: CoefficientRule | None):
    return (lambda m: torch.ones((), device=m.device)) if rule is None else rule.coefficients


def _reference(q, k, v, mask, labels, rule, **kw):
    return group_reweight_reference(q, k, v, mask, SCALE, labels, _fn(rule), num_groups=3, **kw)


def _close(out, ref, dtype):
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.float(), ref.float(), atol=tol, rtol=tol)


# --------------------------------------------------------------------------------------------------------
# parity with the eager reference


@pytest.mark.parametrize("rule", list(RULES))
@pytest.mark.parametrize("renormalize", [False, True], ids=["plain", "renorm"])
def test_prefill_causal_left_padding(rule: str, renormalize: bool) -> None:
    if rule == "none" and renormalize:
        pytest.skip("renormalize is the identity without a rule")
    q, k, v, keep, labels = _inputs(48, 48)
    out = triton_group_attention(
        q, k, v, labels, scale=SCALE, rule=RULES[rule], causal=True, mask=keep[:, None, None, :],
        renormalize=renormalize,
    )  # fmt: skip
    full = _causal(48, 48) & keep[:, None, None, :]
    ref = _reference(q, k, v, full, labels, RULES[rule], renormalize=renormalize)
    _close(out, ref, torch.float32)
    assert out[1, :, :PAD].abs().max() == 0  # fully padded query rows: exact zeros


@pytest.mark.parametrize("rule", ["constant-c0", "var"])
@pytest.mark.parametrize("splits", [1, 3])
@pytest.mark.parametrize("hkv", [2, 4], ids=["gqa", "mha"])
def test_decode_long_cache(rule: str, splits: int, hkv: int) -> None:
    q, k, v, keep, labels = _inputs(1, 64, hkv=hkv, seed=1)
    mask = keep[:, None, None, :]
    out, selected = triton_group_attention(
        q, k, v, labels, scale=SCALE, rule=RULES[rule], mask=mask, num_splits=splits, return_selected=True
    )
    ref = _reference(q, k, v, mask, labels, RULES[rule])
    _close(out, ref, torch.float32)
    # the same from the caller's plain output (o' = c_0 o + Σ_k (c_k − c_0) A_k / L), edited rows gathered
    base = _reference(q, k, v, mask, labels, None)
    rows = torch.ones(B, 1, dtype=torch.bool, device=DEV)
    out_b = triton_group_attention(
        q, k, v, labels, scale=SCALE, rule=RULES[rule], mask=mask, num_splits=splits, rows=rows, base_out=base
    )
    _close(out_b, ref, torch.float32)
    if rule == "var":  # the kernel's row test = var_coefficients on the reference masses
        _, probs = group_reweight_reference(q, k, v, mask, SCALE, labels, _fn(None), return_probs=True)
        masses = probs @ torch.nn.functional.one_hot(labels, 4).float()[:, None]
        _, want = var_coefficients(masses, 0.6, 0.5, 0.2, torch.tensor([24.0, 20.0], device=DEV))
        assert torch.equal(selected, want)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("phase", ["prefill", "decode"])
def test_half_precision(dtype: torch.dtype, phase: str) -> None:
    lq = 40 if phase == "prefill" else 1
    q, k, v, keep, labels = _inputs(lq, 40, dtype=dtype, seed=2)
    mask = _causal(lq, 40) & keep[:, None, None, :]
    out = triton_group_attention(
        q, k, v, labels, scale=SCALE, rule=RULES["var"], mask=mask, num_splits=2 if lq == 1 else 1
    )
    assert out.dtype == dtype
    ref = _reference(q.float(), k.float(), v.float(), mask, labels, RULES["var"])
    _close(out, ref, dtype)


def test_rows_and_base_out_compute_only_edited_rows() -> None:
    q, k, v, keep, labels = _inputs(32, 48, seed=3)
    mask = _causal(32, 48) & keep[:, None, None, :]
    rows = torch.zeros(B, 32, dtype=torch.bool, device=DEV)
    rows[0, 20:] = True
    rows[1, 27:] = True
    base = _reference(q, k, v, mask, labels, None) + 1e-3  # offset: untouched rows must keep it exactly
    rule = RULES["var"]
    out = triton_group_attention(q, k, v, labels, scale=SCALE, rule=rule, mask=mask, rows=rows, base_out=base)
    ref = _reference(q, k, v, mask, labels, rule, rows=rows, base_out=base)
    _close(out, ref + rows[:, None, :, None] * 1e-3, torch.float32)  # edited rows are built on base_out
    assert torch.equal(out[~rows[:, None].expand(-1, HQ, -1)], base[~rows[:, None].expand(-1, HQ, -1)])
    # without base_out every row is computed; unedited rows are plain attention
    out2 = triton_group_attention(q, k, v, labels, scale=SCALE, rule=rule, mask=mask, rows=rows)
    _close(out2, _reference(q, k, v, mask, labels, rule, rows=rows), torch.float32)
    # sample_ok = False leaves the whole sample unedited (VAR without a visual sink)
    skip = var_rule(
        0.6, 0.5, 0.2, rule.per_sample["n_tokens"], sample_ok=torch.tensor([True, False], device=DEV)
    )
    out3, sel = triton_group_attention(
        q, k, v, labels, scale=SCALE, rule=skip, mask=mask, rows=rows, base_out=base, return_selected=True
    )
    assert sel[0].any() and not sel[1].any()
    assert torch.equal(out3[1], base[1]) and torch.equal(out3[0], out[0])


def test_masks_bias_and_head_scale() -> None:
    """A CCA-like bool mask (keys after the query allowed in a block), an additive bias, a per-head scale."""
    lq = lk = 40
    q, k, v, keep, labels = _inputs(lq, lk, seed=4)
    mask = _causal(lq, lk).clone()
    mask[8:24, 8:24] = True  # a bidirectional block
    mask = mask[None, None] & keep[:, None, None, :]
    bias = torch.randn(B, 1, lq, lk, device=DEV)
    heads = torch.tensor([[1.0, 0.5, 2.0, 0.0], [1.5, 1.0, 1.0, 0.25]], device=DEV)
    rule = RULES["constant"]
    out = triton_group_attention(
        q, k, v, labels, scale=SCALE, rule=rule, mask=mask, bias=bias, head_scale=heads
    )
    # eager: p = softmax(scale q kᵀ + bias, masked), p' = c_g p, o = s_h p' v
    kk, vv = (t.repeat_interleave(HQ // HKV, 1) for t in (k, v))
    scores = (q @ kk.transpose(-1, -2)) * SCALE + bias
    probs = torch.softmax(scores.masked_fill(~mask, float("-inf")), -1).nan_to_num(0.0)
    c = torch.tensor(rule.values, device=DEV)[labels]  # [B, Lk]
    ref = ((probs * c[:, None, None, :]) @ vv) * heads[:, :, None, None]
    _close(out, ref, torch.float32)


def test_worked_row_of_the_spec() -> None:
    """specs/var.md Check 1: scores = ln α, value of key j = j; stock 2.80, VAR 3.453333 (D = 1, padded)."""
    alpha = torch.tensor([0.30, 0.05, 0.05, 0.25, 0.10, 0.10, 0.05, 0.10])
    q = torch.ones(1, 1, 1, 1, device=DEV)
    k = alpha.log().view(1, 1, 8, 1).to(DEV)
    v = torch.arange(8.0).view(1, 1, 8, 1).to(DEV)
    labels = torch.tensor([[2, 0, 3, 1, 3, 3, 3, 0]], device=DEV)
    rule = var_rule(0.6, 0.5, 0.2, 5.0)
    stock = triton_group_attention(q, k, v, labels, scale=1.0)
    out = triton_group_attention(q, k, v, labels, scale=1.0, rule=rule)
    assert stock.item() == pytest.approx(2.80, abs=1e-5)
    assert out.item() == pytest.approx(3.453333, abs=1e-5)


# --------------------------------------------------------------------------------------------------------
# the rule object and the dispatcher


def test_var_rule_equals_var_coefficients_under_any_group_labels() -> None:
    """The registered "var" rule is var_coefficients; with other group labels (5 groups, Sv=4, St=1, Nv=2) it
    reads and writes the rule's columns and leaves the others at 1."""
    g = torch.Generator().manual_seed(5)
    masses = torch.rand(3, 2, 50, 4, generator=g)
    masses = masses / masses.sum(-1, keepdim=True)
    masses[0, 0, :5, 3] = 0.0  # no receiver
    masses[1, 1, :5, 1] = 0.0  # no visual sink mass
    nvis, has = torch.tensor([10.0, 0.0, 5.0]), torch.tensor([True, True, False])
    want, selected = var_coefficients(masses, 0.6, 0.5, 0.2, nvis, has_visual_sink=has)
    got = var_rule(0.6, 0.5, 0.2, nvis, sample_ok=has).coefficients(masses)
    assert torch.equal(got, want) and 0 < int(selected.sum()) < selected.numel()
    wide = torch.zeros(3, 2, 50, 5)
    wide[..., 0], wide[..., 4], wide[..., 1], wide[..., 2] = masses[..., 0], masses[..., 1], masses[..., 2], masses[..., 3]
    moved = var_rule(0.6, 0.5, 0.2, nvis, groups=(4, 1, 2), sample_ok=has).coefficients(wide)
    assert torch.equal(moved[..., [0, 4, 1, 2]], want) and bool((moved[..., 3] == 1).all())
    assert var_rule(0.6, 0.5, 0.2, nvis).epilogue == "gated_transfer"
    with pytest.raises(ValueError, match="distinct"):
        var_rule(0.6, 0.5, 0.2, nvis, groups=(1, 1, 2))


@pytest.mark.parametrize("phase", ["prefill", "decode"])
def test_dispatcher_three_paths_agree(phase: str, monkeypatch: pytest.MonkeyPatch) -> None:
    lq = 32 if phase == "prefill" else 1
    q, k, v, keep, labels = _inputs(lq, 48, seed=6)
    mask = _causal(lq, 48) & keep[:, None, None, :]
    rows = torch.zeros(B, lq, dtype=torch.bool, device=DEV)
    rows[:, -12:] = True
    seen: list[torch.Tensor] = []
    rule = var_rule(0.6, 0.5, 0.2, torch.tensor([24.0, 20.0]), on_selected=seen.append)
    base = reweighted_attention(q, k, v, mask, SCALE, labels, _fn(None), impl="reference")
    kw = dict(rows=rows, base_out=base, rule=rule)
    outs = {
        impl: reweighted_attention(q, k, v, mask, SCALE, labels, rule.coefficients, impl=impl, **kw)
        for impl in ("triton", "fused", "reference")
    }
    _close(outs["triton"], outs["reference"], torch.float32)
    _close(outs["fused"], outs["reference"], torch.float32)
    assert len(seen) == 1 and seen[0].shape == (B, HQ, lq) and bool(seen[0].any())
    assert not seen[0][~rows[:, None].expand(-1, HQ, -1)].any()
    with dispatch.forced_impl("triton"):
        forced = reweighted_attention(q, k, v, mask, SCALE, labels, rule.coefficients, **kw)
    torch.testing.assert_close(forced, outs["triton"], atol=0, rtol=0)

    if DEV == "cpu":  # "auto" on CPU is the LSE-merge path, never Triton
        from steer.kernels import triton_group

        def boom(*args, **kwargs):
            raise AssertionError("Triton called on CPU under impl='auto'")

        monkeypatch.setattr(triton_group, "triton_group_attention", boom)
        auto = reweighted_attention(q, k, v, mask, SCALE, labels, rule.coefficients, **kw)
        torch.testing.assert_close(auto, outs["fused"], atol=0, rtol=0)


@pytest.mark.parametrize("lq", [32, 7], ids=["prefill", "chunk"])
def test_dispatcher_causal_flag_without_a_mask(lq: int) -> None:
    """``causal=True`` and no mask (what steer's attention function passes for SDPA's is_causal prefill): the
    kernel's CAUSAL path and the LSE merge give what the materialised triangle gives."""
    q, k, v, _, labels = _inputs(lq, 48, seed=8)
    tri = _causal(lq, 48)
    rows = torch.zeros(B, lq, dtype=torch.bool, device=DEV)
    rows[:, -5:] = True
    rule = var_rule(0.6, 0.5, 0.2, torch.tensor([24.0, 20.0]))
    base = reweighted_attention(q, k, v, tri, SCALE, labels, _fn(None), impl="reference")
    kw = dict(rows=rows, base_out=base, rule=rule)
    want = reweighted_attention(q, k, v, tri, SCALE, labels, rule.coefficients, impl="reference", **kw)
    for impl in ("triton", "fused", "reference"):
        got = reweighted_attention(q, k, v, None, SCALE, labels, rule.coefficients, impl=impl, causal=True, **kw)
        _close(got, want, torch.float32)
    assert (want - base).abs().max() > 1e-3


@pytest.mark.parametrize("lq", [1, 4, 32], ids=["decode", "short", "prefill"])
def test_lazy_base_is_skipped_for_short_row_blocks(lq: int) -> None:
    """``base_out`` given as a function: the Triton path computes up to ONE_PASS_MAX_ROWS rows and their plain
    output in one pass over K and V and never calls it; longer blocks and the LSE path call it once. Same
    result either way; rows the rule leaves alone are plain attention."""
    q, k, v, keep, labels = _inputs(lq, 40, seed=9)
    mask = _causal(lq, 40) & keep[:, None, None, :]
    rows = torch.zeros(B, lq, dtype=torch.bool, device=DEV)
    rows[0, -1] = True  # sample 1: no edited row
    rule = var_rule(0.6, 0.5, 0.2, torch.tensor([24.0, 20.0]))
    base = reweighted_attention(q, k, v, mask, SCALE, labels, _fn(None), impl="reference")
    kw = dict(rows=rows, rule=rule)
    want = reweighted_attention(q, k, v, mask, SCALE, labels, rule.coefficients, impl="reference", base_out=base, **kw)
    assert (want - base).abs().max() > 1e-3
    calls: list[int] = []

    def lazy() -> torch.Tensor:
        calls.append(1)
        return base

    for impl, expect_calls in (("triton", 0 if lq <= dispatch.ONE_PASS_MAX_ROWS else 1), ("fused", 1)):
        calls.clear()
        got = reweighted_attention(q, k, v, mask, SCALE, labels, rule.coefficients, impl=impl, base_out=lazy, **kw)
        assert len(calls) == expect_calls, impl
        _close(got, want, torch.float32)


def test_unsupported_arguments() -> None:
    q, k, v, keep, labels = _inputs(4, 16)
    with pytest.raises(ValueError, match="CoefficientRule"):
        reweighted_attention(q, k, v, None, SCALE, labels, _fn(None), impl="triton")
    assert "dtype" in supports(q.double(), k.double(), v.double(), None)
    assert "head dims" in supports(q, k, v[..., :8], None)
    assert "more than" in supports(q, k, v, CoefficientRule.constant([1, 2, 3, 4, 5, 6]))
    with pytest.raises(ValueError, match="labels use group"):
        triton_group_attention(q, k, v, labels, scale=SCALE, rule=CoefficientRule.constant([1.0, 2.0]))


def test_var_on_a_tiny_model_triton_equals_fused() -> None:
    """VAR inside a real model (tiny LLaVA, GQA, 3 left-padded rows): logits, state counts and the decode
    steps' logits (Triton: one pass with the base output) agree."""
    from helpers import batch_inputs, logits, real
    from test_var import VAR, Plant

    import steer
    from steer import zoo

    model, processor = zoo.load_tiny("llava")
    model.to(DEV)
    inputs = batch_inputs(processor, "llava").to(DEV)
    params = {**VAR, "rho": 0.5, "min_visual_mass": 0.2}
    results = {}
    with Plant(model):
        for impl in ("fused", "triton"):
            with steer.apply(model, "var", **params) as handle, dispatch.forced_impl(impl):
                out = logits(model, inputs)
                samples = handle.state["var"]["samples"]
                counts = [int(samples[b][layer][key].sum()) for b in range(3) for layer in (2, 3)
                          for key in ("selected_rows", "eligible_rows")]  # fmt: skip
                with torch.no_grad():
                    steps = model.generate(
                        **inputs, max_new_tokens=3, min_new_tokens=3, do_sample=False,
                        return_dict_in_generate=True, output_logits=True,
                    ).logits  # fmt: skip
                results[impl] = (out, counts, torch.stack(steps, 1))
    torch.testing.assert_close(
        results["triton"][0][real(inputs)], results["fused"][0][real(inputs)], atol=1e-5, rtol=0
    )
    assert results["triton"][1] == results["fused"][1] and sum(results["fused"][1]) > 0
    torch.testing.assert_close(results["triton"][2], results["fused"][2], atol=1e-5, rtol=0)


def test_kernels_compile_for_sm90() -> None:
    """The real GPU compiler (Triton -> PTX -> cubin, no GPU needed) on the launches VAR makes: catches what
    the interpreter cannot (typing, scoping, layouts). Registers/spills: ``benchmarks/compile_check.py``."""
    if not (Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas").exists():
        pytest.skip("triton has no NVIDIA backend (ptxas) here")
    root = Path(__file__).resolve().parents[1]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    run = subprocess.run(
        [sys.executable, str(root / "benchmarks" / "compile_check.py"), "--configs", "quick"],
        cwd=root, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert run.returncode == 0, run.stdout + run.stderr
    assert run.stdout.count("\nok ") == 4, run.stdout


def test_constant_group_reweight_edit_on_a_tiny_model() -> None:
    """A `GroupReweight` with a coefficient list is its own kernel rule (`coefficient_rule`): same logits
    through Triton as through the LSE merge, prefill and decode (Qwen2-VL, GQA)."""
    from helpers import batch_inputs, generate, logits, real

    import steer
    from steer import edits, zoo

    model, processor = zoo.load_tiny("qwen2_vl")
    model.to(DEV)
    inputs = batch_inputs(processor, "qwen2_vl", n=2).to(DEV)
    assert inputs["input_ids"].shape[1] < 200
    edit = edits.GroupReweight(layers=[1, 2], coefficients=[1.0, 3.0], rows="after_image", renormalize=True)
    got = {}
    for impl in ("fused", "triton"):
        with steer.apply(model, [edit]), dispatch.forced_impl(impl):
            got[impl] = (logits(model, inputs), generate(model, inputs, max_new_tokens=2))
    torch.testing.assert_close(
        got["triton"][0][real(inputs)], got["fused"][0][real(inputs)], atol=1e-5, rtol=0
    )
    assert torch.equal(got["triton"][1], got["fused"][1])
