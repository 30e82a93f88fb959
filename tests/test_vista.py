"""VISTA (visual steering vector + self-logits augmentation): the checks of shared/specs/vista.md on the tiny
zoo models.

The formulas are tested on the spec's worked examples and random invariants; the steering vector against
unsteered positive/negative passes run by hand on a separate copy of the model; the injections and SLA
against hand computations from captured activations; then identity, batch = per-sample, decoding modes,
dtypes, layer count and parameters.
"""

from __future__ import annotations

import sys
import warnings

import pytest
import torch
from conftest import FAMILIES
from helpers import batch_inputs, generate, hook_count, logits, real, row_inputs

import steer
from steer import zoo
from steer.adapters import adapter_for
from steer.backends.transformers.runtime import Runtime
from steer.edits import LogitsTransform
from steer.methods.vlm.vista import (
    augment_logits,
    resolve_window,
    similarity_scale,
    steer_mlp_output,
    steer_residual,
)

VSV_ONLY = {"enable_sla": False}
SLA_ONLY = {"enable_vsv": False}


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: one intra-op thread for tiny models


def sample(model, inputs, n: int, seed: int = 7) -> torch.Tensor:
    """Seeded nucleus sampling of n new tokens."""
    torch.manual_seed(seed)
    with torch.no_grad():
        out = model.generate(**inputs, do_sample=True, top_p=0.9, max_new_tokens=n, min_new_tokens=n)
    return out[:, inputs["input_ids"].shape[1] :]


def count_text_model_calls(model) -> tuple[list[dict], object]:
    calls: list[dict] = []
    hook = adapter_for(model).text_model.register_forward_pre_hook(
        lambda m, a, k: calls.append(dict(k)), with_kwargs=True
    )
    return calls, hook


# ---- check 4/5: the formulas --------------------------------------------------------------------------


def test_worked_examples() -> None:
    m, v = torch.tensor([-3.0, 4.0]), torch.tensor([2.0, 0.0])
    assert torch.allclose(similarity_scale(m, v), torch.tensor([1.6]))
    assert torch.allclose(steer_mlp_output(m, v, 0.5), torch.tensor([1.212678, 4.850713]), atol=1e-6)
    assert torch.allclose(steer_mlp_output(m, v, 0.17), torch.tensor([-1.896766, 4.626260]), atol=1e-6)
    m2 = torch.tensor([3.0, 4.0])
    assert torch.allclose(similarity_scale(m2, v), torch.tensor([1.0]))
    assert torch.allclose(steer_mlp_output(m2, v, 0.5), torch.tensor([4.043680, 2.940858]), atol=1e-6)
    assert torch.allclose(steer_residual(m, v, 0.5), torch.tensor([-2.236068, 4.472136]), atol=1e-6)
    f = torch.tensor([2.0, 0.0, -1.0])
    window = [torch.tensor([0.0, 1.0, 0.0]), torch.tensor([1.0, 1.0, -2.0])]
    assert torch.allclose(augment_logits(f, window, 0.3), torch.tensor([1.55, 0.30, -1.00]), atol=1e-6)
    assert torch.equal(augment_logits(f, [f], 0.7), f)  # the mean equals f: exact


def test_invariants_on_random_tensors() -> None:
    g = torch.Generator().manual_seed(0)
    m = torch.randn(500, 32, generator=g) * torch.rand(500, 1, generator=g) * 10
    v = torch.randn(500, 32, generator=g) * 3
    lam = torch.rand(500, 1, generator=g)
    out = steer_mlp_output(m, v, lam)  # type: ignore[arg-type]  # lam broadcasts per row
    assert torch.allclose(out.norm(dim=-1), m.norm(dim=-1), rtol=1e-6)
    cos = torch.nn.functional.cosine_similarity
    assert (cos(out, v) >= cos(m, v) - 1e-6).all()
    s = similarity_scale(m, v)
    assert (s >= 1).all() and (s <= 2).all()
    same = steer_mlp_output(m, v, 0.0)
    assert ((same - m).norm(dim=-1) <= 1e-6 * m.norm(dim=-1)).all()  # lambda = 0: m within 1e-6 relative
    h = steer_residual(m, v, 0.3)
    assert torch.allclose(h.norm(dim=-1), m.norm(dim=-1), rtol=1e-6)
    assert (cos(h, v) >= cos(m, v) - 1e-6).all()


def test_window_resolution() -> None:
    assert resolve_window("code", 32) == (25, 30) and resolve_window("paper", 32) == (26, 30)
    assert resolve_window("code", 40) == (33, 38) and resolve_window("paper", 40) == (34, 38)
    assert resolve_window("code", 28) == (21, 26) and resolve_window("paper", 28) == (22, 26)
    assert resolve_window("code", 36) == (29, 34) and resolve_window("paper", 36) == (30, 34)
    assert resolve_window("code", 4) == (0, 2) and resolve_window("paper", 4) == (0, 2)  # clipped
    assert resolve_window([1, 3], 4) == (1, 3)


# ---- check 3: the vector equals the hand computation ---------------------------------------------------


def hand_vector(family: str, inputs) -> torch.Tensor:
    """v[ℓ] = h_ℓ(with image)[last] - h_ℓ(prompt without the image span)[last] on an unsteered copy, [L, H].

    Blocks ℓ < L-1 from ``output_hidden_states``; ℓ = L-1 from a hook (the raw block output, not the normed
    ``hidden_states[-1]``). The negative is the prompt with the image tokens (Qwen: with its vision
    delimiters) removed, run as a text-only prompt by the model itself.
    """
    model, _ = zoo.load_tiny(family)
    cfg = model.config
    drop = [cfg.image_token_id]
    if family.startswith("qwen"):
        drop += [cfg.vision_start_token_id, cfg.vision_end_token_id]
    ids = inputs["input_ids"][0]
    negative = {"input_ids": ids[~torch.isin(ids, torch.tensor(drop))][None]}
    negative["attention_mask"] = torch.ones_like(negative["input_ids"])
    if family.startswith("qwen"):
        negative["mm_token_type_ids"] = torch.zeros_like(negative["input_ids"])
    last_block = model.model.language_model.layers[-1]
    states = []
    for kw in (inputs, negative):
        seen: list[torch.Tensor] = []
        hook = last_block.register_forward_hook(
            lambda m, a, o, seen=seen: seen.append(o[0] if isinstance(o, tuple) else o)
        )
        with torch.no_grad():
            hidden = model(**kw, output_hidden_states=True).hidden_states
        hook.remove()
        layers = [hidden[k + 1][0, -1] for k in range(len(hidden) - 2)] + [seen[0][0, -1]]
        states.append(torch.stack(layers))
    return states[0] - states[1]


@pytest.mark.parametrize("family", FAMILIES)
def test_vector_equals_hand_computation(family: str) -> None:
    model, processor = zoo.load_tiny(family)
    inputs = row_inputs(processor, family, 1)
    expected = hand_vector(family, inputs)
    with steer.apply(model, "vista") as handle:
        logits(model, inputs)
        state = handle.state["vista"]
        got = state["v"][0]
        generate(model, inputs, max_new_tokens=2)  # generate's own positions: the same vector
        got_generate = handle.state["vista"]["v"][0]
    assert got.dtype == torch.float32 and got.shape == (4, model.config.text_config.hidden_size)
    assert (got - expected).abs().max() < 1e-6
    assert (got[0, 0] - expected[0, 0]).abs() < 1e-6  # no +1 PCA artefact at (layer 0, channel 0)
    assert (got_generate - expected).abs().max() < 1e-6
    assert torch.allclose(state["norms"][0], expected.norm(dim=-1), atol=1e-5)
    row = state["rows"][0]
    assert row["pos_len"] == inputs["input_ids"].shape[1] and row["window"] == [0, 2]
    n_image = int(
        torch.isin(inputs["input_ids"][0], torch.tensor(adapter_for(model).image_related_token_ids)).sum()
    )
    assert row["neg_len"] == row["pos_len"] - n_image
    assert torch.equal(row["v"], got)


# ---- steps 3-5 in the model against hand computations ---------------------------------------------------


def test_mlp_mode_rewrites_every_mlp_output_by_the_formula() -> None:
    model, processor = zoo.load_tiny("llava")
    adapter = adapter_for(model)
    inputs = batch_inputs(processor, "llava", n=2)
    raw: dict[int, list[torch.Tensor]] = {k: [] for k in range(4)}
    steered: dict[int, list[torch.Tensor]] = {k: [] for k in range(4)}
    before = [
        adapter.decoder_layers[k].mlp.register_forward_hook(lambda m, a, o, k=k: raw[k].append(o))
        for k in range(4)
    ]
    lam = 0.5
    with steer.apply(model, "vista", lam=lam, **VSV_ONLY) as handle:
        after = [
            adapter.decoder_layers[k].mlp.register_forward_hook(lambda m, a, o, k=k: steered[k].append(o))
            for k in range(4)
        ]
        generate(model, inputs, max_new_tokens=3)
        v = handle.state["vista"]["v"]
    for hook in before + after:
        hook.remove()
    for k in range(4):
        # 2 auxiliary passes (unsteered: out == m there), then the real prefill and 2 decode steps
        assert len(steered[k]) == len(raw[k]) == 5
        assert all(torch.equal(out, m) for m, out in zip(raw[k][:2], steered[k][:2]))
        assert [x.shape[1] for x in steered[k][2:]] == [inputs["input_ids"].shape[1], 1, 1]
        for m, out in zip(raw[k][2:], steered[k][2:]):
            expected = steer_mlp_output(m, v[:, k][:, None, :], lam)
            assert (out - expected).abs().max() < 1e-5
            assert not torch.allclose(out, m)
    # by hand on one position: m' = |m| normalize(m^ + lam s v^), s = 1 + max(0, cos(m, -v^))
    m, vk = raw[2][-1][1, 0], v[1, 2]
    m_hat, v_hat = m / m.norm(), vk / vk.norm()
    s = 1 + max(0.0, float(-(m_hat @ v_hat)))
    by_hand = m.norm() * (m_hat + lam * s * v_hat) / (m_hat + lam * s * v_hat).norm()
    assert (steered[2][-1][1, 0] - by_hand).abs().max() < 1e-5


def test_residual_mode_renormalises_block_outputs_and_sla_reads_steered_states() -> None:
    model, processor = zoo.load_tiny("qwen2_vl")
    adapter = adapter_for(model)
    inputs = row_inputs(processor, "qwen2_vl", 0)
    raw: dict[int, list[torch.Tensor]] = {k: [] for k in range(4)}
    steered: dict[int, list[torch.Tensor]] = {k: [] for k in range(4)}
    f_raw: list[torch.Tensor] = []
    layers = adapter.decoder_layers
    before = [layers[k].register_forward_hook(lambda m, a, o, k=k: raw[k].append(o)) for k in range(4)]
    before.append(adapter.lm_head.register_forward_hook(lambda m, a, o: f_raw.append(o)))
    lam, gamma = 0.3, 0.4
    with steer.apply(model, "vista", lam=lam, gamma=gamma, mode="residual") as handle:
        after = [layers[k].register_forward_hook(lambda m, a, o, k=k: steered[k].append(o)) for k in range(4)]
        out = logits(model, inputs)
        v = handle.state["vista"]["v"]
        assert not any(isinstance(m, type(layers[0].mlp)) and m._forward_hooks for m in model.modules())
    for hook in before + after:
        hook.remove()
    for k in range(4):
        h, new = raw[k][-1], steered[k][-1]
        tilde = h + lam * v[:, k][:, None, :]
        assert (
            new - tilde * h.norm(dim=-1, keepdim=True) / tilde.norm(dim=-1, keepdim=True)
        ).abs().max() < 1e-5
        assert torch.allclose(new.norm(dim=-1), h.norm(dim=-1), rtol=1e-5)
    # SLA on the steered window states [0, 2]: the 3 window projections (the logit lens of blocks 0..2, made
    # as each block finishes), then the final lm_head output before the logits edit
    assert len(f_raw) == 4
    with torch.no_grad():
        window = [adapter.lm_head(steered[k][-1]) for k in (0, 1, 2)]
    assert all(torch.equal(w, p) for w, p in zip(window, f_raw[:3]))
    expected = f_raw[3] + gamma * (torch.stack(window).mean(0) - f_raw[3])
    assert (out - expected).abs().max() < 1e-4


@pytest.mark.parametrize("final_norm", [False, True])
def test_sla_equals_hand_mix_of_window_logits(final_norm: bool) -> None:
    model, processor = zoo.load_tiny("llava")
    adapter = adapter_for(model)
    inputs = batch_inputs(processor, "llava", n=2)
    with torch.no_grad():
        plain = model(**inputs, output_hidden_states=True)
        f, hidden = plain.logits, plain.hidden_states
        norm = adapter.final_norm if final_norm else (lambda x: x)
        s = {k: adapter.lm_head(norm(hidden[k + 1])) for k in range(3)}
    gamma = 0.3
    cases = {"code": [s[0], s[1], s[2]], (1, 3): [s[1], s[2], f]}  # S_{L-1} = f
    for window, terms in cases.items():
        expected = f + gamma * (torch.stack(terms).mean(0) - f)
        with steer.apply(
            model,
            "vista",
            gamma=gamma,
            window=list(window) if isinstance(window, tuple) else window,
            final_norm=final_norm,
            **SLA_ONLY,
        ) as handle:
            out = logits(model, inputs)
            assert handle.state["vista"]["window"] == ([0, 2] if window == "code" else [1, 3])
            with torch.no_grad():  # generate: lm_head projects the last position only (logits_to_keep=1)
                gen = model.generate(
                    **inputs,
                    max_new_tokens=1,
                    do_sample=False,
                    output_logits=True,
                    return_dict_in_generate=True,
                )
        assert (out - expected)[real(inputs)].abs().max() < 1e-5, window
        assert (gen.logits[0] - expected[:, -1]).abs().max() < 1e-5, window
        assert (out - f)[real(inputs)].abs().max() > 1e-3


# ---- check 1/2: identity -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "params",
    [
        {"lam": 0.0, "gamma": 0.0},
        {"enable_vsv": False, "enable_sla": False},
        {"lam": 0.0, "enable_sla": False},
    ],
)
def test_both_parts_off_is_bit_identical_installs_nothing_and_warns(params: dict) -> None:
    model, processor = zoo.load_tiny("llava_next")
    inputs = batch_inputs(processor, "llava_next")
    ref_logits, ref_tokens = logits(model, inputs), generate(model, inputs)
    ref_beams = generate(model, inputs, num_beams=3, max_new_tokens=3)
    calls, hook = count_text_model_calls(model)
    with pytest.warns(UserWarning, match="vista: both parts are off"):
        handle = steer.apply(model, "vista", **params)
    with handle:
        assert handle.edits == []
        assert torch.equal(logits(model, inputs), ref_logits)
        assert len(calls) == 1  # no auxiliary pass
        assert torch.equal(generate(model, inputs), ref_tokens)
        assert torch.equal(generate(model, inputs, num_beams=3, max_new_tokens=3), ref_beams)
    hook.remove()


def test_each_part_off_installs_only_the_other() -> None:
    model, processor = zoo.load_tiny("qwen2_5_vl")
    inputs = batch_inputs(processor, "qwen2_5_vl", n=2)
    calls, hook = count_text_model_calls(model)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no warning while one part is on
        with steer.apply(model, "vista", lam=0.0) as handle:  # SLA only: no block/MLP hooks, no aux pass
            assert [type(e).__name__ for e in handle.edits].count("LogitsTransform") == 1
            modules = {e.target(handle.adapter) for e in handle.edits if hasattr(e, "target")}
            assert not any(handle.adapter.decoder_layers[k].mlp in modules for k in range(4))
            assert handle.adapter.text_model not in modules
            logits(model, inputs)
            assert len(calls) == 1 and "v" not in handle.state["vista"]
        with steer.apply(model, "vista", gamma=0.0) as handle:  # VSV only: no logits hook
            assert not any(isinstance(e, LogitsTransform) for e in handle.edits)
            logits(model, inputs)
            assert len(calls) == 1 + 3 and handle.state["vista"]["window"] is None
    hook.remove()


@pytest.mark.parametrize("gamma", [0.3, 1.0])
@pytest.mark.parametrize("final_norm", [False, True])
def test_window_of_the_final_state_only_is_bit_identical(gamma: float, final_norm: bool) -> None:
    model, processor = zoo.load_tiny("qwen2_vl")
    inputs = batch_inputs(processor, "qwen2_vl", n=2)
    ref = logits(model, inputs)
    with steer.apply(model, "vista", gamma=gamma, window=[3, 3], final_norm=final_norm, **SLA_ONLY):
        assert torch.equal(logits(model, inputs), ref)


def test_remove_restores_bit_identical() -> None:
    model, processor = zoo.load_tiny("llava")
    inputs = batch_inputs(processor, "llava")
    logits(model, inputs)  # transformers installs its own output-capturing hooks on the first call
    ref_logits, ref_tokens, hooks_before = logits(model, inputs), generate(model, inputs), hook_count(model)
    handle = steer.apply(model, "vista", mode="residual")
    assert (logits(model, inputs) - ref_logits)[real(inputs)].abs().max() > 1e-2
    generate(model, inputs, num_beams=3, max_new_tokens=3)
    handle.remove()
    assert torch.equal(logits(model, inputs), ref_logits) and torch.equal(generate(model, inputs), ref_tokens)
    assert hook_count(model) == hooks_before and Runtime.of(model) is None


# ---- checks 6/7/10: batches, decoding, no side effects ------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_batch_with_left_padding_equals_per_sample_runs(family: str) -> None:
    model, processor = zoo.load_tiny(family)
    inputs = batch_inputs(processor, family, n=3)
    assert len(set(inputs["attention_mask"].sum(1).tolist())) == 3
    with steer.apply(model, "vista") as handle:
        batch = generate(model, inputs, max_new_tokens=5)
        batch_v = handle.state["vista"]["v"]
        for i in range(3):
            alone = generate(model, row_inputs(processor, family, i), max_new_tokens=5)
            assert torch.equal(batch[i], alone[0]), f"row {i}"
            assert (handle.state["vista"]["v"][0] - batch_v[i]).abs().max() < 1e-5, f"row {i}"


@pytest.mark.parametrize("family", FAMILIES)
def test_decoding_modes_on_sdpa_without_eager_or_forced_outputs(
    family: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    model, processor = zoo.load_tiny(family)
    adapter = adapter_for(model)
    inputs = batch_inputs(processor, family, n=2)
    ref_logits = logits(model, inputs)
    with torch.no_grad():
        ref_hidden = model(**inputs, output_hidden_states=True).hidden_states

    def no_eager(*args, **kwargs):
        raise AssertionError("eager attention was called")

    monkeypatch.setattr(
        sys.modules[type(adapter.attention(0)).__module__], "eager_attention_forward", no_eager
    )
    calls, hook = count_text_model_calls(model)
    n = 3
    with steer.apply(model, "vista") as handle:
        assert model.config.text_config._attn_implementation == "sdpa"
        out = logits(model, inputs)
        greedy = generate(model, inputs, max_new_tokens=n)
        greedy_v = handle.state["vista"]["v"]
        del calls[:]
        beams = generate(model, inputs, num_beams=3, max_new_tokens=n)
        assert len(calls) == 2 + n  # positive + negative once per generate, then prefill + decode steps
        beam_v = handle.state["vista"]["v"]
        sampled = [sample(model, inputs, n) for _ in range(2)]
        assert torch.equal(sampled[0], sampled[1])
        flags = list(calls)
        with torch.no_grad():  # a user's own request returns the stock tuple
            hidden = model(**inputs, output_hidden_states=True).hidden_states
    hook.remove()
    assert greedy.shape == beams.shape == sampled[0].shape == (2, n)
    assert beam_v.shape[0] == 6  # generate expands the beams before the prefill
    for row in range(6):  # each beam row carries its sample's vector
        assert (beam_v[row] - greedy_v[row // 3]).abs().max() < 1e-5
    assert all(not k.get("output_attentions") and not k.get("output_hidden_states") for k in flags)
    assert not model.config.output_attentions and not model.config.text_config.output_attentions
    assert len(hidden) == len(ref_hidden) and torch.equal(hidden[0], ref_hidden[0])
    assert all(a.shape == b.shape for a, b in zip(hidden, ref_hidden))
    assert (out - ref_logits)[real(inputs)].abs().max() > 1e-2


def test_auxiliary_passes_ignore_other_methods() -> None:
    """The positive/negative passes run with every edit off: composing another method leaves v unchanged."""
    model, processor = zoo.load_tiny("llava")
    inputs = batch_inputs(processor, "llava", n=2)
    with steer.apply(model, "vista") as handle:
        logits(model, inputs)
        alone = handle.state["vista"]["v"]
    with steer.apply(model, ["scale_heads", "vista"], alpha=3.0) as handle:
        logits(model, inputs)
        assert torch.equal(handle.state["vista"]["v"], alone)


# ---- checks 8/9: dtypes, layer count --------------------------------------------------------------------


@pytest.mark.parametrize("family,dtype", [("qwen2_vl", torch.bfloat16), ("llava", torch.float16)])
def test_dtypes_are_kept(family: str, dtype: torch.dtype) -> None:
    model, processor = zoo.load_tiny(family)
    model = model.to(dtype)
    adapter = adapter_for(model)
    inputs = row_inputs(processor, family, 0)
    inputs["pixel_values"] = inputs["pixel_values"].to(dtype)
    seen: set[torch.dtype] = set()
    mlp_dtypes: set[torch.dtype] = set()
    with steer.apply(model, "vista") as handle:
        hooks = [
            m.register_forward_hook(
                lambda m, a, o: seen.add(o.dtype) if isinstance(o, torch.Tensor) else None
            )
            for m in adapter.text_model.modules()
        ]
        hooks += [
            adapter.decoder_layers[k].mlp.register_forward_hook(lambda m, a, o: mlp_dtypes.add(o.dtype))
            for k in range(4)
        ]
        out = logits(model, inputs)
        tokens = generate(model, inputs, max_new_tokens=3)
        assert handle.state["vista"]["v"].dtype == torch.float32
    for hook in hooks:
        hook.remove()
    assert out.dtype == dtype and mlp_dtypes == {dtype} and tokens.shape == (1, 3)
    assert seen == {dtype}  # in particular no fp16 in the bf16 model, no fp32 leaking out


def test_hooked_stack_is_the_text_model_when_the_vision_tower_is_deeper() -> None:
    model, processor = zoo.load_tiny("qwen2_vl")
    config = model.config
    config.vision_config.depth = 6
    deeper = type(model)(config).eval()
    assert len(deeper.model.visual.blocks) == 6
    inputs = row_inputs(processor, "qwen2_vl", 0)
    with steer.apply(deeper, "vista") as handle:
        logits(deeper, inputs)
        assert handle.state["vista"]["v"].shape[1] == config.text_config.num_hidden_layers == 4
        hooked_mlps = [layer.mlp for layer in deeper.model.language_model.layers if layer.mlp._forward_hooks]
        assert len(hooked_mlps) == 4
        assert not any(block._forward_hooks for block in deeper.model.visual.blocks)


# ---- parameters, errors, recipes ---------------------------------------------------------------------------


def test_parameters_and_errors() -> None:
    listing = {m["name"]: m for m in steer.methods()}["vista"]
    assert {p["name"]: p["default"] for p in listing["params"]} == {
        "lam": 0.17,
        "gamma": 0.3,
        "window": "code",
        "mode": "mlp",
        "final_norm": False,
        "enable_vsv": True,
        "enable_sla": True,
    }
    assert listing["needs_image_tokens"] is True
    model, processor = zoo.load_tiny("llava")
    for bad in (
        {"lam": 1.5},
        {"gamma": -0.1},
        {"window": "last"},
        {"window": [3, 1]},
        {"window": [0, 4]},
        {"window": [1]},
        {"mode": "add"},
    ):
        with pytest.raises(steer.InvalidParameterError):
            steer.apply(model, "vista", **bad)
    assert Runtime.of(model) is None
    text_only = zoo.make_inputs(processor, "llava", [zoo.chat_prompt("llava", "Hello?", n_images=0)])
    with steer.apply(model, "vista"), pytest.raises(steer.MissingImageTokensError, match="vista"):
        generate(model, text_only)
    with steer.apply(model, "vista", **SLA_ONLY):  # SLA alone needs no image
        generate(model, text_only)


@pytest.mark.parametrize(
    "family,recipe",
    [
        ("llava", "llava-1.5"),
        ("llava_next", "llava-next"),
        ("qwen2_vl", "qwen2-vl"),
        ("qwen2_5_vl", "qwen2.5-vl"),
    ],
)
def test_recipes(family: str, recipe: str) -> None:
    captioning, pope = steer.recipe(f"{recipe}/vista"), steer.recipe(f"{recipe}/vista-pope")
    assert captioning.methods["vista"]["lam"] == 0.17 and captioning.methods["vista"]["gamma"] == 0.3
    assert pope.methods["vista"]["lam"] == 0.01 and pope.methods["vista"]["gamma"] == 0.3
    model, processor = zoo.load_tiny(family)
    with steer.apply(model, pope) as handle:
        assert handle.params["vista"]["lam"] == 0.01 and handle.params["vista"]["window"] == "code"
        logits(model, row_inputs(processor, family, 0))
        assert handle.state["vista"]["window"] == [0, 2] and handle.state["vista"]["v"].shape[1] == 4


def test_static_cache_equals_dynamic_cache() -> None:
    """With a static cache the text model gets a 4-D mask over the whole cache: the passes use the prompt's."""
    model, processor = zoo.load_tiny("llava")
    inputs = batch_inputs(processor, "llava")
    with steer.apply(model, "vista") as handle:
        dynamic = generate(model, inputs, max_new_tokens=4)
        state = dict(handle.state["vista"])
        static = generate(model, inputs, max_new_tokens=4, cache_implementation="static")
        static_state = handle.state["vista"]  # the model got a 4-D mask spanning the cache here
    assert torch.equal(dynamic, static)
    assert (static_state["v"] - state["v"]).abs().max() < 1e-5
    assert static_state["pos_len"] == state["pos_len"] and static_state["neg_len"] == state["neg_len"]
