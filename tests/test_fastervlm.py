"""FasterVLM ([CLS]-attention visual token pruning; specs/fastervlm.md): the spec's checks on the tiny zoo models."""

from __future__ import annotations

import functools
from typing import Any

import pytest
import torch
from conftest import FAMILIES
from helpers import batch_inputs, generate, hook_count, logits, row_inputs

import steer
from steer import zoo
from steer.adapters import adapter_for
from steer.adapters.llava_next import next_token_counts
from steer.adapters.scores import cls_attention
from steer.backends.transformers.runtime import Runtime
from steer.edits.artifacts import PrunedLayout
from steer.errors import IncompatibleMethodsError, InvalidParameterError, UnsupportedModelError
from steer.methods.vlm.fastervlm import FasterVLMError, budget, select_top

PINPOINTS_336 = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]
QWEN = ("qwen2_vl", "qwen2_5_vl")


@functools.cache
def tiny(family: str, impl: str = "sdpa") -> tuple[Any, Any]:
    model, processor = zoo.load_tiny(family, attn_implementation=impl)
    logits(model, batch_inputs(processor, family, n=1))  # transformers installs its own hooks on the first call
    return model, processor


def inputs_for(processor: Any, family: str, images: list[list[Any]], question: str = "Describe.") -> Any:
    prompts = [zoo.chat_prompt(family, question, n_images=len(row)) for row in images]
    return zoo.make_inputs(processor, family, prompts, images)


class LMInputs:
    """Records what the language model receives at every call (prefill and decode)."""

    def __init__(self, model: Any) -> None:
        self.calls: list[dict[str, Any]] = []
        self._handle = model.model.language_model.register_forward_pre_hook(self._hook, with_kwargs=True)

    def _hook(self, module: Any, args: tuple, kwargs: dict) -> None:
        self.calls.append({k: kwargs.get(k) for k in ("inputs_embeds", "position_ids", "attention_mask")})

    def remove(self) -> None:
        self._handle.remove()


def prefill_ids(model: Any) -> torch.Tensor:
    """input_ids of the last prefill as the model received them (steer's per-forward context)."""
    runtime = Runtime.of(model)
    assert runtime is not None
    return runtime.context.prompt_ids


def image_token_counts(model: Any) -> list[int]:
    ids = prefill_ids(model)
    return (ids == model.config.image_token_id).sum(dim=1).tolist()


# --------------------------------------------------------------------------------------------------
# pure functions


def test_budget_rounding_and_errors() -> None:
    assert [budget(576, r) for r in (0.25, 0.5, 0.75, 0.9, 0.95)] == [432, 288, 144, 58, 29]
    assert budget(294, 0.9) == 29 and budget(294, 0.75) == 74  # Qwen grid (1, 28, 42)
    assert budget(10, 0.75) == 2 and budget(6, 0.75) == 2  # half to even: 2.5 -> 2, 1.5 -> 2
    assert budget(576, 0.95, num_tokens=64) == 64
    with pytest.raises(InvalidParameterError, match="at least 1"):
        budget(16, 0.97)
    with pytest.raises(InvalidParameterError, match="num_tokens"):
        budget(16, 0.5, num_tokens=17)


def test_next_counts_match_spec() -> None:
    assert next_token_counts((480, 640), PINPOINTS_336, 336, 14, 58) == (2340, 326)
    assert next_token_counts((480, 640), PINPOINTS_336, 336, 14, 58, "spatial") == (2340, 290)
    assert next_token_counts((336, 672), PINPOINTS_336, 336, 14, 58) == (1752, 198)


def test_select_top_is_sorted_topk() -> None:
    g = torch.Generator().manual_seed(0)
    s = torch.rand(576, generator=g)
    kept = select_top(s, 58)
    assert torch.all(kept[1:] > kept[:-1])
    assert set(kept.tolist()) == set(torch.topk(s, 58).indices.tolist())
    valid = torch.rand(576, generator=g) > 0.5
    kept = select_top(s, 20, valid)
    assert bool(valid[kept].all()) and set(kept.tolist()) == set(
        torch.topk(s.masked_fill(~valid, -1), 20).indices.tolist()
    )


# --------------------------------------------------------------------------------------------------
# scores: the recomputed [CLS] row and the kept set against eager attention


def eager_cls_scores(family: str, pixel_values: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Head-mean [CLS] row of the score layer from the eager tower's ``attentions``, and the layer's inputs."""
    model, _ = tiny(family, "eager")
    k = model.config.vision_config.num_hidden_layers - 2  # f = -2: k = (f mod (L_v + 1)) - 1 = L_v - 2
    tower = model.model.vision_tower
    captured: list[torch.Tensor] = []
    handle = tower.encoder.layers[k].self_attn.register_forward_pre_hook(
        lambda m, a, kw: captured.append((a[0] if a else kw["hidden_states"]).detach()), with_kwargs=True
    )
    try:
        with torch.no_grad():
            out = tower(pixel_values, output_attentions=True)
    finally:
        handle.remove()
    row = out.attentions[k][:, :, 0, 1:]
    assert torch.allclose(cls_attention(captured[0], tower.encoder.layers[k].self_attn), row.mean(1), atol=1e-6)
    assert bool((row.sum(-1) < 1).all())
    return row.mean(1), captured


def flat_crops(model: Any, inputs: Any) -> torch.Tensor:
    from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

    config = model.config
    counts = [
        image_size_to_num_patches(s, config.image_grid_pinpoints, config.vision_config.image_size)
        for s in inputs["image_sizes"].tolist()
    ]
    return torch.cat([pv[:c] for pv, c in zip(inputs["pixel_values"], counts)])


def test_kept_is_topk_of_eager_cls_attention_llava() -> None:
    model, processor = tiny("llava")
    inputs = batch_inputs(processor, "llava", n=2)
    scores, _ = eager_cls_scores("llava", inputs["pixel_values"])
    with steer.apply(model, "fastervlm", reduction=0.75) as h:
        generate(model, inputs, max_new_tokens=2)
        samples = h.state["fastervlm"]["samples"]
    for b, row in enumerate(samples):
        (image,) = row
        assert (image["N"], image["T"], image["sent"]) == (16, 4, 4)
        kept = image["kept"]
        assert torch.all(kept[1:] > kept[:-1])
        assert set(kept.tolist()) == set(torch.topk(scores[b], 4).indices.tolist())


def test_kept_is_topk_of_eager_cls_attention_next_per_crop() -> None:
    """Two images of different sizes; the 40x64 one loses grid cells to unpadding (K_c = min(T, valid_c))."""
    model, processor = tiny("llava_next")
    images = [[zoo.sample_image(1, size=(56, 56))], [zoo.sample_image(2, size=(64, 40))]]
    inputs = inputs_for(processor, "llava_next", images)
    scores, _ = eager_cls_scores("llava_next", flat_crops(model, inputs))
    with steer.apply(model, "fastervlm", reduction=0.25) as h:  # N = 4 per crop, T = 3
        generate(model, inputs, max_new_tokens=2)
        samples = h.state["fastervlm"]["samples"]
        assert image_token_counts(model) == [3 + 4 * 3 + 4, 3 + 4 * 2 + 2]
    expect = [next_token_counts((56, 56), model.config.image_grid_pinpoints, 28, 14, 3)[1],
              next_token_counts((40, 64), model.config.image_grid_pinpoints, 28, 14, 3)[1]]
    assert [row[0]["sent"] for row in samples] == expect == [19, 13]
    offset = 0
    for row in samples:
        crops = row[0]["crops"]
        assert crops[0]["T"] == 3 and set(crops[0]["kept"].tolist()) == set(
            torch.topk(scores[offset], 3).indices.tolist()
        )
        for c, crop in enumerate(crops[1:], start=1):
            assert crop["T"] == min(3, crop["valid"])
            assert torch.all(crop["kept"][1:] > crop["kept"][:-1])
            if crop["valid"] == 4:
                assert set(crop["kept"].tolist()) == set(torch.topk(scores[offset + c], 3).indices.tolist())
        offset += len(crops)
    assert [c["valid"] for c in samples[1][0]["crops"][1:]] == [2, 2, 2, 2]


def test_features_are_projected_kept_tokens_and_prompt_independent() -> None:
    """LLM image embeddings == stock projector output at kept == proj(X[kept]); same image, two prompts."""
    model, processor = tiny("llava")
    kept_sets, embeds = [], []
    for question in ("Describe.", "What color is the big object in this picture?"):
        inputs = inputs_for(processor, "llava", [[zoo.sample_image(5)]], question)
        with torch.no_grad():
            stock = model.model.get_image_features(pixel_values=inputs["pixel_values"], return_dict=True)
            hidden = model.model.vision_tower(inputs["pixel_values"], output_hidden_states=True).hidden_states[-2][:, 1:]
        rec = LMInputs(model)
        try:
            with steer.apply(model, "fastervlm", reduction=0.75) as h:
                logits(model, inputs)
                kept = h.state["fastervlm"]["samples"][0][0]["kept"]
                mask = prefill_ids(model)[0] == model.config.image_token_id
        finally:
            rec.remove()
        got = rec.calls[0]["inputs_embeds"][0][mask]
        assert torch.equal(got, stock.pooler_output[0][kept])
        with torch.no_grad():
            assert torch.allclose(got, model.model.multi_modal_projector(hidden[0][kept]), atol=1e-6)
        kept_sets.append(kept.tolist())
        embeds.append(got)
    assert kept_sets[0] == kept_sets[1] and torch.equal(embeds[0], embeds[1])


def test_qwen25_scores_are_unpermuted_received_attention() -> None:
    """112x112 -> 4x4 merged grid in 4 windows: a natural-order recomputation picks the same tokens."""
    from transformers.vision_utils import get_vision_window_index

    model, processor = tiny("qwen2_5_vl")
    inputs = inputs_for(processor, "qwen2_5_vl", [[zoo.sample_image(3, size=(112, 112))]])
    visual = model.model.visual
    k = max(model.config.vision_config.fullatt_block_indexes)
    attn = visual.blocks[k].attn
    seen: list[tuple[torch.Tensor, Any]] = []
    hook = attn.register_forward_pre_hook(lambda m, a, kw: seen.append((a[0], kw["position_embeddings"])), with_kwargs=True)
    try:
        with steer.apply(model, "fastervlm", reduction=0.75) as h:  # N' = 16, T = 4
            generate(model, inputs, max_new_tokens=2)
            image = h.state["fastervlm"]["samples"][0][0]
    finally:
        hook.remove()
    x, (cos, sin) = seen[0]
    window, _ = get_vision_window_index(inputs["image_grid_thw"], 2, visual.window_size, visual.patch_size)
    assert not torch.equal(window, torch.arange(window.numel()))  # the permutation is not trivial
    unit = torch.argsort(window)  # natural merge unit u sits at permuted unit unit[u]
    patches = (unit[:, None] * 4 + torch.arange(4)[None]).flatten()
    x, cos, sin = x[patches], cos[patches], sin[patches]
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import apply_rotary_pos_emb_vision

    q, kk, _ = attn.qkv(x).reshape(x.shape[0], 3, attn.num_heads, -1).permute(1, 0, 2, 3).unbind(0)
    q, kk = apply_rotary_pos_emb_vision(q, kk, cos, sin)
    probs = torch.softmax(torch.einsum("qhd,khd->hqk", q, kk) * attn.scaling, dim=-1)
    merged = probs.mean(dim=(0, 1)).view(-1, 4).mean(-1)
    assert (image["N"], image["T"]) == (16, 4)
    assert image["kept"].tolist() == sorted(torch.topk(merged, 4).indices.tolist())


# --------------------------------------------------------------------------------------------------
# the sequence the LLM sees


@pytest.mark.parametrize("family", FAMILIES)
def test_reduction_zero_installs_nothing(family: str) -> None:
    model, processor = tiny(family)
    inputs = batch_inputs(processor, family)
    ref_logits, ref_tokens = logits(model, inputs), generate(model, inputs)
    with steer.apply(model, "fastervlm", reduction=0.0) as h:
        assert h.edits == []
        assert torch.equal(logits(model, inputs), ref_logits)
        assert torch.equal(generate(model, inputs), ref_tokens)


@pytest.mark.parametrize("family", FAMILIES)
def test_keeping_every_token_equals_the_unpruned_model(family: str) -> None:
    """num_tokens = N runs the whole pruning path (encode, gather, re-pad, positions) and changes nothing."""
    model, processor = tiny(family)
    inputs = batch_inputs(processor, family)
    ref_logits, ref_tokens = logits(model, inputs), generate(model, inputs, num_beams=2)
    hooks = hook_count(model)
    with steer.apply(model, "fastervlm", num_tokens=4 if family != "llava" else 16) as h:
        assert torch.equal(logits(model, inputs), ref_logits)
        assert torch.equal(generate(model, inputs, num_beams=2), ref_tokens)
        assert "generate" in model.__dict__
    assert "generate" not in model.__dict__ and hook_count(model) == hooks and h.state["fastervlm"]["samples"]


@pytest.mark.parametrize("family", FAMILIES)
def test_llm_sees_T_tokens_per_image(family: str) -> None:
    model, processor = tiny(family)
    inputs = batch_inputs(processor, family)
    stock = (inputs["input_ids"] == model.config.image_token_id).sum(1).tolist()
    with steer.apply(model, "fastervlm", reduction=0.5) as h:
        out = generate(model, inputs, max_new_tokens=3)
        counts = image_token_counts(model)
        samples = h.state["fastervlm"]["samples"]
    expected = {"llava": 8, "llava_next": 2 + 4 * 2 + 4, "qwen2_vl": 2, "qwen2_5_vl": 2}[family]
    assert counts == [expected] * 3 == [row[0]["sent"] for row in samples]
    assert sum(stock) - sum(counts) == 3 * ({"llava": 16, "llava_next": 24}.get(family, 4) - expected)
    assert out.shape == (3, 3)


@pytest.mark.parametrize("num_beams", [1, 3])
@pytest.mark.parametrize("family", FAMILIES)
def test_batch_equals_per_sample(family: str, num_beams: int) -> None:
    model, processor = tiny(family)
    inputs = batch_inputs(processor, family, n=3)
    assert len(set(inputs["attention_mask"].sum(1).tolist())) == 3  # left padded
    with steer.apply(model, "fastervlm", reduction=0.5):
        batch = generate(model, inputs, num_beams=num_beams, max_new_tokens=4)
        for i in range(3):
            alone = generate(model, row_inputs(processor, family, i), num_beams=num_beams, max_new_tokens=4)
            assert torch.equal(batch[i], alone[0]), f"row {i}"


def test_generate_works_unchanged_and_tower_runs_once() -> None:
    model, processor = tiny("llava")
    inputs = batch_inputs(processor, "llava", n=2)
    calls = []
    hook = model.model.vision_tower.register_forward_hook(lambda *a: calls.append(1))
    try:
        with steer.apply(model, "fastervlm", reduction=0.75):
            out = model.generate(**inputs, max_new_tokens=3, min_new_tokens=3, do_sample=False, num_beams=3)
            assert len(calls) == 1
            dict_out = model.generate(
                **inputs, max_new_tokens=3, min_new_tokens=3, do_sample=False, return_dict_in_generate=True
            )
    finally:
        hook.remove()
    width = inputs["input_ids"].shape[1]
    assert out.shape == (2, width + 3) and torch.equal(out[:, :width], inputs["input_ids"])
    assert torch.equal(dict_out.sequences[:, :width], inputs["input_ids"])


def stock_positions(model: Any, inputs: Any, n: int = 3) -> list[dict[str, Any]]:
    rec = LMInputs(model)
    try:
        generate(model, inputs, max_new_tokens=n)
    finally:
        rec.remove()
    return rec.calls


@pytest.mark.parametrize("mode", ["contiguous", "original"])
def test_llava_positions(mode: str) -> None:
    model, processor = tiny("llava")
    inputs = batch_inputs(processor, "llava", n=2)
    ref = stock_positions(model, inputs)
    with steer.apply(model, "fastervlm", reduction=0.75, positions=mode) as h:
        rec = LMInputs(model)  # registered after steer's position edit: sees what the layers get
        try:
            generate(model, inputs, max_new_tokens=3)
        finally:
            rec.remove()
        samples = h.state["fastervlm"]["samples"]
        pruned_ids = prefill_ids(model)
    assert pruned_ids.shape[1] == inputs["input_ids"].shape[1] - 12
    image_id = model.config.image_token_id
    for b in range(2):
        ids, real = inputs["input_ids"][b], inputs["attention_mask"][b].bool()
        stock_pos = ref[0]["position_ids"][b][real]
        image = (ids[real] == image_id).nonzero().flatten()
        drop = image[[i for i in range(16) if i not in samples[b][0]["kept"].tolist()]]
        keep = torch.ones(int(real.sum()), dtype=torch.bool)
        keep[drop] = False
        got = rec.calls[0]["position_ids"][b][rec.calls[0]["attention_mask"][b].bool()]
        after = torch.arange(keep.numel()) > image[-1]
        if mode == "original":
            assert torch.equal(got, stock_pos[keep])
        else:
            assert torch.equal(got, torch.arange(got.numel()))
            assert torch.equal(got[after[keep]], stock_pos[after] - 12)
    for step in (1, 2):
        shift = 0 if mode == "original" else 12
        assert torch.equal(rec.calls[step]["position_ids"], ref[step]["position_ids"] - shift)


def test_next_original_positions() -> None:
    """LLaVA-NeXT, positions='original': kept tokens and text keep stock positions, decode too."""
    model, processor = tiny("llava_next")
    inputs = batch_inputs(processor, "llava_next", n=2)
    ref = stock_positions(model, inputs)
    with steer.apply(model, "fastervlm", reduction=0.5, positions="original") as h:
        rec = LMInputs(model)
        try:
            generate(model, inputs, max_new_tokens=3)
        finally:
            rec.remove()
        samples = h.state["fastervlm"]["samples"]
    image_id = model.config.image_token_id
    for b in range(2):
        real = inputs["attention_mask"][b].bool()
        stock_pos = ref[0]["position_ids"][b][real]
        image = (inputs["input_ids"][b][real] == image_id).nonzero().flatten()
        keep = torch.ones(int(real.sum()), dtype=torch.bool)
        keep[image] = False
        keep[image[samples[b][0]["offsets"]]] = True
        got = rec.calls[0]["position_ids"][b][rec.calls[0]["attention_mask"][b].bool()]
        assert int(keep.sum()) == got.numel() and torch.equal(got, stock_pos[keep])
    for step in (1, 2):
        assert torch.equal(rec.calls[step]["position_ids"], ref[step]["position_ids"])
    with pytest.raises(InvalidParameterError, match="spatial"):
        steer.apply(model, "fastervlm", positions="original", next_layout="spatial")


def test_qwen_two_images_of_different_sizes() -> None:
    model, processor = tiny("qwen2_vl")
    images = [[zoo.sample_image(1, size=(56, 56)), zoo.sample_image(2, size=(84, 56))], [zoo.sample_image(3)]]
    inputs = inputs_for(processor, "qwen2_vl", images)
    assert inputs["image_grid_thw"][:, 1:].prod(-1).div(4).tolist() == [4, 6, 4]
    with torch.no_grad():
        stock_pos, _ = model.model.get_rope_index(
            inputs["input_ids"], inputs["mm_token_type_ids"], inputs["image_grid_thw"],
            attention_mask=inputs["attention_mask"],
        )
    with steer.apply(model, "fastervlm", reduction=0.5) as h:  # T = 2 and 3 in row 0, 2 in row 1
        generate(model, inputs, max_new_tokens=3)
        samples = h.state["fastervlm"]["samples"]
        ids = prefill_ids(model)
        assert image_token_counts(model) == [5, 2]
        deltas = model.model.rope_deltas
        mask = Runtime.of(model).context.padding_mask[:, : ids.shape[1]]
        with torch.no_grad():
            types = (ids == model.config.image_token_id).long()
            new_pos, new_deltas = model.model.get_rope_index(
                ids, types, inputs["image_grid_thw"], attention_mask=mask.long()
            )
    assert [[(im["N"], im["T"], im["sent"]) for im in row] for row in samples] == [[(4, 2, 2), (6, 3, 3)], [(4, 2, 2)]]
    assert torch.equal(new_deltas, deltas)
    image_id = model.config.image_token_id
    for b in range(2):
        real0 = inputs["attention_mask"][b].bool()
        row_ids = inputs["input_ids"][b][real0]
        image = (row_ids == image_id).nonzero().flatten()
        kept_offsets, start = [], 0
        for im in samples[b]:
            kept_offsets += [start + int(i) for i in im["kept"]]
            start += im["N"]
        keep = row_ids != image_id
        keep[image[kept_offsets]] = True
        got = new_pos[:, b][:, mask[b]]
        assert torch.equal(got, stock_pos[:, b][:, real0][:, keep])  # original M-RoPE ids
        assert int(deltas[b]) == int(got.max()) + 1 - int(mask[b].sum())


def test_next_spatial_layout() -> None:
    model, processor = tiny("llava_next")
    images = [[zoo.sample_image(1, size=(56, 56))], [zoo.sample_image(2, size=(64, 40))]]
    inputs = inputs_for(processor, "llava_next", images)
    with steer.apply(model, "fastervlm", reduction=0.5, next_layout="spatial") as h:
        out = generate(model, inputs, max_new_tokens=3)
        assert image_token_counts(model) == [2 * 5, 2 * 5]  # T (1 + nh nw), no newlines, no unpadding
        assert h.state["fastervlm"]["next_layout"] == "spatial"
    assert out.shape == (2, 3)


def test_num_tokens_overrides_reduction() -> None:
    model, processor = tiny("llava")
    inputs = batch_inputs(processor, "llava", n=1)
    with steer.apply(model, "fastervlm", reduction=0.95, num_tokens=5) as h:
        generate(model, inputs, max_new_tokens=2)
        assert image_token_counts(model) == [5] and h.state["fastervlm"]["samples"][0][0]["T"] == 5


def test_errors() -> None:
    model, processor = tiny("llava")
    with pytest.raises(InvalidParameterError, match="at least 1"):
        steer.apply(model, "fastervlm", reduction=0.97)  # T = round(16 * 0.03) = 0
    with pytest.raises(InvalidParameterError, match="num_tokens"):
        steer.apply(model, "fastervlm", num_tokens=17)
    with pytest.raises(InvalidParameterError, match="score_layer"):
        steer.apply(model, "fastervlm", score_layer=5)
    assert Runtime.of(model) is None
    qwen, qproc = tiny("qwen2_vl")
    with steer.apply(qwen, "fastervlm", reduction=0.9):  # N' = 4 -> T = 0 at call time
        with pytest.raises(InvalidParameterError, match="at least 1"):
            generate(qwen, batch_inputs(qproc, "qwen2_vl", n=1))
    inputs = batch_inputs(processor, "llava", n=2)
    inputs["input_ids"][1][inputs["input_ids"][1] == model.config.image_token_id] = 5  # row 1 loses its image
    with steer.apply(model, "fastervlm"):
        with pytest.raises(FasterVLMError, match="do not match"):
            generate(model, inputs)


def test_transformers_without_mm_encoder_outputs_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    """Before transformers 5.18 the models took no precomputed image features; FasterVLM says so at apply."""
    model, _ = tiny("llava")
    inner = type(model.model)

    def old_forward(self: Any, input_ids: Any = None, pixel_values: Any = None, **kwargs: Any) -> Any:
        raise AssertionError("not called")

    monkeypatch.setattr(inner, "forward", old_forward)
    with pytest.raises(UnsupportedModelError, match=r"transformers>=5\.18"):
        steer.apply(model, "fastervlm")
    assert Runtime.of(model) is None


# --------------------------------------------------------------------------------------------------
# composition


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_composes_with_attention_methods(family: str) -> None:
    """image_attention and VAR see the pruned sequence (image mask = kept tokens only)."""
    model, processor = tiny(family)
    inputs = batch_inputs(processor, family)
    with steer.apply(model, "fastervlm", reduction=0.5):
        alone = logits(model, inputs)
    with steer.apply(model, ["image_attention", "fastervlm"], scale=3.0, reduction=0.5):
        runtime = Runtime.of(model)
        both = logits(model, inputs)
        mask = runtime.context.image_mask
        assert mask.sum(1).tolist() == [8 if family == "llava" else 2] * 3
        assert [e - s for row in runtime.context.image_spans for s, e in row] == [mask.sum(1).tolist()[0]] * 3
        generate(model, inputs, num_beams=2, max_new_tokens=3)
    assert both.shape == alone.shape and (both - alone).abs().max() > 1e-3
    with steer.apply(model, ["fastervlm", "var"], var={"sink_dims": [0, 1], "tau": 1e-3}, fastervlm={"reduction": 0.5}):
        tokens = generate(model, inputs, max_new_tokens=3)
        assert Runtime.of(model).context.image_mask.sum(1).tolist() == mask.sum(1).tolist()
    assert tokens.shape == (3, 3)


def pruned_call(model: Any, inputs: Any, **fastervlm: Any) -> dict[str, Any]:
    """What the model's forward receives once FasterVLM has pruned a direct call (ids, mask, kept features)."""
    seen: list[dict[str, Any]] = []
    hook = model.register_forward_pre_hook(lambda m, a, kw: seen.append(dict(kw)), with_kwargs=True)
    try:
        with steer.apply(model, "fastervlm", **fastervlm):
            logits(model, inputs)
    finally:
        hook.remove()
    return {k: seen[0][k] for k in ("input_ids", "attention_mask", "mm_encoder_outputs") if seen[0].get(k) is not None}


@pytest.mark.parametrize(
    "method, params",
    [("var", {"sink_dims": list(range(16)), "tau": 2.5, "p": 0.1, "rho": 0.0, "min_visual_mass": 0.0}), ("vhr", {"layers": [1, 2], "alpha": 3.0})],
)
def test_pruning_then_a_method_equals_the_method_on_the_pruned_prompt(method: str, params: dict) -> None:
    """fastervlm + X == X alone on the prompt FasterVLM sends the language model (LLaVA, contiguous positions):
    X sees the pruned sequence (its image tokens are the kept ones; VHR's no-image branch is the pruned prompt
    without them), and acts there."""
    model, processor = tiny("llava")
    inputs = batch_inputs(processor, "llava")
    pruned = pruned_call(model, inputs, reduction=0.5)
    assert (pruned["input_ids"] == model.config.image_token_id).sum(1).tolist() == [8, 8, 8]
    with steer.apply(model, method, **params) as alone:
        expected = logits(model, pruned)
        expected_state = alone.state[method]
    with steer.apply(model, ["fastervlm", method], fastervlm={"reduction": 0.5}, **{method: params}) as both:
        got = logits(model, inputs)
        state = both.state[method]
    with steer.apply(model, "fastervlm", reduction=0.5):
        pruned_only = logits(model, inputs)
    assert torch.allclose(got, expected, atol=1e-5)
    assert (got - pruned_only).abs().max() > 1e-3  # the method really acts on the pruned prompt
    if method == "var":
        assert [row[2]["visual_sinks"] for row in state["samples"]] == [row[2]["visual_sinks"] for row in expected_state["samples"]]
        assert int(sum(int(row[2]["selected_rows"].sum()) for row in state["samples"])) > 0
    else:
        assert state["heads"] == expected_state["heads"]


def test_composes_with_cca_on_the_kept_tokens() -> None:
    """CCA lays out the pruned blocks from the PrunedLayout artifact FasterVLM publishes for the call: the kept
    tokens keep the rings of their original (i, j) on the 4 x 4 grid, Delta = T - R = 8 - 2 (more in
    tests/test_cca.py)."""
    from steer.methods.vlm.cca import rings

    model, processor = tiny("llava")
    with pytest.warns(UserWarning), steer.apply(model, ["cca", "fastervlm"], fastervlm={"reduction": 0.5}) as h:
        assert generate(model, batch_inputs(processor, "llava", n=1), max_new_tokens=3).shape == (1, 3)
        runtime = Runtime.of(model)
        layout = runtime.context.call.artifacts[PrunedLayout]
        ids = runtime.context.prompt_ids
        kept = h.state["fastervlm"]["samples"][0][0]["kept"]
        cca_state = h.state["cca"]["samples"][0]
    image = layout.images[0][0]
    assert (image.sent, image.stock, layout.positions) == (8, 16, "contiguous")
    assert image.blocks[0].block.grid == (4, 4) and image.blocks[0].kept.tolist() == kept.tolist()
    start = int((ids[0] == model.config.image_token_id).nonzero()[0])
    assert cca_state["blocks"][0] == {"start": start, "grid": (4, 4), "R": 2, "tokens": 8, "kind": "image", "kept": kept.tolist()}
    assert cca_state["deltas"] == [8 - 2]
    ring = rings(4, 4).flatten()[kept]
    image_ids = cca_state["position_ids"][start : start + 8]  # no left padding with one row
    assert (image_ids - image_ids[0] + ring[0]).tolist() == ring.tolist()


def test_refuses_a_grid_method_that_cannot_read_the_pruned_layout(monkeypatch: pytest.MonkeyPatch) -> None:
    """A method that uses the image grid but does not consume PrunedLayout is refused at apply, before anything
    is installed (it would lay out the stock grid on a pruned prompt)."""
    from steer.methods.vlm.cca import CCA

    monkeypatch.setattr(CCA, "consumes", ())
    model, processor = tiny("llava")
    with pytest.raises(IncompatibleMethodsError, match="fastervlm provides PrunedLayout.*cca"):
        steer.apply(model, ["cca", "fastervlm"])
    assert Runtime.of(model) is None


def test_recipes() -> None:
    for family in ("llava-1.5", "llava-next", "qwen2-vl", "qwen2.5-vl"):
        assert steer.recipe(f"{family}/fastervlm").methods == {"fastervlm": {"reduction": 0.75}}
        assert steer.recipe(f"{family}/fastervlm-90").methods == {"fastervlm": {"reduction": 0.9}}


# --------------------------------------------------------------------------------------------------
# scores through the tower's own modules: quantised, adapted, offloaded (issue 17 A2)


class FakeInt8Linear(torch.nn.Module):
    """A weight-only int8 linear layer: ``weight`` holds int8 codes, the forward dequantises (as bitsandbytes'
    8-bit layers do); reading ``.weight`` as a float matrix gives the wrong projection."""

    def __init__(self, linear: torch.nn.Linear) -> None:
        super().__init__()
        w = linear.weight.detach()
        self.scale = torch.nn.Parameter(w.abs().amax(1, keepdim=True) / 127.0, requires_grad=False)
        self.weight = torch.nn.Parameter(torch.round(w / self.scale).to(torch.int8), requires_grad=False)
        self.bias = linear.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.linear(x, self.weight.float() * self.scale, self.bias)


class LoRALinear(torch.nn.Module):
    """``base(x) + x A^T B^T`` (a LoRA adapter on a projection)."""

    def __init__(self, base: torch.nn.Linear, a: torch.Tensor, b: torch.Tensor) -> None:
        super().__init__()
        self.base, self.a, self.b = base, a, b

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + x @ self.a.T @ self.b.T


def kept_of(model: Any, inputs: Any) -> list[list[int]]:
    with steer.apply(model, "fastervlm", reduction=0.5) as h:
        logits(model, inputs)
        return [row[0]["kept"].tolist() for row in h.state["fastervlm"]["samples"]]


def scoring_attention(model: Any) -> Any:
    adapter = adapter_for(model)
    return adapter.vision_attention(adapter.info.default_score_layer)


def test_scores_go_through_quantised_projection_modules() -> None:
    model, processor = zoo.load_tiny("llava")
    inputs = batch_inputs(processor, "llava")
    attn = scoring_attention(model)
    with torch.no_grad():  # make the weights exactly representable in int8, so fp32 and int8 agree
        for proj in (attn.q_proj, attn.k_proj):
            scale = proj.weight.abs().amax(1, keepdim=True) / 127.0
            proj.weight.copy_(torch.round(proj.weight / scale) * scale)
    reference = kept_of(model, inputs)
    attn.q_proj, attn.k_proj = FakeInt8Linear(attn.q_proj), FakeInt8Linear(attn.k_proj)
    assert attn.q_proj.weight.dtype == torch.int8
    assert kept_of(model, inputs) == reference


def test_scores_see_a_lora_adapter_on_the_tower() -> None:
    model, processor = zoo.load_tiny("llava")
    inputs = batch_inputs(processor, "llava")
    attn = scoring_attention(model)
    g = torch.Generator().manual_seed(3)
    a, b = torch.randn(2, attn.k_proj.in_features, generator=g), torch.randn(attn.k_proj.out_features, 2, generator=g)
    plain = kept_of(model, inputs)
    merged, _ = zoo.load_tiny("llava")  # the same tower with the adapter merged into the weights
    with torch.no_grad():
        scoring_attention(merged).k_proj.weight += b @ a
    expected = kept_of(merged, inputs)
    attn.k_proj = LoRALinear(attn.k_proj, a, b)
    got = kept_of(model, inputs)
    assert got == expected and got != plain


def test_scores_under_accelerate_offload_of_the_tower() -> None:
    from accelerate import cpu_offload

    model, processor = zoo.load_tiny("llava")
    inputs = batch_inputs(processor, "llava")
    reference = kept_of(model, inputs)
    cpu_offload(model.model.vision_tower, execution_device=torch.device("cpu"))
    assert scoring_attention(model).q_proj.weight.device.type == "meta"
    assert kept_of(model, inputs) == reference


def test_a_tower_without_projection_modules_is_refused_at_apply() -> None:
    model, _ = zoo.load_tiny("llava")
    attn = scoring_attention(model)
    del attn.q_proj
    attn.q_proj = None
    with pytest.raises(UnsupportedModelError, match="no q_proj projection module"):
        steer.apply(model, "fastervlm")
    assert Runtime.of(model) is None


@pytest.mark.parametrize(("family", "score"), [("llava", "cls"), ("llava_next", "cls"), ("qwen2_vl", "received")])
def test_state_says_which_score_the_tower_gives(family: str, score: str) -> None:
    """The [CLS] row where the tower has one, else the mean-received-attention fallback, stated in the state."""
    model, _ = zoo.load_tiny(family)
    with steer.apply(model, "fastervlm") as handle:
        assert handle.state["fastervlm"]["score"] == score
