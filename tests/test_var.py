"""VAR (specs/var.md, "Checks"): the worked row, the probability invariants on tiny models, fused == eager
reference on every family, p = 1 is the identity, batch = per sample, beams, per-call sinks, calibration.

Tiny random models have no massive activations, and z = |x_d| / RMS(x) ≤ sqrt(hidden) = 8 there, so the
tests plant sinks (channel ``C`` += 100·RMS after decoder layer 1, for the first real token and chosen image
tokens) and use ``tau = 4``.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from conftest import FAMILIES
from helpers import batch_inputs, generate, logits, real, row_inputs
from torch.utils._python_dispatch import TorchDispatchMode

import steer
from steer import calibration, zoo
from steer.adapters import adapter_for
from steer.kernels import dispatch
from steer.kernels.lse import attention_with_lse, causal_mask
from steer.kernels.reference import eager_attention, group_reweight_reference
from steer.methods.vlm.var import (
    LABEL_NV,
    LABEL_OTHER,
    LABEL_ST,
    LABEL_SV,
    group_labels,
    known_sink_dims,
    var_coefficients,
)

C = 5  # planted sink channel
TAU = 4.0
VAR = {"sink_dims": [C], "tau": TAU}


class Plant:
    """Plant massive activations: after decoder layer 1, x[..., C] += 100·RMS(x) at the first real token and
    at the image tokens whose 1-based rank inside the sample's image tokens is in ``ranks``.

    ``no_visual``: batch rows that get only the text sink; ``padding``: plant on padding positions too. Positions depend only on each row's own tokens, so
    a row planted alone or inside a left-padded batch gets the same sinks.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        ranks: Iterable[int] = (1, 3),
        no_visual: Iterable[int] = (),
        padding: bool = False,
    ) -> None:
        self.model = model
        self.adapter = adapter_for(model)
        self.ranks = tuple(ranks)
        self.no_visual = tuple(no_visual)
        self.padding = padding
        self.where: torch.Tensor | None = None
        self.handles: list[Any] = []

    def positions(self, ids: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        out = torch.zeros(ids.shape, dtype=torch.bool)
        first = mask.long().argmax(1) if mask is not None else torch.zeros(ids.shape[0], dtype=torch.long)
        out[torch.arange(ids.shape[0]), first] = True
        image = self.adapter.image_token_mask(ids)
        rank = image.long().cumsum(1)
        chosen = torch.zeros_like(image)
        for r in self.ranks:
            chosen |= image & (rank == r)
        for row in self.no_visual:
            chosen[row] = False
        if self.padding and mask is not None:  # padding must never count as a sink
            out |= ~mask.bool()
        return out | chosen

    def _capture(self, module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        ids = kwargs.get("input_ids")
        if ids is not None and ids.shape[1] > 1:
            self.where = self.positions(ids, kwargs.get("attention_mask"))

    def _add(self, module: torch.nn.Module, args: tuple, output: Any) -> Any:
        hidden = output[0] if isinstance(output, tuple) else output
        if self.where is None or hidden.shape[1] != self.where.shape[1]:
            return None
        rms = hidden.float().pow(2).mean(-1).sqrt()
        rms = torch.where(rms > 0, rms, torch.ones_like(rms))  # padding rows can be exactly 0
        hidden = hidden.clone()
        hidden[..., C] += (100.0 * rms * self.where.to(hidden.device)).to(hidden.dtype)
        return (hidden, *output[1:]) if isinstance(output, tuple) else hidden

    def __enter__(self) -> Plant:
        self.handles = [
            self.model.register_forward_pre_hook(self._capture, with_kwargs=True),
            self.adapter.decoder_layers[1].register_forward_hook(self._add),
        ]
        return self

    def __exit__(self, *exc: Any) -> None:
        for h in self.handles:
            h.remove()


def sink_positions(handle: steer.Steering, row: int, layer: int = 2) -> tuple[list[int], list[int]]:
    entry = handle.state["var"]["samples"][row][layer]
    return entry["visual_sinks"], entry["text_sinks"]


# ------------------------------------------------------------------------------------------------------
# Check 1: the worked row


ALPHA = [0.30, 0.05, 0.05, 0.25, 0.10, 0.10, 0.05, 0.10]
EXPECTED_ROW = [0.18, 0.05, 0.086667, 0.15, 0.173333, 0.173333, 0.086667, 0.10]


def _worked(p: float = 0.6, rho: float = 0.5, min_visual_mass: float = 0.2, has_sink: bool = True):
    sink = torch.tensor([[1, 0, 0, 1, 0, 0, 0, 0]], dtype=torch.bool)
    visual = torch.tensor([[0, 0, 1, 1, 1, 1, 1, 0]], dtype=torch.bool)
    labels = group_labels(sink, visual)
    q = torch.ones(1, 1, 1, 1)
    k = torch.tensor(ALPHA).log().view(1, 1, 8, 1)  # scores = ln α: softmax gives α back
    v = torch.arange(8, dtype=torch.float32).view(1, 1, 8, 1)  # value of key j = j
    selected: list[torch.Tensor] = []

    def coefficients(m: torch.Tensor) -> torch.Tensor:
        c, sel = var_coefficients(
            m, p=p, rho=rho, min_visual_mass=min_visual_mass, n_visual=torch.tensor([5.0]),
            has_visual_sink=torch.tensor([has_sink]),
        )  # fmt: skip
        selected.append(sel)
        return c

    return q, k, v, labels, coefficients, selected


def test_worked_row() -> None:
    q, k, v, labels, coefficients, selected = _worked()
    assert labels.tolist() == [
        [LABEL_ST, LABEL_OTHER, LABEL_NV, LABEL_SV, LABEL_NV, LABEL_NV, LABEL_NV, LABEL_OTHER]
    ]
    out, probs = group_reweight_reference(q, k, v, None, 1.0, labels, coefficients, return_probs=True)
    assert bool(selected[-1].all())
    torch.testing.assert_close(probs.flatten(), torch.tensor(EXPECTED_ROW), atol=1e-6, rtol=0)
    assert abs(probs.sum().item() - 1.0) < 1e-6
    masses = [probs.flatten()[labels[0] == g].sum().item() for g in range(4)]  # (O, Sv, St, Nv)
    assert masses == pytest.approx([0.15, 0.15, 0.18, 0.52], abs=1e-6)
    assert out.item() == pytest.approx(3.453333, abs=1e-5)
    stock, _ = attention_with_lse(q, k, v, None, 1.0)
    assert stock.item() == pytest.approx(2.80, abs=1e-5)
    for impl in ("fused", "auto"):
        fused = dispatch.reweighted_attention(q, k, v, None, 1.0, labels, coefficients, impl=impl)
        assert fused.item() == pytest.approx(3.453333, abs=1e-5)


@pytest.mark.parametrize(
    "kwargs", [{"rho": 0.6}, {"min_visual_mass": 0.6}, {"has_sink": False}, {"p": 1.0}], ids=str
)
def test_worked_row_unselected_rows_are_unchanged(kwargs: dict) -> None:
    q, k, v, labels, coefficients, selected = _worked(**kwargs)
    out, probs = group_reweight_reference(q, k, v, None, 1.0, labels, coefficients, return_probs=True)
    if "p" not in kwargs:
        assert not bool(selected[-1].any())
    torch.testing.assert_close(probs.flatten(), torch.tensor(ALPHA), atol=1e-7, rtol=0)
    fused = dispatch.reweighted_attention(q, k, v, None, 1.0, labels, coefficients, impl="fused")
    assert fused.item() == pytest.approx(2.80, abs=1e-5)


def test_worked_row_p0_zeroes_sinks() -> None:
    q, k, v, labels, coefficients, _ = _worked(p=0.0)
    _, probs = group_reweight_reference(q, k, v, None, 1.0, labels, coefficients, return_probs=True)
    row = probs.flatten()
    assert row[0].item() == 0.0 and row[3].item() == 0.0
    assert abs(row.sum().item() - 1.0) < 1e-6


# ------------------------------------------------------------------------------------------------------
# Checks 2-3: invariants of the edited probabilities on a tiny model (eager reference, probabilities visible)


class Spy:
    """Replace the dispatcher: run the eager reference with probabilities and keep them per call."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.records: list[dict[str, Any]] = []
        self.real = dispatch.reweighted_attention
        monkeypatch.setattr(dispatch, "reweighted_attention", self)

    def __call__(self, query, key, value, mask, scale, labels, coefficients, rows=None, renormalize=False,
                 base_out=None, num_groups=None, impl="auto", rule=None, base_lse=None, causal=False):  # fmt: skip
        if callable(base_out):  # the backend's output, computed on demand
            base_out = base_out()
        if causal:  # unpadded prefill: the caller leaves the triangle implicit
            assert mask is None
            mask = causal_mask(query.shape[2], key.shape[2], query.device)
        out, new = group_reweight_reference(
            query,
            key,
            value,
            mask,
            scale,
            labels,
            coefficients,
            rows=rows,
            base_out=base_out,
            return_probs=True,
        )
        _, old = eager_attention(query, key, value, mask, scale)
        self.records.append({"labels": labels, "rows": rows, "old": old, "new": new, "mask": mask})
        return out


def check_invariants(
    rec: dict[str, Any], p: float, rho: float, min_visual_mass: float, skip: bool = True
) -> dict:
    """Assert checks 2-3 on one recorded call; returns counts of selected / eligible-unselected rows."""
    old, new, labels = rec["old"], rec["new"], rec["labels"]
    b, h, lq, lk = old.shape
    lab = torch.nn.functional.pad(labels, (0, lk - labels.shape[1]))[:, None, None, :].expand(b, h, lq, lk)
    onehot = torch.nn.functional.one_hot(lab, 4).float()
    m = (old[..., None] * onehot).sum(-2)  # masses (O, Sv, St, Nv) [B, H, Lq, 4]
    n_vis = ((labels == LABEL_SV) | (labels == LABEL_NV)).sum(1).float()[:, None, None]
    visual = m[..., LABEL_SV] + m[..., LABEL_NV]
    share = m[..., LABEL_SV] / (visual + n_vis * 1e-6)
    expect = (visual >= min_visual_mass) & (share <= 1 - rho) & (m[..., LABEL_NV] > 0)
    if skip:
        expect &= (labels == LABEL_SV).any(1)[:, None, None]
    rows = rec["rows"]
    eligible = torch.ones(b, lq, dtype=torch.bool) if rows is None else rows
    expect &= eligible[:, None, :]
    changed = (new != old).any(-1)
    assert torch.equal(changed, expect & (m[..., LABEL_SV] + m[..., LABEL_ST] > 0) & (p != 1.0))
    # unselected rows (ineligible, small visual mass, low non-sink share, no visual sink): bit-identical
    assert torch.equal(new[~expect], old[~expect])
    sel = expect
    if bool(sel.any()):
        o, n_, lb = old[sel], new[sel], lab[sel]
        assert (n_.sum(-1) - 1).abs().max() < 1e-6  # rows sum to 1
        sinks = (lb == LABEL_SV) | (lb == LABEL_ST)
        torch.testing.assert_close(n_[sinks], p * o[sinks], atol=1e-7, rtol=1e-6)  # sinks × p
        other = lb == LABEL_OTHER
        assert torch.equal(n_[other], o[other])  # text non-sinks, masked and decoded keys unchanged
        nv = (lb == LABEL_NV) & (o > 0)  # masked visual keys (a later image) stay 0
        ratio = torch.where(nv, n_ / o.clamp_min(1e-30), torch.zeros_like(o))
        omega = (1 - p) * (m[..., LABEL_SV] + m[..., LABEL_ST])[sel]
        factor = 1 + omega / m[..., LABEL_NV][sel]
        torch.testing.assert_close(ratio[nv], factor[:, None].expand_as(ratio)[nv], atol=1e-5, rtol=1e-5)
        if p == 0.0:
            assert bool((n_[sinks] == 0).all())
    masked = rec["mask"].expand_as(old) if rec["mask"] is not None else torch.ones_like(old, dtype=torch.bool)
    assert bool((new[~masked] == 0).all())
    return {"selected": int(sel.sum()), "eligible_unselected": int((eligible[:, None, :] & ~sel).sum())}


@pytest.mark.parametrize(
    "family,params",
    [
        ("qwen2_vl", {}),  # spec defaults: a mix of selected / unselected rows on this model; GQA
        ("llava", {"min_visual_mass": 0.4, "rho": 0.87}),
        ("llava", {"p": 0.0, "min_visual_mass": 0.0, "rho": 0.0}),
    ],
)
def test_probability_invariants(family: str, params: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    model, processor = zoo.load_tiny(family)
    inputs = batch_inputs(processor, family)
    settings = {"p": 0.6, "rho": 0.5, "min_visual_mass": 0.2, **params}
    with Plant(model, no_visual=[2]):  # row 2: a text sink only -> its layers are skipped
        with torch.no_grad():
            plain = model(**inputs, output_hidden_states=True)
        spy = Spy(monkeypatch)
        with steer.apply(model, "var", **VAR, **params) as handle:
            with torch.no_grad():
                steered = model(**inputs, output_hidden_states=True)
            prefill = list(spy.records)
            generate(model, inputs, max_new_tokens=2)
            decode = spy.records[len(prefill) * 2 :]
            assert handle.state["var"]["layers"] == [2, 3]
            for layer in (2, 3):
                assert handle.state["var"]["samples"][2][layer]["skipped"]
                assert handle.state["var"]["samples"][2][layer]["visual_sinks"] == []
                assert not handle.state["var"]["samples"][0][layer]["skipped"]
    assert len(prefill) == 2 and len(decode) == 2  # layers 2 and 3 only, prefill and one decode step
    totals = {"selected": 0, "eligible_unselected": 0}
    for rec in prefill + decode:
        got = check_invariants(rec, settings["p"], settings["rho"], settings["min_visual_mass"])
        for k in totals:
            totals[k] += got[k]
        # row 2 has no visual sink: untouched everywhere
        assert torch.equal(rec["new"][2], rec["old"][2])
    assert totals["selected"] > 0
    if settings["min_visual_mass"] > 0:
        assert totals["eligible_unselected"] > 0
    # layers 0-1 untouched: the input of layer 2 is bit-identical, the output changes
    for i in range(3):
        assert torch.equal(steered.hidden_states[i], plain.hidden_states[i])
    assert (steered.logits - plain.logits)[real(inputs)].abs().max() > 1e-4


def test_exclude_last_layer(monkeypatch: pytest.MonkeyPatch) -> None:
    model, processor = zoo.load_tiny("llava")
    inputs = batch_inputs(processor, "llava")
    spy = Spy(monkeypatch)
    adapter = adapter_for(model)
    with Plant(model), steer.apply(model, "var", **VAR, exclude_last_layer=True) as handle:
        logits(model, inputs)
        assert handle.state["var"]["layers"] == [2]
        assert hasattr(adapter.attention(2), "_steer_layer")
        assert not any(hasattr(adapter.attention(i), "_steer_layer") for i in (0, 1, 3))
    assert len(spy.records) == 1


# ------------------------------------------------------------------------------------------------------
# Check 4: p = 1 is the identity


def test_p1_is_bit_identical() -> None:
    model, processor = zoo.load_tiny("llava")
    inputs = batch_inputs(processor, "llava")
    with Plant(model):
        ref_logits, ref_tokens = logits(model, inputs), generate(model, inputs)
        with steer.apply(model, "var", **VAR, p=1.0) as handle:
            assert handle.edits == []
            assert torch.equal(logits(model, inputs), ref_logits)
            assert torch.equal(generate(model, inputs), ref_tokens)
        with steer.apply(model, "var", p=1.0) as handle:  # nothing to detect: no sink_dims needed
            assert handle.edits == []
        with steer.apply(model, "var", **VAR, rho=0.0, min_visual_mass=0.0):  # and p < 1 really acts
            assert (logits(model, inputs) - ref_logits)[real(inputs)].abs().max() > 1e-3


# ------------------------------------------------------------------------------------------------------
# Check 5: fused == eager reference; batch = per sample; beams


@pytest.mark.parametrize("family", FAMILIES)
def test_fused_matches_reference(family: str, monkeypatch: pytest.MonkeyPatch) -> None:
    model, processor = zoo.load_tiny(family)  # sdpa
    inputs = batch_inputs(processor, family)  # 3 rows, left padded
    assert len(set(inputs["attention_mask"].sum(1).tolist())) == 3
    params = {**VAR, "rho": 0.2, "min_visual_mass": 0.1}
    diffs: dict[str, list[float]] = {"prefill": [], "decode": []}
    real_dispatch = dispatch.reweighted_attention

    with Plant(model):
        ref = logits(model, inputs)
        per_impl = {}
        for impl in ("fused", "reference"):
            with steer.apply(model, "var", **params, impl=impl) as handle:
                per_impl[impl] = logits(model, inputs)
                counts = {
                    (b, layer): handle.state["var"]["samples"][b][layer]["selected_rows"].clone()
                    for b in range(3) for layer in (2, 3)
                }  # fmt: skip
                per_impl[impl + "_counts"] = counts
        assert (per_impl["fused"] - ref)[real(inputs)].abs().max() > 1e-4  # the edit acts
        torch.testing.assert_close(per_impl["fused"], per_impl["reference"], atol=1e-5, rtol=0)
        assert per_impl["fused_counts"].keys() == per_impl["reference_counts"].keys()
        for key, value in per_impl["fused_counts"].items():
            assert torch.equal(value, per_impl["reference_counts"][key]), key
        assert sum(int(v.sum()) for v in per_impl["fused_counts"].values()) > 0

        def both(query, key, value, mask, scale, labels, coefficients, **kw):
            kw.pop("impl", None)
            fused = real_dispatch(query, key, value, mask, scale, labels, coefficients, impl="fused", **kw)
            eager = real_dispatch(
                query, key, value, mask, scale, labels, coefficients, impl="reference", **kw
            )
            phase = "prefill" if query.shape[2] > 1 else "decode"
            diffs[phase].append(float((fused.float() - eager.float()).abs().max()))
            return fused

        monkeypatch.setattr(dispatch, "reweighted_attention", both)
        with steer.apply(model, "var", **params):
            generate(model, inputs, max_new_tokens=3)
    assert len(diffs["prefill"]) == 2 and len(diffs["decode"]) == 4
    assert max(diffs["prefill"] + diffs["decode"]) < 1e-5


@pytest.mark.parametrize("family", ["llava", "qwen2_5_vl"])
def test_batch_equals_per_sample(family: str) -> None:
    model, processor = zoo.load_tiny(family)
    inputs = batch_inputs(processor, family, n=3)
    pads = (inputs["attention_mask"] == 0).sum(1).tolist()
    with Plant(model, padding=True), steer.apply(model, "var", **VAR, rho=0.2, min_visual_mass=0.1) as handle:
        batch = generate(model, inputs, max_new_tokens=5)
        batch_state = [sink_positions(handle, b) for b in range(3)]
        for i in range(3):
            alone = generate(model, row_inputs(processor, family, i), max_new_tokens=5)
            assert torch.equal(batch[i], alone[0]), f"row {i}"
            vis, txt = sink_positions(handle, 0)
            assert batch_state[i] == ([j + pads[i] for j in vis], [j + pads[i] for j in txt])
        beams = generate(model, inputs, num_beams=3, max_new_tokens=4)
        assert beams.shape == (3, 4)
        assert len(handle.state["var"]["samples"]) == 9  # one state row per beam row
        alone = generate(model, row_inputs(processor, family, 1), num_beams=3, max_new_tokens=4)
        assert torch.equal(beams[1], alone[0])


# ------------------------------------------------------------------------------------------------------
# Check 6: sinks are recomputed per sample (the official reset bug)


def test_sinks_recomputed_per_call() -> None:
    model, processor = zoo.load_tiny("llava")
    first, second = row_inputs(processor, "llava", 0), row_inputs(processor, "llava", 1)
    with Plant(model) as plant, steer.apply(model, "var", **VAR, rho=0.0, min_visual_mass=0.0) as handle:
        plant.ranks = (1, 3)
        generate(model, first)
        sinks_first = sink_positions(handle, 0)
        plant.ranks = (6, 9, 12)
        tokens_second = generate(model, second)
        sinks_second = sink_positions(handle, 0)
    image_start = int((second["input_ids"][0] == model.config.image_token_id).nonzero()[0])
    assert sinks_second[0] == [image_start + r - 1 for r in (6, 9, 12)]
    assert len(sinks_first[0]) == 2 and sinks_first[0] != sinks_second[0]
    with Plant(model, ranks=(6, 9, 12)), steer.apply(model, "var", **VAR, rho=0.0, min_visual_mass=0.0):
        assert torch.equal(generate(model, second), tokens_second)  # a fresh handle agrees


# ------------------------------------------------------------------------------------------------------
# Check 7: the fused path never builds a [B, H, T, T] probability tensor


class LargestScores(TorchDispatchMode):
    def __init__(self, heads: int, length: int) -> None:
        super().__init__()
        self.shape = (heads, length, length)
        self.found = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if (
                isinstance(t, torch.Tensor)
                and t.is_floating_point()
                and t.dim() == 4
                and tuple(t.shape[1:]) == self.shape
            ):
                self.found += 1
        return out


def test_fused_path_builds_no_probability_matrix() -> None:
    model, processor = zoo.load_tiny("qwen2_vl")
    inputs = batch_inputs(processor, "qwen2_vl")
    length, heads = inputs["input_ids"].shape[1], model.config.text_config.num_attention_heads
    with Plant(model):
        found = {}
        for impl in ("auto", "reference"):
            with steer.apply(model, "var", **VAR, impl=impl), LargestScores(heads, length) as mode:
                logits(model, inputs)
            found[impl] = mode.found
    assert found["reference"] > 0  # the detector sees the eager reference's probabilities
    assert found["auto"] == 0


# ------------------------------------------------------------------------------------------------------
# parameters, errors, recipes


def test_missing_sink_dims_and_bad_parameters() -> None:
    model, _ = zoo.load_tiny("llava")
    with pytest.raises(steer.InvalidParameterError, match="steer calibrate sinks"):
        steer.apply(model, "var")
    with pytest.raises(steer.InvalidParameterError, match=r"sink_dims \[64\] out of range"):
        steer.apply(model, "var", sink_dims=[3, 64])
    with pytest.raises(steer.InvalidParameterError, match="tau"):
        steer.apply(model, "var", sink_dims=[3], tau=0.0)
    with pytest.raises(steer.InvalidParameterError, match="out of range"):
        steer.apply(model, "var", sink_dims=[3], rho=1.5)
    text_only = zoo.make_inputs(
        zoo.load_processor(zoo.tiny_path("llava")), "llava", [zoo.chat_prompt("llava", "Hi", 0)]
    )
    with steer.apply(model, "var", sink_dims=[3]), pytest.raises(steer.MissingImageTokensError):
        logits(model, text_only)
    with steer.apply(model, steer.recipe("llava-1.5/var"), sink_dims=[C], tau=TAU) as handle:
        params = handle.params["var"]
        assert (params["p"], params["rho"], params["min_visual_mass"], params["sink_dims"]) == (
            0.6,
            0.5,
            0.2,
            [C],
        )


def test_known_sink_dims_from_recipes() -> None:
    assert known_sink_dims("llava", 4096, 32, "llama")[0] == [1415, 2533]
    assert known_sink_dims("llava", 5120, 40, "llama")[0] == [2100, 4743]
    assert known_sink_dims("llava_next", 5120, 40, "llama")[0] == [2100, 4743]
    assert known_sink_dims("llava_next", 4096, 32, "mistral") is None  # mistral-7b: calibrate
    assert known_sink_dims("qwen2_vl", 3584, 28, "qwen2_vl_text")[0] == [458, 2570]
    assert known_sink_dims("qwen2_5_vl", 3584, 28, "qwen2_5_vl_text") is None
    assert known_sink_dims("llava", 64, 4, "llama") is None


# ------------------------------------------------------------------------------------------------------
# calibration


def planted_calibration_model(channel: int, family: str = "llava") -> tuple[torch.nn.Module, Any]:
    """The spec's acceptance setup: at layers >= 2, 100·RMS is added to ``channel`` of the first token and of
    3 visual tokens."""
    model, processor = zoo.load_tiny(family)
    adapter = adapter_for(model)
    seen: dict[str, torch.Tensor] = {}

    def capture(module, args, kwargs):
        seen["ids"] = kwargs["input_ids"]

    def plant(module, args, kwargs):
        x = args[0] if args else kwargs["hidden_states"]
        ids = seen["ids"]
        image = adapter.image_token_mask(ids)
        where = image & (image.long().cumsum(1) <= 3)
        where[:, 0] = True
        x = x.clone()
        x[..., channel] += 100 * x.float().pow(2).mean(-1).sqrt() * where
        return ((x, *args[1:]), kwargs) if args else (args, {**kwargs, "hidden_states": x})

    model.register_forward_pre_hook(capture, with_kwargs=True)
    for layer in range(2, adapter.num_layers):
        adapter.decoder_layers[layer].register_forward_pre_hook(plant, with_kwargs=True)
    return model, processor


def test_calibration_finds_the_planted_channel(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from typer.testing import CliRunner

    from steer.cli import app
    from steer.recipe_files import recipes_dir

    channel = 37
    model, processor = planted_calibration_model(channel)
    result = calibration.calibrate_sinks(
        model, processor, [zoo.sample_image(i) for i in range(4)], tau=TAU, progress=False
    )
    assert result.sink_dims == [channel]
    assert result.channels[0].count == 4 * 2 and result.channels[0].median_z > TAU
    assert all(abs(f - 3 / 16) < 1e-6 for f in result.visual_sink_fraction.values())  # 3 of 16 visual tokens
    assert result.warnings == []
    plain, _ = zoo.load_tiny("llava")
    assert (
        calibration.calibrate_sinks(
            plain, processor, [zoo.sample_image(0)], tau=TAU, progress=False
        ).sink_dims
        == []
    )

    # the CLI writes the recipe into a copy of the recipe folder; VAR then finds the channel by itself
    folder = tmp_path / "recipes"
    folder.mkdir()
    for path in recipes_dir().glob("*.yaml"):
        (folder / path.name).write_text(path.read_text())
    images = tmp_path / "images"
    images.mkdir()
    for i in range(5):
        zoo.sample_image(i).save(images / f"{i:02d}.png")
    monkeypatch.setattr(calibration, "_load_model", lambda path, device, dtype: (model, processor))
    target = folder / "llava-1.5.yaml"
    before = target.read_text()
    run = CliRunner().invoke(
        app, ["calibrate", "sinks", "--model", "/models/tiny-llava", "--images", str(images), "--n", "4",
              "--tau", str(TAU), "--out", str(target)],
    )  # fmt: skip
    assert run.exit_code == 0, run.output
    after = target.read_text()
    assert after.startswith(before)  # appended: comments and other recipes untouched
    entry = yaml.safe_load(after)["recipes"]["var-calibrated-tiny-llava"]
    assert entry["methods"]["var"]["sink_dims"] == [channel]
    assert entry["calibration"]["n"] == 4 and entry["calibration"]["model"] == "/models/tiny-llava"
    monkeypatch.setattr("steer.recipe_files.recipes_dir", lambda: folder)
    fresh, _ = zoo.load_tiny("llava")
    with steer.apply(fresh, "var", tau=TAU) as handle:
        assert handle.params["var"]["sink_dims"] == [channel]
        assert "var-calibrated-tiny-llava" in handle.state["var"]["sink_dims_source"]


@pytest.mark.parametrize("family", ["llava_next", "qwen2_vl", "qwen2_5_vl"])
def test_calibration_other_families(family: str) -> None:
    model, processor = planted_calibration_model(11, family)
    images = [zoo.sample_image(i) for i in range(3)]
    result = calibration.calibrate_sinks(model, processor, images, tau=TAU, progress=False)
    assert result.sink_dims == [11]
    assert result.family == adapter_for(model).family and result.num_layers == 4


def test_two_images_groups_and_rows(monkeypatch: pytest.MonkeyPatch) -> None:
    """Several images: vis is the union of the spans; eligible rows are the text rows after the first image."""
    model, processor = zoo.load_tiny("llava")
    prompt = "USER: <image>\nLeft and <image>\nright: what differs? ASSISTANT:"
    inputs = zoo.make_inputs(processor, "llava", [prompt], [[zoo.sample_image(1), zoo.sample_image(2)]])
    ids = inputs["input_ids"][0]
    image = ids == model.config.image_token_id
    assert int(image.sum()) == 32
    spy = Spy(monkeypatch)
    with (
        Plant(model, ranks=(2, 20)),
        steer.apply(model, "var", **VAR, rho=0.0, min_visual_mass=0.0) as handle,
    ):
        logits(model, inputs)
        first = int(image.nonzero()[0])
        vis, txt = sink_positions(handle, 0)
    positions = image.nonzero().flatten().tolist()
    assert vis == [positions[1], positions[19]]  # one sink in each image
    rec = spy.records[0]
    visual = (rec["labels"][0] == LABEL_SV) | (rec["labels"][0] == LABEL_NV)
    assert torch.equal(visual, image)
    expected_rows = (torch.arange(len(ids)) > first) & ~image
    assert torch.equal(rec["rows"][0], expected_rows)
    assert bool(expected_rows[positions[15] + 1 : positions[16]].all())  # the text between the two images
    check_invariants(rec, 0.6, 0.0, 0.0)
