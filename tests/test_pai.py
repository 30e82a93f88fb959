"""PAI: the checks of shared/specs/pai.md on the tiny zoo models.

The worked examples (attention boost through the kernel, the contrast); the boost against the materialised
reference in the model; only the edited row changes; the image-free branch against a hand-built text-only run at
every step (greedy on every family, beams on their own histories); batched == sequential; batch == per sample
(greedy, beams, seeded sampling); identities, the official options, typed refusals, exact ``remove()``.
"""

from __future__ import annotations

import pytest
import torch
from baselines_helpers import (
    Prefixes,
    batched_mode,
    model_fingerprint,
    same_fingerprint,
    sampled_rows_equal_alone,
    text_only_logits,
)
from conftest import ALL_FAMILIES
from helpers import batch_inputs, generate, row_inputs

import steer
from steer import edits, zoo
from steer.adapters import adapter_for
from steer.errors import InvalidParameterError, MissingImageTokensError
from steer.kernels.lse import explicit_score_attention
from steer.kernels.reference import eager_attention, explicit_score_reference
from steer.methods.vlm import pai as pai_module
from steer.methods.vlm.pai import boost, cfg

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: one intra-op thread for tiny models


@pytest.fixture
def recorder(monkeypatch: pytest.MonkeyPatch) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(logits, image-free branch logits) of every contrast PAI computes."""
    seen: list[tuple[torch.Tensor, torch.Tensor]] = []
    real = pai_module.cfg

    def record(logits: torch.Tensor, uncond: torch.Tensor, gamma: float, beta: float) -> torch.Tensor:
        seen.append((logits.detach().clone(), uncond.detach().clone()))
        return real(logits, uncond, gamma, beta)

    monkeypatch.setattr(pai_module, "cfg", record)
    return seen


# ---- worked examples -----------------------------------------------------------------------------------


def test_attention_worked_example() -> None:
    a = torch.tensor([2.0, 1.0, -0.5, 0.5])
    assert torch.allclose(boost(a[1:3], 0.5), torch.tensor([1.5, -0.25]))
    q = torch.ones(1, 1, 1, 1)
    k = a.view(1, 1, 4, 1)
    v = torch.tensor([1.0, 2.0, 3.0, 4.0]).view(1, 1, 4, 1)
    rows, keys = torch.tensor([[True]]), torch.tensor([[False, True, True, False]])
    base, probs = eager_attention(q, k, v, None, 1.0)
    assert torch.allclose(probs.flatten(), torch.tensor([0.597695, 0.219880, 0.049062, 0.133364]), atol=1e-6)
    assert float(base) == pytest.approx(1.718094, abs=1e-6)
    fused = explicit_score_attention(q, k, v, None, 1.0, rows, keys, lambda s: boost(s, 0.5), base)
    reference = explicit_score_reference(q, k, v, None, 1.0, rows, keys, lambda s: boost(s, 0.5))
    assert float(fused) == pytest.approx(1.768307, abs=1e-6) and float(reference) == pytest.approx(1.768307, abs=1e-6)
    edited = torch.softmax(torch.tensor([2.0, 1.5, -0.25, 0.5]), -1)
    assert torch.allclose(edited, torch.tensor([0.516780, 0.313443, 0.054468, 0.115309]), atol=1e-6)
    assert float(edited[1:3].sum()) == pytest.approx(0.367911, abs=1e-6)
    # the LSE merge by hand: the other keys (0, 3) and the boosted image keys (1, 2)
    lse_t, lse_i = torch.logsumexp(torch.tensor([2.0, 0.5]), 0), torch.logsumexp(torch.tensor([1.5, -0.25]), 0)
    assert float(lse_t) == pytest.approx(2.201413, abs=1e-6) and float(lse_i) == pytest.approx(1.660224, abs=1e-6)
    # the wrong forms give other image masses
    post = probs.flatten().clone()
    post[1:3] *= 1.5
    assert float(post[1:3].sum() / post.sum()) == pytest.approx(0.355595, abs=1e-6)
    scaled = a.clone()
    scaled[1:3] *= 1.5
    assert float(torch.softmax(scaled, -1)[1:3].sum()) == pytest.approx(0.354068, abs=1e-6)


def test_cfg_worked_example() -> None:
    z, zu = torch.tensor([2.0, 1.9, 0.0, -1.0]), torch.tensor([3.0, 0.0, 0.0, -1.0])
    assert torch.allclose(torch.log_softmax(z, -1), torch.tensor([-0.737145, -0.837145, -2.737145, -3.737145]), atol=1e-6)
    out = cfg(z, zu, 1.1, 0.1)
    assert torch.allclose(out[:3], torch.tensor([-0.799715, -0.609715, -2.699715]), atol=1e-6) and torch.isinf(out[3])
    assert int(z.argmax()) == 0 and int(out.argmax()) == 1
    two = cfg(z, zu, 2.0, 0.1)
    assert torch.allclose(two[:3], torch.tensor([-1.362847, 1.437153, -2.362847]), atol=1e-6)
    renormalised = torch.log_softmax(out, -1)  # what v5 beam search does with it
    assert torch.allclose(renormalised[:3], torch.tensor([-0.858161, -0.668161, -2.758161]), atol=1e-6)


# ---- the boost in the model -------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_boost_equals_materialised_reference_and_edits_the_last_row_only(family: str) -> None:
    model, processor = zoo.load_tiny(family)
    inputs = batch_inputs(processor, family, n=3)
    layers = adapter_for(model).decoder_layers
    hidden: dict[str, list[torch.Tensor]] = {"plain": [], "pai": []}

    def run(name: str) -> torch.Tensor:
        hook = layers[2].register_forward_hook(lambda m, a, o: hidden[name].append(o[0] if isinstance(o, tuple) else o))
        with torch.no_grad():
            out = model(**inputs).logits
        hook.remove()
        return out

    plain = run("plain")
    with steer.apply(model, "pai", alpha=0.8, gamma=1.0):
        fused = run("pai")
    reference = edits.ScoreEdit(layers=[2, 3], fn=lambda s, e: s + 0.8 * s.abs(), impl="reference")
    with steer.apply(model, reference):
        with torch.no_grad():
            ref = model(**inputs).logits
    assert (fused - ref).abs().max() < 1e-5
    real = inputs["attention_mask"].bool()
    last = real.shape[1] - 1  # left padding: every row's last real token is the last column
    assert torch.equal(hidden["pai"][0][:, :last], hidden["plain"][0][:, :last])  # other rows bit-identical
    assert not torch.allclose(hidden["pai"][0][:, last], hidden["plain"][0][:, last])
    assert torch.equal(fused[:, :last], plain[:, :last])


def test_boost_first_token_option() -> None:
    model, processor = zoo.load_tiny("llava")
    inputs = row_inputs(processor, "llava", 0)
    firsts = {}
    for flag in (True, False):
        with steer.apply(model, "pai", alpha=1.0, boost_first_token=flag):
            with torch.no_grad():
                firsts[flag] = model(**inputs).logits[:, -1]
    with steer.apply(model, "pai", alpha=0.0):  # the contrast alone
        with torch.no_grad():
            cfg_only = model(**inputs).logits[:, -1]
    assert torch.equal(firsts[False], cfg_only) and not torch.allclose(firsts[True], cfg_only)


# ---- the image-free branch ---------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_branch_equals_hand_built_text_only_prompt(family: str, recorder: list) -> None:
    model, processor = zoo.load_tiny(family)
    inputs = batch_inputs(processor, family, n=3)
    prefixes = Prefixes()
    with steer.apply(model, "pai", alpha=0.0, gamma=2.0) as handle:
        model.generate(**inputs, max_new_tokens=3, min_new_tokens=3, do_sample=False, logits_processor=[prefixes])
        rows = handle.state["pai"]["rows"]
    assert len(recorder) == 3
    prompt = inputs["input_ids"].shape[1]
    for (_, uncond), seq in zip(recorder, prefixes.seen):
        mask = torch.cat([inputs["attention_mask"], torch.ones(3, seq.shape[1] - prompt, dtype=torch.long)], 1)
        assert (uncond - text_only_logits(model, family, seq, mask, prompt)).abs().max() < 1e-5
    related = adapter_for(model).image_related_mask(inputs["input_ids"])  # placeholders and delimiters
    for b, row in enumerate(rows):
        real = inputs["attention_mask"][b].bool()
        assert row["image_keys"] == int((inputs["input_ids"][b] == model.config.image_token_id).sum())
        assert row["aux_prompt_len"] == int((real & ~related[b]).sum())


@pytest.mark.parametrize("reorder", [True, False])
def test_beam_branch_follows_each_beam(reorder: bool, recorder: list) -> None:
    model, processor = zoo.load_tiny("llava")
    inputs = batch_inputs(processor, "llava", n=2)
    prefixes = Prefixes()
    with steer.apply(model, "pai", alpha=0.0, gamma=3.0, reorder_aux_cache=reorder):
        model.generate(**inputs, max_new_tokens=5, min_new_tokens=5, num_beams=3, logits_processor=[prefixes])
    prompt = inputs["input_ids"].shape[1]
    mask0 = inputs["attention_mask"].repeat_interleave(3, dim=0)
    errors = []
    for (_, uncond), seq in zip(recorder, prefixes.seen):
        mask = torch.cat([mask0, torch.ones(6, seq.shape[1] - prompt, dtype=torch.long)], 1)
        errors.append(float((uncond - text_only_logits(model, "llava", seq, mask)).abs().max()))
    if reorder:
        assert max(errors) < 1e-5
    else:  # the official code: the image-free cache never follows the beams
        assert max(errors) > 1e-3


@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_batched_branch_equals_sequential(family: str, recorder: list) -> None:
    model, processor = zoo.load_tiny(family)
    inputs = batch_inputs(processor, family, n=3)
    runs = {}
    batched = batched_mode(model, inputs, family, "pai")
    for batch in (batched, "sequential"):
        recorder.clear()
        with steer.apply(model, "pai", alpha=0.5, gamma=2.0, batch=batch):
            tokens = generate(model, inputs, max_new_tokens=4)
        runs[batch] = (tokens, [(c.clone(), u.clone()) for c, u in recorder])
    assert torch.equal(runs[batched][0], runs["sequential"][0])
    for (c1, u1), (c2, u2) in zip(runs[batched][1], runs["sequential"][1]):
        assert (c1 - c2).abs().max() < 1e-5 and (u1 - u2).abs().max() < 1e-5


@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_batch_equals_each_sample_alone(family: str) -> None:
    model, processor = zoo.load_tiny(family)
    inputs = batch_inputs(processor, family, n=3)
    settings = {"alpha": 1.0, "gamma": 2.0}
    modes: list[dict] = [{}]
    if family == "llava":
        modes += [{"num_beams": 3}, {"do_sample": True}]
    with steer.apply(model, "pai", **settings):
        for mode in modes:
            torch.manual_seed(5)
            if mode.get("do_sample"):
                rows = [row_inputs(processor, family, i) for i in range(3)]
                assert sampled_rows_equal_alone(model, inputs, rows) < 1e-5
                continue
            together = generate(model, inputs, max_new_tokens=4, **mode)
            alone = [generate(model, row_inputs(processor, family, i), max_new_tokens=4, **mode) for i in range(3)]
            for i in range(3):
                assert torch.equal(together[i], alone[i][0])


def test_beams_and_seeded_sampling_reproducible() -> None:
    model, processor = zoo.load_tiny("qwen2_vl")
    inputs = batch_inputs(processor, "qwen2_vl", n=2)
    outs = []
    for _ in range(2):
        with steer.apply(model, "pai", alpha=1.0, gamma=2.0):
            beams = generate(model, inputs, max_new_tokens=4, num_beams=3)
            torch.manual_seed(11)
            with torch.no_grad():
                sampled = model.generate(**inputs, do_sample=True, max_new_tokens=4, min_new_tokens=4)
        outs.append((beams, sampled))
    assert torch.equal(outs[0][0], outs[1][0]) and torch.equal(outs[0][1], outs[1][1])


# ---- identities, refusals, remove ----------------------------------------------------------------------------


def test_identity_and_remove() -> None:
    model, processor = zoo.load_tiny("llava")
    inputs = batch_inputs(processor, "llava")
    base = generate(model, inputs, max_new_tokens=5)
    before = model_fingerprint(model)
    with pytest.warns(UserWarning, match="nothing is installed"):
        handle = steer.apply(model, "pai", alpha=0.0, gamma=1.0)
    assert handle.edits == [] and torch.equal(generate(model, inputs, max_new_tokens=5), base)
    handle.remove()
    with pytest.warns(UserWarning):
        steer.apply(model, "pai", enable_attn=False, enable_cfg=False).remove()
    torch.manual_seed(1)
    with torch.no_grad():
        sampled = model.generate(**inputs, do_sample=True, max_new_tokens=4)
    with pytest.warns(UserWarning):
        handle = steer.apply(model, "pai", alpha=0.0, gamma=1.0)
    torch.manual_seed(1)
    with torch.no_grad():
        assert torch.equal(model.generate(**inputs, do_sample=True, max_new_tokens=4), sampled)
    handle.remove()
    handle = steer.apply(model, "pai")
    steered = generate(model, inputs, max_new_tokens=5)
    handle.remove()
    assert steered.shape == base.shape
    assert torch.equal(generate(model, inputs, max_new_tokens=5), base)
    assert same_fingerprint(before, model_fingerprint(model))


def test_refusals() -> None:
    model, processor = zoo.load_tiny("llava")
    text = zoo.make_inputs(processor, "llava", ["USER: hello there ASSISTANT:"])
    with steer.apply(model, "pai"), pytest.raises(MissingImageTokensError, match="contain none"):
        generate(model, text, max_new_tokens=2)
    for bad in ({"beta": 0.0}, {"beta": 1.2}, {"gamma": 0.5}, {"alpha": -0.1}, {"layers": [3, 2]}, {"layers": [0, 9]}):
        with pytest.raises(InvalidParameterError):
            steer.apply(model, "pai", **bad)
    with pytest.raises(InvalidParameterError, match=r"outside \(0, 1\]"):
        steer.apply(model, "pai", beta=0.0)


def test_recipes_hold_the_official_settings() -> None:
    model, _ = zoo.load_tiny("llava")
    with steer.apply(model, steer.recipe("llava-1.5/pai")) as handle:
        params = handle.params["pai"]
        assert (params["alpha"], params["gamma"], params["beta"], params["layers"]) == (0.2, 1.1, 0.1, None)
        assert handle.state["pai"]["layers"] == [2, 4]  # [2, L) on the 4-layer tiny model
    official = steer.recipe("llava-1.5/pai-official").methods["pai"]
    assert official["boost_first_token"] is False and official["reorder_aux_cache"] is False
    for family in ("llava-next", "qwen2-vl", "qwen2.5-vl"):
        assert steer.recipe(f"{family}/pai").methods["pai"] == {"alpha": 0.2, "gamma": 1.1, "beta": 0.1}
