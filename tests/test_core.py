"""The core contract: apply/remove restore exactly, zero strength is the identity, batch = per-sample,
composition, independence of models, and typed errors for bad input."""

from __future__ import annotations

import pytest
import torch
from conftest import ALL_FAMILIES
from helpers import batch_inputs, generate, hook_count, logits, real, row_inputs

import steer
from steer import edits, zoo
from steer.backends.transformers.runtime import Runtime


def _every_other_image_key(e: edits.EditContext) -> torch.Tensor | None:
    """AND-mask for prefill: hide the image keys at even positions counted from each row's first real token (so
    left padding does not change which keys are hidden; None at decode: no change)."""
    if e.phase == "decode":
        return None
    image = e.forward.key_image_mask(e.key_len)
    padding = e.forward.padding_mask
    offset = (~padding.bool()).sum(1, keepdim=True) if padding is not None else 0  # left padding per row
    even = (torch.arange(image.shape[1])[None, :] - offset) % 2 == 0
    return ~(image & even)[:, None, None, :]


def _towards_text_only(x: torch.Tensor, e: edits.EditContext) -> torch.Tensor | None:
    """Add a tenth of the text-only prompt's last-token state (collected in the auxiliary run) at every position."""
    text = e.collected("text_state", e.layer)
    return None if text is None else x + 0.1 * text[:, None, :].to(x.dtype)


def _gap_after_first_image(pos: torch.Tensor, e: edits.EditContext) -> torch.Tensor:
    """Positions from the first image token on move 5 further (RoPE is relative: a uniform shift would not act)."""
    assert e.image is not None
    after = (e.image.mask.long().cumsum(1) > 0).long().to(pos.device)
    return pos + 5 * after  # [B, T] or [3, B, T]


def strong_edits(model: torch.nn.Module) -> list:
    """Edits of every kind at a strength that visibly changes the output (each acts on its own layer)."""
    d = model.config.text_config.hidden_size
    g = torch.Generator().manual_seed(1)
    return [
        edits.HeadScale(layers=[1, 2], scale=3.0, heads=[0, 3]),
        edits.GroupReweight(layers=[2, 3], coefficients=[1.0, 4.0], groups="image", rows="after_image", renormalize=True),
        edits.AttentionMask(layers=[1], mask=_every_other_image_key),
        edits.ResidualAdd(layers=[0], vector=torch.randn(d, generator=g)),
        edits.Transform(site="layer.mlp.out", layers=[1], fn=lambda x, e: x * 1.5),
        edits.SourceRun(name="text", inputs="text_only"),
        edits.Collect(name="text_state", site="layer.out", layers=[2], select="last", runs=("text",)),
        edits.Transform(site="layer.out", layers=[2], fn=_towards_text_only),
        edits.Positions(fn=_gap_after_first_image),
        edits.LogitsTransform(fn=lambda f, e: f * 1.5),
    ]


def zero_edits(model: torch.nn.Module) -> list:
    """Every kind at zero strength: the identity."""
    d = model.config.text_config.hidden_size
    return [
        edits.HeadScale(layers="all", scale=1.0),
        edits.AttentionMask(layers="all", mask=torch.ones(1, 1, 1, 1, dtype=torch.bool)),
        edits.GroupReweight(layers="all", coefficients=[1.0, 1.0], groups="image", rows="all"),
        edits.ResidualAdd(layers="all", vector=torch.zeros(d)),
        edits.Transform(site="layer.mlp.out", layers="all", fn=lambda x, e: x * 1.0),
        edits.SourceRun(name="text", inputs="text_only"),
        edits.Collect(name="text_state", site="layer.out", layers="all", select="last", runs=("text",)),
        edits.Collect(name="heads", site="layer.attn.head_out", layers="all", select="last"),
        edits.Positions(fn=lambda pos, e: pos),
        edits.LogitsTransform(fn=lambda f, e: f),
    ]


def test_every_kind_acts_and_a_zero_set_collects() -> None:
    """Each edit of the strong set changes the output on its own; the zero set's collects really collect."""
    model, processor = zoo.load_tiny("llava")
    inputs = batch_inputs(processor, "llava")
    ref = logits(model, inputs)
    for edit in strong_edits(model):
        if isinstance(edit, (edits.SourceRun, edits.Collect)):
            continue  # they act through the Transform that reads what they collect
        group = [edit]
        if isinstance(edit, edits.Transform) and edit.site == "layer.out":
            group = [e for e in strong_edits(model) if isinstance(e, (edits.SourceRun, edits.Collect))] + [edit]
        with steer.apply(model, group):
            out = logits(model, inputs)
        assert (out - ref)[real(inputs)].abs().max() > 1e-3, type(edit).__name__
    seen: list = []
    probe = edits.Transform(site="layer.out", layers=[3], fn=lambda x, e: seen.append(e.collected("text_state", 3)))
    with steer.apply(model, [*zero_edits(model), probe]):
        logits(model, inputs)
    assert len(seen) == 1 and seen[0].shape == (3, model.config.text_config.hidden_size)


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_remove_restores_bit_identical(family: str, impl: str) -> None:
    model, processor = zoo.load_tiny(family, attn_implementation=impl)
    untouched, _ = zoo.load_tiny(family, attn_implementation=impl)  # never patched
    inputs = batch_inputs(processor, family)
    ref_logits, ref_tokens = logits(untouched, inputs), generate(untouched, inputs)
    ref_beams = generate(untouched, inputs, num_beams=3)
    logits(model, inputs)  # transformers installs its own output-capturing hooks on the first call
    hooks_before = hook_count(model)

    handle = steer.apply(model, strong_edits(model))
    assert model.config.text_config._attn_implementation == "steer"
    steered = logits(model, inputs)
    assert (steered - ref_logits)[real(inputs)].abs().max() > 1e-2  # the edits really act
    generate(model, inputs, num_beams=3)
    handle.remove()

    assert torch.equal(logits(model, inputs), ref_logits)
    assert torch.equal(generate(model, inputs), ref_tokens)
    assert torch.equal(generate(model, inputs, num_beams=3), ref_beams)
    assert model.config.text_config._attn_implementation == impl
    assert hook_count(model) == hooks_before
    assert Runtime.of(model) is None
    assert not any(hasattr(m, "_steer_layer") for m in model.modules())
    handle.remove()  # idempotent


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_zero_strength_equals_original(family: str, impl: str) -> None:
    model, processor = zoo.load_tiny(family, attn_implementation=impl)
    inputs = batch_inputs(processor, family)
    ref_logits, ref_tokens = logits(model, inputs), generate(model, inputs)
    with steer.apply(model, zero_edits(model)):
        out = logits(model, inputs)
        tokens = generate(model, inputs)
    assert (out - ref_logits)[real(inputs)].abs().max() < 1e-5
    assert torch.equal(tokens, ref_tokens)


@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_noop_methods_install_nothing(family: str) -> None:
    model, processor = zoo.load_tiny(family)
    inputs = batch_inputs(processor, family)
    ref = logits(model, inputs)
    with steer.apply(model, ["scale_heads", "image_attention"], alpha=1.0, scale=1.0) as handle:
        assert handle.edits == []
        assert torch.equal(logits(model, inputs), ref)
        assert handle.params["scale_heads"]["alpha"] == 1.0


@pytest.mark.parametrize("num_beams", [1, 3])
@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_batch_equals_per_sample(family: str, num_beams: int) -> None:
    model, processor = zoo.load_tiny(family)
    inputs = batch_inputs(processor, family, n=3)
    lengths = inputs["attention_mask"].sum(1).tolist()
    assert len(set(lengths)) == 3  # three different prompt lengths, left padded
    with steer.apply(model, strong_edits(model)):
        batch = generate(model, inputs, num_beams=num_beams, max_new_tokens=6)
        for i in range(3):
            alone = generate(model, row_inputs(processor, family, i), num_beams=num_beams, max_new_tokens=6)
            assert torch.equal(batch[i], alone[0]), f"row {i}"


def test_two_models_are_independent() -> None:
    a, processor = zoo.load_tiny("llava")
    b, _ = zoo.load_tiny("llava")
    inputs = batch_inputs(processor, "llava")
    ref = logits(b, inputs)
    handle_a = steer.apply(a, "scale_heads", alpha=3.0)
    assert torch.equal(logits(b, inputs), ref)  # b untouched while a is steered
    assert not torch.equal(logits(a, inputs), ref)
    handle_b = steer.apply(b, "image_attention", scale=3.0)
    steered_b = logits(b, inputs)
    handle_a.remove()
    assert torch.equal(logits(b, inputs), steered_b)  # removing a's handle leaves b steered
    handle_b.remove()
    assert torch.equal(logits(b, inputs), ref)


def test_compose_separate_handles_equals_one_call_and_same_method_raises() -> None:
    model, processor = zoo.load_tiny("qwen2_vl")
    inputs = batch_inputs(processor, "qwen2_vl")
    with steer.apply(model, ["scale_heads", "image_attention"], alpha=3.0, scale=3.0):
        together = logits(model, inputs)
    with steer.apply(model, "image_attention", scale=3.0):
        only_image = logits(model, inputs)
    first = steer.apply(model, "scale_heads", alpha=3.0)
    second = steer.apply(model, "image_attention", scale=3.0)
    assert torch.allclose(logits(model, inputs), together, atol=1e-6)
    with pytest.raises(steer.AlreadySteeredError, match="already applied"):
        steer.apply(model, "scale_heads", alpha=2.0)
    first.remove()
    assert torch.allclose(logits(model, inputs), only_image, atol=1e-6)
    second.remove()
    with pytest.raises(steer.AlreadySteeredError, match="twice"):
        steer.apply(model, ["scale_heads", "scale_heads"])


def test_context_manager_restores_when_generate_raises() -> None:
    model, processor = zoo.load_tiny("llava_next")
    inputs = batch_inputs(processor, "llava_next")
    ref = generate(model, inputs)
    calls = []

    def explode(f: torch.Tensor, ectx: edits.EditContext) -> torch.Tensor:
        calls.append(ectx.phase)
        if ectx.phase == "decode":
            raise RuntimeError("boom in decode")
        return f

    with pytest.raises(RuntimeError, match="boom"):
        with steer.apply(model, [edits.LogitsTransform(fn=explode), edits.HeadScale(layers="all", scale=2.0)]):
            generate(model, inputs)
    assert calls[:2] == ["prefill", "decode"]
    assert model.config.text_config._attn_implementation == "sdpa"
    assert Runtime.of(model) is None
    assert torch.equal(generate(model, inputs), ref)


def test_handle_params_state_and_disabled_guard() -> None:
    model, processor = zoo.load_tiny("llava")
    inputs = batch_inputs(processor, "llava")
    ref = logits(model, inputs)
    with steer.apply(model, "scale_heads", alpha=0.5, heads=[1], layers=[0, -1]) as handle:
        assert handle.params == {"scale_heads": {"alpha": 0.5, "heads": [1], "layers": [0, -1]}}
        assert handle.state == {"scale_heads": {}}
        assert handle.edits[0].resolve_layers(4) == [0, 3]
        with handle.disabled():
            assert torch.equal(logits(model, inputs), ref)
        assert not torch.equal(logits(model, inputs), ref)
    assert "removed" in repr(handle)
    with pytest.raises(steer.SteeringRemovedError):
        handle.disabled()


def test_a_mapping_of_methods_to_parameters_applies_them() -> None:
    """``apply(model, {name: params})`` is the same as ``apply(model, name, **params)`` (it once applied the
    names with their defaults, silently dropping the parameters); a malformed mapping is a typed error."""
    model, processor = zoo.load_tiny("llava")
    inputs = batch_inputs(processor, "llava")
    with steer.apply(model, "image_attention", scale=3.0):
        direct = logits(model, inputs)
    with steer.apply(model, {"image_attention": {"scale": 3.0}}) as handle:
        assert handle.params["image_attention"]["scale"] == 3.0
        assert torch.equal(logits(model, inputs), direct)
    with steer.apply(model, {"image_attention": {"scale": 3.0}}, image_attention={"scale": 1.5}) as handle:
        assert handle.params["image_attention"]["scale"] == 1.5  # keyword parameters override the mapping's
    with pytest.raises(steer.InvalidParameterError, match="method name: "):
        steer.apply(model, {"image_attention": 3.0})
    assert Runtime.of(model) is None


def test_recipe_applies_its_settings() -> None:
    model, processor = zoo.load_tiny("llava")
    inputs = batch_inputs(processor, "llava")
    recipe = steer.recipe("llava-1.5/image-attention")
    with steer.apply(model, "image_attention", scale=recipe.methods["image_attention"]["scale"]):
        direct = logits(model, inputs)
    with steer.apply(model, recipe) as handle:
        assert handle.params["image_attention"]["scale"] == 2.0
        assert torch.equal(logits(model, inputs), direct)
    with steer.apply(model, recipe, scale=3.0) as handle:  # override a recipe value
        assert handle.params["image_attention"]["scale"] == 3.0


# ---- bad input ---------------------------------------------------------------------------------------


def test_unknown_method() -> None:
    model, _ = zoo.load_tiny("llava")
    with pytest.raises(steer.UnknownMethodError, match="Did you mean 'scale_heads'") as info:
        steer.apply(model, "scale_head")
    assert "image_attention" in str(info.value)
    with pytest.raises(steer.UnknownMethodError, match="llava-1.5/image-attention"):
        steer.recipe("llava-1.5/nope")


def test_unknown_parameter_lists_valid_ones() -> None:
    model, _ = zoo.load_tiny("llava")
    with pytest.raises(steer.InvalidParameterError, match=r"unknown parameter\(s\) 'alhpa'.*alpha \(default 2.0, in \[0, 100\]\)"):
        steer.apply(model, "scale_heads", alhpa=2.0)
    with pytest.raises(steer.InvalidParameterError, match="belongs to none"):
        steer.apply(model, ["scale_heads", "image_attention"], bogus=1)


def test_out_of_range_and_wrong_type() -> None:
    model, _ = zoo.load_tiny("llava")
    with pytest.raises(steer.InvalidParameterError, match=r"alpha=-1.0 is out of range; it must be in \[0, 100\]"):
        steer.apply(model, "scale_heads", alpha=-1.0)
    with pytest.raises(steer.InvalidParameterError, match="must be float"):
        steer.apply(model, "scale_heads", alpha="big")
    with pytest.raises(steer.InvalidParameterError, match="head 9 does not exist; the model has 4 query heads"):
        steer.apply(model, "scale_heads", heads=[9])
    with pytest.raises(steer.InvalidParameterError, match="layer 7 does not exist"):
        steer.apply(model, "image_attention", layers=[7])
    assert Runtime.of(model) is None  # nothing half-installed


def test_unsupported_model_names_supported_classes() -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    model = LlamaForCausalLM(LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, vocab_size=50))
    with pytest.raises(steer.UnsupportedModelError, match="LlavaForConditionalGeneration.*Qwen2_5_VLForConditionalGeneration"):
        steer.apply(model, "scale_heads")
    full, _ = zoo.load_tiny("llava")
    with pytest.raises(steer.UnsupportedModelError, match="ForConditionalGeneration class"):
        steer.apply(full.model, "scale_heads")


@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_prompt_without_image_tokens(family: str) -> None:
    model, processor = zoo.load_tiny(family)
    text_only = zoo.make_inputs(processor, family, [zoo.chat_prompt(family, "Hello?", n_images=0)])
    with steer.apply(model, "image_attention"):
        with pytest.raises(steer.MissingImageTokensError, match=r"row\(s\) \[0\] contain none"):
            generate(model, text_only)
        with torch.no_grad(), pytest.raises(steer.MissingImageTokensError, match="inputs_embeds only"):
            model(inputs_embeds=model.get_input_embeddings()(text_only["input_ids"]))
    with steer.apply(model, "scale_heads"):  # a method that does not need images runs on text
        generate(model, text_only)


def test_pipeline_is_refused_clearly() -> None:
    class FakePipe:
        unet = object()

    with pytest.raises(steer.UnsupportedModelError, match="diffusers pipelines"):
        steer.apply(FakePipe(), "scale_heads")  # type: ignore[arg-type]


def test_methods_listing() -> None:
    listing = {m["name"]: m for m in steer.methods()}
    assert {"scale_heads", "image_attention"} <= set(listing)
    assert listing["image_attention"]["needs_image_tokens"] is True
    alpha = next(p for p in listing["scale_heads"]["params"] if p["name"] == "alpha")
    assert alpha["default"] == 2.0 and alpha["range"] == (0.0, 100.0)


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_static_cache_equals_dynamic_cache(family: str) -> None:
    """With a StaticCache the keys are max_cache_len long; image groups and masks must still line up."""
    model, processor = zoo.load_tiny(family)
    inputs = batch_inputs(processor, family)
    with steer.apply(model, ["image_attention", "scale_heads"], scale=3.0, alpha=2.0):
        dynamic = generate(model, inputs, max_new_tokens=5)
        static = generate(model, inputs, max_new_tokens=5, cache_implementation="static")
    assert torch.equal(dynamic, static)
    assert not torch.equal(dynamic, generate(model, inputs, max_new_tokens=5))


def test_a_recipe_for_another_family_is_refused_unless_forced() -> None:
    model, processor = zoo.load_tiny("llava")
    inputs = batch_inputs(processor, "llava")
    with pytest.raises(steer.InvalidParameterError, match="recipe qwen2-vl/cca is written for qwen2-vl; this model is llava-1.5"):
        steer.apply(model, steer.recipe("qwen2-vl/cca"))
    with pytest.raises(steer.InvalidParameterError, match="written for llava-next"):
        steer.apply(model, ["scale_heads", steer.recipe("llava-next/image-attention")])
    assert Runtime.of(model) is None
    with pytest.warns(UserWarning), steer.apply(model, steer.recipe("qwen2-vl/cca", force=True)) as handle:
        assert handle.params["cca"]["mrope"] == "ring_t"
        logits(model, inputs)
