"""VCD and M3ID: the checks of shared/specs/vcd.md on the tiny zoo models.

The formulas on the spec's worked examples; the noise for ``seed=42``; the distorted branch against a cache-free
recomputation on the distorted image at every step (greedy with a left-padded batch, beams, sampling); batched
== sequential branch; batch == per sample; identities, reproducibility, typed refusals, exact ``remove()``.
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from baselines_helpers import (
    Prefixes,
    batched_mode,
    distorted_inputs,
    expand_rows,
    model_fingerprint,
    no_cache_logits,
    same_fingerprint,
    text_only_logits,
)
from conftest import ALL_FAMILIES
from helpers import batch_inputs, generate, row_inputs

import steer
from steer import zoo
from steer.errors import DecodingModeError, InvalidParameterError, MissingImageTokensError
from steer.methods.vlm import vcd as vcd_module
from steer.methods.vlm.vcd import contrast, diffuse, m3id, m3id_weight, noise_schedule

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: one intra-op thread for tiny models


def halve(x: torch.Tensor, generator: object = None) -> torch.Tensor:
    """A deterministic distortion (tests compare against recomputations)."""
    return x * 0.5 + 0.25


@pytest.fixture
def recorder(monkeypatch: pytest.MonkeyPatch) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(clean logits, distorted-branch logits) of every contrast VCD computes."""
    seen: list[tuple[torch.Tensor, torch.Tensor]] = []
    real = vcd_module.contrast

    def record(logits: torch.Tensor, negative: torch.Tensor, alpha: float, beta: float) -> torch.Tensor:
        seen.append((logits.detach().clone(), negative.detach().clone()))
        return real(logits, negative, alpha, beta)

    monkeypatch.setattr(vcd_module, "contrast", record)
    return seen


# ---- checks 1-2, 7: the formulas -------------------------------------------------------------------------


def test_noise_schedule_and_diffusion() -> None:
    for step, keep, mix in ((0, 0.9999889, 0.0047278), (500, 0.8630173, 0.5051745), (999, 0.2850425, 0.9585149)):
        a, b = noise_schedule(step)
        assert abs(a - keep) < 2e-6 and abs(b - mix) < 2e-6
    out = diffuse(torch.tensor([1.0, -1.0]), torch.tensor([0.5, 2.0]), 500)
    assert torch.allclose(out, torch.tensor([1.115604, 0.147332]), atol=2e-6)
    half = diffuse(torch.tensor([1.0], dtype=torch.float16), torch.tensor([0.5]), 500)
    assert half.dtype == torch.float16  # cast back to the pixel dtype


def test_contrast_worked_example() -> None:
    clean = torch.tensor([2.0, 1.8, 0.0, -3.0, -2.5])
    neg = torch.tensor([2.5, 0.5, 0.0, -3.0, -9.0])
    assert abs((math.log(0.1) + 2.0) - (-0.302585)) < 1e-6
    c = contrast(clean, neg, 1.0, 0.1)
    assert torch.allclose(c[:3], torch.tensor([1.5, 3.1, 0.0])) and torch.isinf(c[3:]).all()
    assert torch.allclose(torch.softmax(c, -1), torch.tensor([0.161913, 0.801960, 0.036128, 0.0, 0.0]), atol=1e-6)
    assert int(c.argmax()) == 1 and int(clean.argmax()) == 0
    assert float(contrast(clean, neg, 1.0, 0.0)[4]) == pytest.approx(4.0)  # token 4 unmasked
    same = contrast(torch.log_softmax(clean, -1), torch.log_softmax(neg, -1), 1.0, 0.1)
    assert torch.allclose(torch.softmax(same, -1), torch.softmax(c, -1), atol=1e-6)
    half = contrast(clean, neg, 0.5, 0.1)
    assert torch.allclose(half[:3], torch.tensor([1.75, 2.45, 0.0])) and torch.isinf(half[3:]).all()
    only = contrast(clean, neg, 1.0, 1.0)  # beta 1: the argmax of clean only
    assert torch.isfinite(only).sum() == 1 and int(only.argmax()) == int(clean.argmax())


def test_m3id_worked_example() -> None:
    assert m3id_weight(50, 0.02) == pytest.approx(1.718282, abs=1e-6)
    assert m3id_weight(35, 0.02) == pytest.approx(1.01, abs=5e-3) and m3id_weight(200, 0.02) == pytest.approx(53.6, abs=0.05)
    clean = torch.tensor([0.5, 0.4, 0.3, 0.2, 0.1])
    lu = torch.tensor([0.9, 0.1, 0.3, 0.2, 0.1])
    assert float(torch.softmax(clean, -1).max()) == pytest.approx(0.2419, abs=1e-4)
    out = m3id(clean, lu, m3id_weight(50, 0.02), 0.3)
    assert torch.allclose(out, torch.tensor([-0.187313, 0.915485, 0.3, 0.2, 0.1]), atol=1e-6) and int(out.argmax()) == 1
    confident = torch.tensor([3.0, 0.4, 0.3, 0.2, 0.1])
    assert torch.equal(m3id(confident, lu, 1.718282, 0.3), confident)  # p_max 0.795: gate closed
    with pytest.raises(OverflowError):
        m3id_weight(10**6, 1.0)


# ---- check 5: the noise ------------------------------------------------------------------------------------


def test_seed_42_noise_is_torch_randn_sequence() -> None:
    model, processor = zoo.load_tiny("llava")
    inputs = batch_inputs(processor, "llava", n=2)
    tower = model.model.vision_tower
    seen: list[torch.Tensor] = []
    hook = tower.register_forward_pre_hook(lambda m, a, k: seen.append((a[0] if a else k["pixel_values"]).clone()), with_kwargs=True)
    try:
        with steer.apply(model, "vcd", seed=42):
            generate(model, inputs, max_new_tokens=1)
            generate(model, inputs, max_new_tokens=1)  # the generator advances image by image across calls
    finally:
        hook.remove()
    keep, mix = noise_schedule(500)
    clean = inputs["pixel_values"]
    noisy = [seen[0], seen[2]]  # per call: the distorted encoding first, then the clean one
    assert torch.equal(seen[1], clean) and torch.equal(seen[3], clean)
    torch.manual_seed(42)
    expected = [torch.randn(3, 56, 56) for _ in range(4)]
    for call, x in enumerate(noisy):
        for k in range(2):
            eps = (x[k].float() - keep * clean[k].float()) / mix
            assert (eps - expected[2 * call + k]).abs().max() < 1e-4


def test_qwen_noise_equal_over_temporal_copies_and_rope_deltas_untouched() -> None:
    model, processor = zoo.load_tiny("qwen2_vl")
    inputs = row_inputs(processor, "qwen2_vl", 0)
    seen: list[torch.Tensor] = []
    hook = model.model.visual.register_forward_pre_hook(lambda m, a, k: seen.append((a[0] if a else k["hidden_states"]).clone()), with_kwargs=True)
    generate(model, inputs, max_new_tokens=2)
    deltas = model.model.rope_deltas.clone()
    try:
        with steer.apply(model, "vcd", seed=1):
            generate(model, inputs, max_new_tokens=2)
            assert torch.equal(model.model.rope_deltas, deltas)
    finally:
        hook.remove()
    cfg = model.config.vision_config
    noisy = seen[1].reshape(seen[1].shape[0], cfg.in_channels, cfg.temporal_patch_size, cfg.patch_size, cfg.patch_size)
    assert torch.equal(noisy[:, :, 0], noisy[:, :, 1]) and not torch.equal(seen[1], seen[2])


# ---- check 3: identities --------------------------------------------------------------------------------


def test_alpha_and_beta_zero_install_nothing_and_alpha_zero_keeps_greedy() -> None:
    model, processor = zoo.load_tiny("llava")
    inputs = batch_inputs(processor, "llava")
    base = generate(model, inputs, max_new_tokens=6)
    before = model_fingerprint(model)
    with pytest.warns(UserWarning, match="nothing is installed"):
        handle = steer.apply(model, "vcd", alpha=0.0, beta=0.0)
    assert handle.edits == [] and torch.equal(generate(model, inputs, max_new_tokens=6), base)
    handle.remove()
    with steer.apply(model, "vcd", alpha=0.0) as handle:  # beta 0.1 mask only: no branch
        assert not any(type(e).__name__ == "SourceRun" for e in handle.edits)
        assert torch.equal(generate(model, inputs, max_new_tokens=6), base)
    assert same_fingerprint(before, model_fingerprint(model))


@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_remove_is_bit_exact(family: str) -> None:
    model, processor = zoo.load_tiny(family)
    inputs = batch_inputs(processor, family, n=2)
    with torch.no_grad():
        base = model(**inputs).logits
    generate(model, inputs, max_new_tokens=1)  # transformers installs its output-capturing hooks lazily
    before = model_fingerprint(model)
    handle = steer.apply(model, "vcd", seed=0)
    steered = generate(model, inputs, max_new_tokens=3)
    handle.remove()
    assert steered.shape[1] == 3
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, base)
    assert same_fingerprint(before, model_fingerprint(model))
    assert "generate" not in model.__dict__ and "_prepare_generation_config" not in model.__dict__


# ---- check 4: the branch equals a cache-free recomputation ---------------------------------------------------


@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_branch_equals_no_cache_recomputation_greedy_left_padded(family: str, recorder: list) -> None:
    model, processor = zoo.load_tiny(family)
    inputs = batch_inputs(processor, family, n=3)
    prefixes = Prefixes()
    with steer.apply(model, "vcd", distortion=halve):
        out = model.generate(**inputs, max_new_tokens=4, min_new_tokens=4, do_sample=False, logits_processor=[prefixes])
    noisy = distorted_inputs(model, inputs, halve)
    assert len(recorder) == 4
    for (clean, negative), seq in zip(recorder, prefixes.seen):
        assert (negative[:, -1] - no_cache_logits(model, noisy, seq)).abs().max() < 1e-5
        assert (clean[:, -1] - no_cache_logits(model, inputs, seq)).abs().max() < 1e-5
    assert out.shape[1] == inputs["input_ids"].shape[1] + 4


@pytest.mark.parametrize("mode", ["beams", "sampling"])
def test_branch_equals_no_cache_recomputation_beams_and_sampling(mode: str, recorder: list) -> None:
    model, processor = zoo.load_tiny("llava")
    inputs = batch_inputs(processor, "llava", n=2)
    prefixes = Prefixes()
    kw = {"num_beams": 3} if mode == "beams" else {"do_sample": True, "top_k": 0}
    torch.manual_seed(3)
    with steer.apply(model, "vcd", distortion=halve):
        model.generate(**inputs, max_new_tokens=4, min_new_tokens=4, logits_processor=[prefixes], **kw)
    expand = 3 if mode == "beams" else 1
    rows = torch.arange(2).repeat_interleave(expand)
    noisy = expand_rows(distorted_inputs(model, inputs, halve), rows)
    for (_, negative), seq in zip(recorder, prefixes.seen):
        assert (negative[:, -1] - no_cache_logits(model, noisy, seq)).abs().max() < 1e-5


@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_batched_branch_equals_sequential(family: str, recorder: list) -> None:
    model, processor = zoo.load_tiny(family)
    inputs = batch_inputs(processor, family, n=3)
    runs = {}
    batched = batched_mode(model, inputs, family, "vcd")
    for batch in (batched, "sequential"):
        recorder.clear()
        with steer.apply(model, "vcd", distortion=halve, batch=batch):
            tokens = generate(model, inputs, max_new_tokens=4)
        runs[batch] = (tokens, [(c.clone(), n.clone()) for c, n in recorder])
    assert torch.equal(runs[batched][0], runs["sequential"][0])
    for (c1, n1), (c2, n2) in zip(runs[batched][1], runs["sequential"][1]):
        assert (c1 - c2).abs().max() < 1e-5 and (n1 - n2).abs().max() < 1e-5


@pytest.mark.parametrize("family", ["llava", "qwen2_5_vl"])
def test_batch_equals_each_sample_alone(family: str) -> None:
    model, processor = zoo.load_tiny(family)
    inputs = batch_inputs(processor, family, n=3)
    with steer.apply(model, "vcd", distortion=halve, alpha=3.0):
        together = generate(model, inputs, max_new_tokens=5)
        alone = [generate(model, row_inputs(processor, family, i), max_new_tokens=5) for i in range(3)]
    for i in range(3):
        assert torch.equal(together[i], alone[i][0])


def test_beams_and_seeded_sampling_reproducible() -> None:
    model, processor = zoo.load_tiny("llava")
    inputs = batch_inputs(processor, "llava", n=2)
    outs = []
    for _ in range(2):
        with steer.apply(model, "vcd", seed=7, alpha=2.0):
            beams = generate(model, inputs, max_new_tokens=4, num_beams=3)
            torch.manual_seed(11)
            with torch.no_grad():
                sampled = model.generate(**inputs, do_sample=True, max_new_tokens=4, min_new_tokens=4)
        outs.append((beams, sampled))
    assert torch.equal(outs[0][0], outs[1][0]) and torch.equal(outs[0][1], outs[1][1])


def test_vcd_changes_greedy_tokens_and_records_state() -> None:
    model, processor = zoo.load_tiny("llava")
    inputs = batch_inputs(processor, "llava")
    base = generate(model, inputs, max_new_tokens=6)
    with steer.apply(model, "vcd", alpha=5.0, beta=0.5, seed=0) as handle:
        out = generate(model, inputs, max_new_tokens=6)
        state = handle.state["vcd"]
    assert not torch.equal(out, base)  # greedy is steered too (the official code: sampling only)
    assert state["noise_step"] == 500 and state["seed"] == 0 and len(state["plausible"]) == 6
    assert all(1 <= n <= model.config.text_config.vocab_size for step in state["plausible"] for n in step)


# ---- M3ID -------------------------------------------------------------------------------------------------


def test_m3id_branch_is_the_image_free_prompt(monkeypatch: pytest.MonkeyPatch) -> None:
    model, processor = zoo.load_tiny("qwen2_vl")
    inputs = batch_inputs(processor, "qwen2_vl", n=2)
    seen: list[tuple[torch.Tensor, float]] = []
    real = vcd_module.m3id

    def record(logits: torch.Tensor, uncond: torch.Tensor, weight: float, gate: float, beta: float = 0.0) -> torch.Tensor:
        seen.append((uncond.clone(), weight))
        return real(logits, uncond, weight, gate, beta)

    monkeypatch.setattr(vcd_module, "m3id", record)
    prefixes = Prefixes()
    with steer.apply(model, "m3id", lam=0.5, gate=1.0) as handle:
        model.generate(**inputs, max_new_tokens=3, min_new_tokens=3, do_sample=False, logits_processor=[prefixes])
        weights = handle.state["m3id"]["weights"]
    assert weights == pytest.approx([math.expm1(0.5 * t) for t in (1, 2, 3)])
    for (uncond, _), seq in zip(seen, prefixes.seen):
        mask = torch.cat([inputs["attention_mask"], torch.ones(2, seq.shape[1] - inputs["input_ids"].shape[1], dtype=torch.long)], 1)
        assert (uncond - text_only_logits(model, "qwen2_vl", seq, mask)).abs().max() < 1e-5


# ---- typed refusals ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["vcd", "m3id"])
def test_refuses_prompt_without_image_tokens(name: str) -> None:
    model, processor = zoo.load_tiny("llava")
    text = zoo.make_inputs(processor, "llava", ["USER: hello there ASSISTANT:"])
    with steer.apply(model, name), pytest.raises(MissingImageTokensError, match="contain none"):
        generate(model, text, max_new_tokens=2)


def test_bad_input_is_a_typed_error() -> None:
    model, processor = zoo.load_tiny("llava")
    inputs = row_inputs(processor, "llava", 0)
    with steer.apply(model, "vcd", sampling_only=True):
        with pytest.raises(DecodingModeError, match="do_sample=True"):
            generate(model, inputs, max_new_tokens=2)
        torch.manual_seed(0)
        with torch.no_grad():
            model.generate(**inputs, do_sample=True, max_new_tokens=2)  # sampling is fine
    with steer.apply(model, "vcd", distortion=lambda x, g: x[..., :-1]):
        with pytest.raises(InvalidParameterError, match="same shape"):
            generate(model, inputs, max_new_tokens=2)
    for bad in ({"beta": 1.5}, {"beta": -0.1}, {"alpha": -1.0}, {"noise_step": 1000}, {"distortion": "blur"}):
        with pytest.raises(InvalidParameterError):
            steer.apply(model, "vcd", **bad)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        steer.apply(model, "m3id").remove()
    with pytest.raises(InvalidParameterError):
        steer.apply(model, "m3id", gate=2.0)


def test_recipes_hold_the_official_settings() -> None:
    model, _ = zoo.load_tiny("llava")
    for name, expected in (
        ("llava-1.5/vcd", {"alpha": 1.0, "beta": 0.1, "noise_step": 500, "seed": 42}),
        ("llava-1.5/vcd-bash", {"alpha": 1.0, "beta": 0.2, "noise_step": 500, "seed": 55}),
    ):
        with steer.apply(model, steer.recipe(name)) as handle:
            assert {k: handle.params["vcd"][k] for k in expected} == expected
    with steer.apply(model, steer.recipe("llava-1.5/m3id")) as handle:
        assert handle.params["m3id"]["lam"] == 0.02 and handle.params["m3id"]["gate"] == 0.3
    for family in ("llava-next", "qwen2-vl", "qwen2.5-vl"):
        assert steer.recipe(f"{family}/vcd").methods["vcd"]["seed"] == 42


@pytest.mark.parametrize("others", [["vista"], ["vhr"], ["image_attention"]])
def test_composed_methods_act_on_the_callers_rows_only(others: list[str], recorder: list) -> None:
    """With other methods' edits in the decoder (residual transforms, head scaling, key-group reweighting), the
    batched branch (one 2B-row forward) equals the sequential one: their edits never reach the branch's rows."""
    model, processor = zoo.load_tiny("llava")
    inputs = batch_inputs(processor, "llava", n=2)
    runs = {}
    for batch in ("batched", "sequential"):
        recorder.clear()
        with steer.apply(model, [*others, "vcd"], vcd={"distortion": halve, "batch": batch}):
            tokens = generate(model, inputs, max_new_tokens=3)
        runs[batch] = (tokens, [(c.clone(), n.clone()) for c, n in recorder])
    assert torch.equal(runs["batched"][0], runs["sequential"][0])
    for (c1, n1), (c2, n2) in zip(runs["batched"][1], runs["sequential"][1]):
        assert (c1 - c2).abs().max() < 1e-5 and (n1 - n2).abs().max() < 1e-5
