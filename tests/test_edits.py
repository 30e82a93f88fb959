"""Each low-level edit against a hand computation on a tiny model, and the per-forward context
(image spans under left padding, several images per prompt, prefill/decode)."""

from __future__ import annotations

import pytest
import torch
from conftest import FAMILIES
from helpers import batch_inputs, generate, logits

import steer
from steer import edits, zoo
from steer.adapters import adapter_for


def capture(module: torch.nn.Module, store: list, pre: bool = False):
    if pre:
        return module.register_forward_pre_hook(lambda m, args: store.append(args[0].detach().clone()))
    return module.register_forward_hook(
        lambda m, args, out: store.append((out[0] if isinstance(out, tuple) else out).detach().clone())
    )


@pytest.mark.parametrize("family", ["llava", "qwen2_5_vl"])
def test_head_scale_equals_adding_scaled_head_through_o_proj(family: str) -> None:
    """Scaling head i's slice before o_proj by alpha == adding (alpha-1) * A_i W_i^T (VHR spec, check 4)."""
    model, processor = zoo.load_tiny(family)
    inputs = batch_inputs(processor, family)
    adapter = adapter_for(model)
    o_proj = adapter.attention(2).o_proj
    d = adapter.head_dim
    plain_in, plain_out = [], []
    hooks = [capture(o_proj, plain_in, pre=True), capture(o_proj, plain_out)]
    logits(model, inputs)
    for h in hooks:
        h.remove()
    alpha, head = 2.5, 1
    steered_out: list = []
    hook = capture(o_proj, steered_out)
    with steer.apply(model, edits.HeadScale(layers=[2], scale=alpha, heads=[head])):
        logits(model, inputs)
    hook.remove()
    a_i = plain_in[0][..., head * d : (head + 1) * d]
    w_i = o_proj.weight[:, head * d : (head + 1) * d]
    expected = plain_out[0] + (alpha - 1) * a_i @ w_i.T
    assert (steered_out[0] - expected).abs().max() < 1e-5
    assert (steered_out[0] - plain_out[0]).abs().max() > 1e-3


def test_head_scale_per_sample_tensor_and_callable() -> None:
    model, processor = zoo.load_tiny("llava")
    inputs = batch_inputs(processor, "llava", n=2)
    o_proj = adapter_for(model).attention(1).o_proj
    scales = torch.tensor([[1.0, 2.0, 1.0, 1.0], [1.0, 1.0, 1.0, 0.0]])
    seen: list = []
    hook = capture(o_proj, seen, pre=True)
    logits(model, inputs)
    with steer.apply(model, edits.HeadScale(layers=[1], scale=lambda e: scales)):
        logits(model, inputs)
    hook.remove()
    plain, steered = seen[0].view(2, -1, 4, 16), seen[1].view(2, -1, 4, 16)
    assert torch.allclose(steered, plain * scales[:, None, :, None], atol=1e-6)


def test_residual_add_adds_vector_at_layer_output() -> None:
    model, processor = zoo.load_tiny("qwen2_vl")
    inputs = batch_inputs(processor, "qwen2_vl", n=2)
    adapter = adapter_for(model)
    v = torch.randn(2, adapter.hidden_size)
    seen: list = []
    hook = capture(adapter.decoder_layers[3], seen, pre=True)  # layer 3's input = layer 2's output
    logits(model, inputs)
    with steer.apply(model, edits.ResidualAdd(layers=[2], vector=v)):
        logits(model, inputs)
    hook.remove()
    assert torch.allclose(seen[1], seen[0] + v[:, None, :], atol=1e-5)


def test_residual_add_positions_new_only_at_decode() -> None:
    model, processor = zoo.load_tiny("llava")
    inputs = batch_inputs(processor, "llava", n=1)
    ref_prefill = logits(model, inputs)
    phases: list = []

    def vector(ectx: edits.EditContext) -> torch.Tensor:
        phases.append(ectx.phase)
        return torch.full((adapter_for(model).hidden_size,), 5.0)

    with steer.apply(model, edits.ResidualAdd(layers=[1], vector=vector, positions="new")):
        assert torch.equal(logits(model, inputs), ref_prefill)  # nothing added to the prompt
        generate(model, inputs, max_new_tokens=3)
    assert phases == ["decode", "decode"]


def test_logits_transform_sees_final_logits() -> None:
    model, processor = zoo.load_tiny("llava_next")
    inputs = batch_inputs(processor, "llava_next", n=2)
    ref = logits(model, inputs)
    bias = torch.zeros(ref.shape[-1])
    bias[7] = 100.0
    with steer.apply(model, edits.LogitsTransform(fn=lambda f, e: f + bias)):
        out = logits(model, inputs)
        tokens = generate(model, inputs, max_new_tokens=3)
    assert torch.allclose(out, ref + bias, atol=1e-5)
    assert bool((tokens == 7).all())


def test_attention_mask_and_blocks_keys() -> None:
    """ANDing a mask that hides every image key from text rows == the model never seeing the image there."""
    model, processor = zoo.load_tiny("llava")
    inputs = batch_inputs(processor, "llava", n=2)
    image = inputs["input_ids"] == model.config.image_token_id

    def hide_image(ectx: edits.EditContext) -> torch.Tensor:
        keys = ectx.forward.key_image_mask(ectx.key_len)
        return ~keys[:, None, None, :]

    with steer.apply(model, edits.AttentionMask(layers="all", mask=hide_image, mode="and")):
        out = logits(model, inputs)
    # reference: additive mask with finfo.min on image keys
    floor = torch.finfo(torch.float32).min
    with steer.apply(
        model,
        edits.AttentionMask(layers="all", mask=lambda e: (e.forward.key_image_mask(e.key_len) * floor)[:, None, None, :], mode="add"),
    ):
        ref = logits(model, inputs)
    text_rows = ~image & inputs["attention_mask"].bool()
    first_image = image.float().argmax(1)
    after = torch.arange(image.shape[1])[None] > first_image[:, None]
    rows = text_rows & after
    assert (out - ref)[rows].abs().max() < 1e-4
    plain = logits(model, inputs)
    assert (out - plain)[rows].abs().max() > 1e-3


def test_group_reweight_fused_equals_reference_in_model() -> None:
    from steer.kernels import dispatch

    model, processor = zoo.load_tiny("llava_next")
    inputs = batch_inputs(processor, "llava_next")
    edit = edits.GroupReweight(layers=[1, 3], coefficients=[1.0, 3.0], groups="image", rows="after_image", renormalize=True)
    with steer.apply(model, edit):
        fused = logits(model, inputs)
        with dispatch.forced_impl("reference"):
            ref = logits(model, inputs)
    real = inputs["attention_mask"].bool()
    assert (fused - ref)[real].abs().max() < 1e-5
    assert (fused - logits(model, inputs))[real].abs().max() > 1e-3  # the edit really acts


# ---- context: image spans, padding, several images --------------------------------------------------


def spans_seen(model: torch.nn.Module, inputs: dict, method: str = "image_attention") -> list:
    seen: list = []

    def record(out: torch.Tensor, ectx: edits.EditContext) -> None:
        if ectx.phase == "prefill" and ectx.layer == 0:
            seen.append(ectx.forward.image_spans)

    with steer.apply(model, [edits.HeadOutputEdit(layers=[0], fn=record)]):
        logits(model, inputs)
    return seen[0]


@pytest.mark.parametrize("family", FAMILIES)
def test_image_spans_under_left_padding(family: str) -> None:
    model, processor = zoo.load_tiny(family)
    inputs = batch_inputs(processor, family, n=3)
    spans = spans_seen(model, inputs)
    ids = inputs["input_ids"]
    image = ids == model.config.image_token_id
    for b in range(3):
        (start, end), = spans[b]
        positions = image[b].nonzero().flatten()
        assert (start, end) == (int(positions[0]), int(positions[-1]) + 1)
        assert end - start == int(image[b].sum())
        assert start > int((~inputs["attention_mask"][b].bool()).sum()) - 1  # after the left padding


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl"])
def test_qwen_two_images_of_different_sizes(family: str) -> None:
    model, processor = zoo.load_tiny(family)
    prompt = zoo.chat_prompt(family, "Compare the two images.", n_images=2)
    inputs = zoo.make_inputs(
        processor, family, [prompt, zoo.chat_prompt(family, "One.")],
        [[zoo.sample_image(1, (56, 56)), zoo.sample_image(2, (84, 56))], [zoo.sample_image(3, (56, 84))]],
    )
    assert inputs["image_grid_thw"].tolist() == [[1, 4, 4], [1, 4, 6], [1, 6, 4]]
    spans = spans_seen(model, inputs)
    lengths = [[e - s for s, e in row] for row in spans]
    assert lengths == [[4, 6], [6]]
    ref = generate(model, inputs)
    with steer.apply(model, "image_attention", scale=5.0):
        steered_logits = logits(model, inputs)
        generate(model, inputs)
    assert (steered_logits - logits(model, inputs))[inputs["attention_mask"].bool()].abs().max() > 1e-4
    assert torch.equal(generate(model, inputs), ref)


def test_llava_adjacent_images_split_by_known_count() -> None:
    model, processor = zoo.load_tiny("llava")
    prompt = "USER: <image><image>\nTwo pictures. ASSISTANT:"
    inputs = zoo.make_inputs(processor, "llava", [prompt], [[zoo.sample_image(1), zoo.sample_image(2)]])
    spans = spans_seen(model, inputs)[0]
    assert [e - s for s, e in spans] == [16, 16]
    assert spans[0][1] == spans[1][0]


def test_decode_context_tracks_positions() -> None:
    model, processor = zoo.load_tiny("llava")
    inputs = batch_inputs(processor, "llava", n=2)
    seen: list = []

    def record(out: torch.Tensor, ectx: edits.EditContext) -> None:
        if ectx.layer == 0:
            f = ectx.forward
            seen.append((f.phase, f.past_length, f.query_len, ectx.key_len))

    with steer.apply(model, edits.HeadOutputEdit(layers=[0], fn=record)):
        generate(model, inputs, max_new_tokens=3)
    t = inputs["input_ids"].shape[1]
    assert seen == [("prefill", 0, t, t), ("decode", t, 1, t + 1), ("decode", t + 1, 1, t + 2)]


def test_adjacent_images_split_during_generate() -> None:
    """generate() hands the model encoded images, not pixel_values; LLaVA spans still split per image."""
    model, processor = zoo.load_tiny("llava")
    prompt = "USER: <image><image>\nTwo pictures. ASSISTANT:"
    inputs = zoo.make_inputs(processor, "llava", [prompt], [[zoo.sample_image(1), zoo.sample_image(2)]])
    seen: list = []

    def record(out: torch.Tensor, ectx: edits.EditContext) -> None:
        if ectx.phase == "prefill" and ectx.layer == 0:
            seen.append(ectx.forward.image_spans[0])

    with steer.apply(model, edits.HeadOutputEdit(layers=[0], fn=record)):
        generate(model, inputs, max_new_tokens=2)
    assert [e - s for s, e in seen[0]] == [16, 16]
