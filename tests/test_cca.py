"""CCA (specs/cca.md): rings, concentric positions and mask (checks 1-4), identity when off or text-only
(check 5), batch/beam = per sample (6), KV-cache consistency (7), Qwen M-RoPE variants (8), sdpa = eager (9)."""

from __future__ import annotations

import warnings

import pytest
import torch
from helpers import generate, logits, with_cache

import steer
from steer import zoo
from steer.adapters import adapter_for
from steer.backends.transformers.runtime import Runtime
from steer.methods.vlm.cca import (
    CCA,
    STOCK_WEIGHTS_WARNING,
    CCALayoutError,
    concentric_mask,
    concentric_positions,
    grid_block,
    newline_grid_block,
    ring_sizes,
    rings,
)
from steer.registry import resolve_params

pytestmark = [pytest.mark.filterwarnings("ignore:CCA was trained"), pytest.mark.usefixtures("one_thread")]


# ---- helpers -----------------------------------------------------------------------------------------


def cca(model: torch.nn.Module, **params: object) -> steer.Steering:
    return steer.apply(model, "cca", **params)


def raw_edits(model: torch.nn.Module, **params: object) -> list:
    """CCA's edits without the front door."""
    method = CCA(resolve_params(CCA, dict(params, trained_checkpoint=True)), adapter_for(model).info, {})
    return method.edits()


def prompts(family: str, n: int, identical: bool = False, size: tuple[int, int] = (56, 56)) -> list:
    questions = ["Describe the image.", "What color is the big object in this picture?", "Count."]
    rows = [zoo.chat_prompt(family, questions[0 if identical else i % 3]) for i in range(n)]
    images = [[zoo.sample_image(10 if identical else 10 + i, size)] for i in range(n)]
    return [rows, images]


def inputs_for(processor: object, family: str, n: int = 2, identical: bool = False, size=(56, 56)) -> object:
    rows, images = prompts(family, n, identical, size)
    return zoo.make_inputs(processor, family, rows, images)


def row_of(processor: object, family: str, i: int, size=(56, 56)) -> object:
    rows, images = prompts(family, i + 1, size=size)
    return zoo.make_inputs(processor, family, [rows[i]], [images[i]])


def record_positions(model: torch.nn.Module) -> tuple[list, object]:
    """Position ids as decoder layer 0 receives them, one entry per forward call."""
    seen: list = []

    def hook(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        seen.append(kwargs["position_ids"].detach().clone())

    handle = adapter_for(model).decoder_layers[0].register_forward_pre_hook(hook, with_kwargs=True)
    return seen, handle


def greedy(
    model: torch.nn.Module, inputs: object, n: int = 5, **kwargs: object
) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        out = model.generate(
            **inputs,
            max_new_tokens=n,
            min_new_tokens=n,
            do_sample=False,
            output_scores=True,
            return_dict_in_generate=True,
            **kwargs,
        )
    return out.sequences[:, inputs["input_ids"].shape[1] :], torch.stack(out.scores, dim=1)


def close(a: torch.Tensor, b: torch.Tensor, tol: float) -> bool:
    """``a`` equals ``b`` within ``tol`` wherever ``b`` is finite (generate's processors put -inf in scores)."""
    finite = torch.isfinite(b)
    return bool((a[finite] - b[finite]).abs().max() < tol)


# ---- check 1: rings ------------------------------------------------------------------------------------


def test_rings() -> None:
    assert ring_sizes(24, 24) == [92, 84, 76, 68, 60, 52, 44, 36, 28, 20, 12, 4]
    assert sum(ring_sizes(24, 24)) == 576 and int(rings(24, 24).max()) + 1 == 12
    assert ring_sizes(18, 27) == list(range(86, 21, -8)) and len(ring_sizes(18, 27)) == 9
    assert rings(4, 4).tolist() == [[0, 0, 0, 0], [0, 1, 1, 0], [0, 1, 1, 0], [0, 0, 0, 0]]
    for h, w in [(5, 3), (2, 3), (4, 4), (7, 9), (1, 6)]:
        sizes = ring_sizes(h, w)
        assert len(sizes) == -(-min(h, w) // 2) and sum(sizes) == h * w
        for r, size in enumerate(sizes):
            hh, ww = h - 2 * r, w - 2 * r
            assert size == (2 * hh + 2 * ww - 4 if min(hh, ww) >= 2 else hh * ww)
    nl = newline_grid_block(10, 3, 4)
    assert nl.ring.view(3, 5).tolist() == [[0, 0, 0, 0, 0], [0, 1, 1, 0, 0], [0, 0, 0, 0, 0]] and nl.R == 2


# ---- check 2: positions -----------------------------------------------------------------------------


def test_positions_24x24_and_decode() -> None:
    pos, deltas = concentric_positions(torch.arange(588), [grid_block(5, 24, 24)])
    assert pos[:5].tolist() == [0, 1, 2, 3, 4]
    assert sorted(set(pos[5:581].tolist())) == list(range(5, 17))
    assert pos[5:581].tolist() == (5 + rings(24, 24).flatten()).tolist()
    assert pos[581:].tolist() == list(range(17, 24))
    assert deltas == [564]
    assert [588 - deltas[-1], 589 - deltas[-1]] == [24, 25]  # decode: sequence index - 564


def test_positions_4x4_left_padded_copy() -> None:
    pos, deltas = concentric_positions(torch.arange(21), [grid_block(3, 4, 4)])
    assert pos[3:19].tolist() == [3, 3, 3, 3, 3, 4, 4, 3, 3, 4, 4, 3, 3, 3, 3, 3]
    assert pos[19:].tolist() == [5, 6] and 21 - deltas[-1] == 7
    pad = 4
    mask = torch.tensor([0] * pad + [1] * 21)
    pos0 = (mask.cumsum(0) - 1).masked_fill(mask == 0, 0)
    padded, _ = concentric_positions(pos0, [grid_block(3 + pad, 4, 4)], real=mask.bool())
    assert torch.equal(padded[pad:], pos) and padded[:pad].tolist() == [0] * pad


def test_positions_in_the_model_prefill_decode_and_left_padding() -> None:
    model, processor = zoo.load_tiny("llava")
    inputs = inputs_for(processor, "llava", n=2)
    with cca(model, mask=False):
        seen, hook = record_positions(model)
        generate(model, inputs, max_new_tokens=3)
        hook.remove()
        for b in range(2):
            alone = row_of(processor, "llava", b)
            seen_alone, hook = record_positions(model)
            generate(model, alone, max_new_tokens=3)
            hook.remove()
            ids = alone["input_ids"][0]
            t = ids.numel()
            s = int((ids == model.config.image_token_id).nonzero()[0])
            expected = torch.cat([torch.arange(s), s + rings(4, 4).flatten(), torch.arange(s + 16, t) - 14])
            assert seen_alone[0][0].tolist() == expected.tolist()
            assert [int(p) for p in torch.cat(seen_alone[1:], 1)[0]] == [t - 14, t - 13]
            real = inputs["attention_mask"][b].bool()
            assert seen[0][b][real].tolist() == expected.tolist()  # left-padded row: same positions
            assert torch.equal(torch.cat(seen[1:], 1)[b], torch.cat(seen_alone[1:], 1)[0])


def test_llava_several_images_one_block_each() -> None:
    """Two adjacent images (split by their token counts): two ringed blocks, Delta 14 then 28, causal between."""
    model, processor = zoo.load_tiny("llava")
    prompt = "USER: <image><image>\nTwo pictures. ASSISTANT:"
    inputs = zoo.make_inputs(processor, "llava", [prompt], [[zoo.sample_image(1), zoo.sample_image(2)]])
    ids = inputs["input_ids"][0]
    s = int((ids == model.config.image_token_id).nonzero()[0])
    t = ids.numel()
    with cca(model) as handle:
        seen, hook = record_positions(model)
        generate(model, inputs, max_new_tokens=2)
        hook.remove()
        sample = handle.state["cca"]["samples"][0]
    assert [(b["start"], b["grid"], b["R"]) for b in sample["blocks"]] == [
        (s, (4, 4), 2),
        (s + 16, (4, 4), 2),
    ]
    assert sample["deltas"] == [14, 28]
    ring = rings(4, 4).flatten()
    expected = torch.cat([torch.arange(s), s + ring, s + 2 + ring, torch.arange(s + 32, t) - 28])
    assert seen[0][0].tolist() == expected.tolist() and int(seen[1][0, 0]) == t - 28
    allowed = concentric_mask(t, [grid_block(s, 4, 4), grid_block(s + 16, 4, 4)])
    assert allowed[s + 16 : s + 32, s : s + 16].all() and not allowed[s : s + 16, s + 16 : s + 32].any()


# ---- checks 3, 4: mask --------------------------------------------------------------------------------


def _visual_counts(allowed: torch.Tensor) -> tuple[int, int, int]:
    v = allowed.shape[0]
    causal = torch.ones(v, v, dtype=torch.bool).tril()
    return int(allowed.sum()), int((allowed & ~causal).sum()), int((causal & ~allowed).sum())


def test_mask_counts_24x24() -> None:
    allowed = concentric_mask(588, [grid_block(5, 24, 24)])
    block = allowed[5:581, 5:581]
    assert _visual_counts(block) == (184_288, 91_856, 73_744)
    ring = rings(24, 24).flatten()
    per_row = block.sum(1)
    expected = [92, 176, 252, 320, 380, 432, 476, 512, 540, 560, 572, 576]
    assert [sorted(set(per_row[ring == r].tolist())) for r in range(12)] == [[e] for e in expected]


def test_mask_counts_4x4() -> None:
    allowed = concentric_mask(21, [grid_block(3, 4, 4)])
    assert _visual_counts(allowed[3:19, 3:19]) == (208, 96, 24)


def test_mask_text_rows_causal_visual_rows_see_prefix_post_image_sees_visual() -> None:
    t, s, v, pad = 40, 7, 16, 3
    real = torch.arange(t) >= pad
    allowed = concentric_mask(t, [grid_block(s, 4, 4)], real=real)
    causal = torch.ones(t, t, dtype=torch.bool).tril() & real[None, :]
    text = torch.ones(t, dtype=torch.bool)
    text[s : s + v] = False
    assert torch.equal(allowed[text], causal[text])  # text rows == causal mask (padding hidden)
    assert allowed[s : s + v, pad:s].all() and not allowed[s : s + v, :pad].any()
    assert not allowed[s : s + v, s + v :].any()
    assert allowed[s + v :, s : s + v].all()
    assert allowed.any(1)[pad:].all()  # no real row is empty
    wider = concentric_mask(t, [grid_block(s, 4, 4)], real=real, key_len=t + 5)
    assert torch.equal(wider[:, :t], allowed) and not wider[:, t:].any()


def test_mask_reaches_attention_only_at_prefill() -> None:
    model, processor = zoo.load_tiny("llava")
    inputs = inputs_for(processor, "llava", n=2)
    with cca(model) as handle:
        hide, allow = [e for e in handle.edits if isinstance(e, steer.edits.AttentionMask)]
        assert (hide.mode, allow.mode) == ("and", "or")  # composed with the model's own mask
        assert hide.phase == allow.phase == "prefill"
        assert hide.resolve_layers(4) == allow.resolve_layers(4) == [0, 1, 2, 3]
        seen: list = []
        for edit in (hide, allow):
            fn = edit.mask
            edit.mask = lambda e, fn=fn, mode=edit.mode: seen.append((e.phase, mode, fn(e))) or seen[-1][2]
        generate(model, inputs, max_new_tokens=2)
    assert [(p, m) for p, m, _ in seen] == [("prefill", "and"), ("prefill", "or")] * 4  # decode keeps the model's
    keep, let_in = seen[0][2], seen[1][2]
    ids = inputs["input_ids"]
    length = ids.shape[1]
    for b in range(2):
        s = int((ids[b] == model.config.image_token_id).nonzero()[0])
        real = inputs["attention_mask"][b].bool()
        model_mask = torch.ones(length, length).tril().bool() & real[None, :]  # sdpa's causal + padding mask
        expected = concentric_mask(length, [grid_block(s, 4, 4)], real=real)
        assert torch.equal((model_mask & keep[b, 0]) | let_in[b, 0], expected)


# ---- check 5: identity -----------------------------------------------------------------------------------


@pytest.mark.parametrize("family", zoo.FAMILIES)
def test_switches_off_and_text_only_are_bit_identical(family: str) -> None:
    model, processor = zoo.load_tiny(family)
    inputs = inputs_for(processor, family)
    ref = logits(model, inputs)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing installed, no warning
        with cca(model, positions=False, mask=False) as handle:
            assert handle.edits == []
            assert torch.equal(logits(model, inputs), ref)
    text = zoo.make_inputs(processor, family, [zoo.chat_prompt(family, "Hello there.", n_images=0), "Hi"])
    ref_text, ref_tokens = logits(model, text), generate(model, text)
    with steer.apply(model, raw_edits(model, mrope="ring_all", next_blocks="all")):
        assert torch.equal(logits(model, text), ref_text)
        assert torch.equal(generate(model, text), ref_tokens)
    with pytest.warns(UserWarning, match="experimental"):
        handle = cca(model)
    with handle:  # through the front door too: text-only rows keep the stock positions and mask
        assert torch.equal(logits(model, text), ref_text)


def test_text_only_row_in_a_mixed_batch_keeps_stock_positions_and_mask() -> None:
    model, processor = zoo.load_tiny("llava")
    rows = [
        zoo.chat_prompt("llava", "Describe the image."),
        zoo.chat_prompt("llava", "Just text here.", n_images=0),
    ]
    mixed = zoo.make_inputs(processor, "llava", rows, [[zoo.sample_image(1)], []])
    text = zoo.make_inputs(processor, "llava", [rows[1]])
    ref = logits(model, text)[0]
    with steer.apply(model, raw_edits(model)):
        out = logits(model, mixed)[1][mixed["attention_mask"][1].bool()]
    assert (out - ref).abs().max() < 1e-5


# ---- check 6: batches and beams --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "family,params,beams",
    [
        ("llava", {}, (1, 3)),
        ("llava_next", {}, (3,)),
        ("llava_next", {"next_blocks": "all"}, (1,)),
        ("qwen2_vl", {}, (1, 3)),
        ("qwen2_5_vl", {"mrope": "ring_all"}, (3,)),
    ],
)
def test_batch_and_beams_equal_per_sample(family: str, params: dict, beams: tuple) -> None:
    model, processor = zoo.load_tiny(family)
    size = (112, 112) if family != "llava" else (56, 56)
    inputs = inputs_for(processor, family, n=2, size=size)
    twins = inputs_for(processor, family, n=2, identical=True, size=size)
    alone = [row_of(processor, family, b, size) for b in range(2)]
    real = inputs["attention_mask"].bool()
    with cca(model, **params) as handle:
        batch_logits = logits(model, inputs)
        assert len(handle.state["cca"]["samples"]) == 2
        for b in range(2):
            assert (batch_logits[b][real[b]] - logits(model, alone[b])[0]).abs().max() < 1e-5
        for n_beams in beams:
            batch = generate(model, inputs, num_beams=n_beams, max_new_tokens=3)
            same = generate(model, twins, num_beams=n_beams, max_new_tokens=3)
            assert torch.equal(same[0], same[1])
            for b in range(2):
                single = generate(model, alone[b], num_beams=n_beams, max_new_tokens=3)[0]
                assert torch.equal(batch[b], single), (n_beams, b)
    assert (batch_logits - logits(model, inputs))[real].abs().max() > 1e-3


# ---- check 7: KV cache ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "family,params",
    [
        ("llava", {}),
        ("llava_next", {"next_blocks": "all"}),
        ("qwen2_vl", {"mrope": "ring_all"}),
        ("qwen2_5_vl", {}),
    ],
)
def test_kv_cache_equals_cache_free_recomputation(family: str, params: dict) -> None:
    model, processor = zoo.load_tiny(family)
    inputs = inputs_for(processor, family, n=2, size=(112, 112) if family != "llava" else (56, 56))
    n = 4
    with cca(model, **params):
        tokens, scores = greedy(model, inputs, n)
        tokens_nc, scores_nc = greedy(model, inputs, n, use_cache=False)
        assert torch.equal(tokens, tokens_nc)
        assert close(scores, scores_nc, 1e-4)
        # one full forward over prompt + generated tokens: the generated tokens are causal text rows
        full = dict(inputs)
        full["input_ids"] = torch.cat([inputs["input_ids"], tokens], 1)
        mask = torch.cat([inputs["attention_mask"], torch.ones_like(tokens)], 1)
        full["attention_mask"] = mask
        if family in ("llava", "llava_next"):
            full["position_ids"] = (mask.cumsum(1) - 1).masked_fill(mask == 0, 0)
        else:
            full["mm_token_type_ids"] = torch.cat([inputs["mm_token_type_ids"], torch.zeros_like(tokens)], 1)
        t = inputs["input_ids"].shape[1]
        recomputed = logits(model, full)[:, t - 1 : t - 1 + n]
    assert close(recomputed, scores, 1e-4)
    assert torch.equal(torch.where(torch.isfinite(scores), recomputed, -torch.inf).argmax(-1), tokens)


# ---- check 8: Qwen M-RoPE ------------------------------------------------------------------------------


def rope_index(model: torch.nn.Module, inputs: object) -> tuple[torch.Tensor, torch.Tensor]:
    return model.model.get_rope_index(
        inputs["input_ids"],
        mm_token_type_ids=inputs["mm_token_type_ids"],
        image_grid_thw=inputs["image_grid_thw"],
        attention_mask=inputs["attention_mask"],
    )


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl"])
def test_qwen_variants(family: str) -> None:
    model, processor = zoo.load_tiny(family)
    rows = [zoo.chat_prompt(family, "Compare the two images.", n_images=2), zoo.chat_prompt(family, "One.")]
    images = [
        [zoo.sample_image(1, (112, 112)), zoo.sample_image(2, (84, 112))],
        [zoo.sample_image(3, (112, 112))],
    ]
    inputs = zoo.make_inputs(processor, family, rows, images)
    assert inputs["image_grid_thw"].tolist() == [[1, 8, 8], [1, 8, 6], [1, 8, 8]]
    stock, stock_deltas = rope_index(model, inputs)
    ids = inputs["input_ids"]
    image = ids == model.config.image_token_id
    grids = {0: [(4, 4), (4, 3)], 1: [(4, 4)]}

    def spans(b: int) -> list:
        idx = image[b].nonzero().flatten().tolist()
        starts = [i for i in idx if i - 1 not in idx]
        return [(s, s + h * w, h, w) for s, (h, w) in zip(starts, grids[b])]

    with cca(model) as handle:  # ring_t
        pos, deltas = rope_index(model, inputs)
        state = handle.state["cca"]
        assert state["variant"] == "ring_t"
        assert [[(blk["grid"], blk["R"]) for blk in s["blocks"]] for s in state["samples"]] == [
            [((4, 4), 2), ((4, 3), 2)],
            [((4, 4), 2)],
        ]
    assert torch.equal(deltas, stock_deltas)
    assert torch.equal(pos[1:], stock[1:])
    for b in range(2):
        for s, e, h, w in spans(b):
            assert torch.equal(pos[0, b, s:e], stock[0, b, s] + rings(h, w).flatten())
        text = ~image[b]
        assert torch.equal(pos[0, b][text], stock[0, b][text])

    with cca(model, mrope="ring_all"):
        pos, deltas = rope_index(model, inputs)
    real = inputs["attention_mask"].bool()
    for b in range(2):
        shift = 0
        for s, e, h, w in spans(b):
            p0 = stock[0, b, s] - shift
            assert (pos[:, b, s:e] == p0 + rings(h, w).flatten()).all()
            shift += max(h, w) - -(-min(h, w) // 2)
            assert (
                pos[:, b, e] == p0 + -(-min(h, w) // 2)
            ).all()  # the text after it (<|vision_end|>) at p0 + R
        assert (pos[:, b, -1] == stock[:, b, -1] - shift).all()
        assert int(deltas[b]) == int(pos[:, b, real[b]].max()) + 1 - int(real[b].sum())

    with cca(model, mrope="mask_only") as handle:
        assert torch.equal(rope_index(model, inputs)[0], stock)
        assert not any(
            isinstance(e, steer.edits.MethodWrap) and e.name == "get_rope_index" for e in handle.edits
        )
        assert handle.state["cca"]["variant"] == "mask_only"
        logits(model, inputs)
        assert [len(s["blocks"]) for s in handle.state["cca"]["samples"]] == [2, 1]


@pytest.mark.parametrize("mrope", ["ring_t", "ring_all"])
def test_qwen_decode_positions_follow_rope_deltas(mrope: str) -> None:
    """A manual decode step (positions from cache length + rope_deltas) equals generate's second step."""
    model, processor = zoo.load_tiny("qwen2_vl")
    inputs = row_of(processor, "qwen2_vl", 0, size=(112, 112))
    with cca(model, mrope=mrope):
        tokens, scores = greedy(model, inputs, 2)
        with torch.no_grad():
            out = model(**inputs, use_cache=True)
            step = model(input_ids=tokens[:, :1], **with_cache(model, out), use_cache=True)
    assert close(out.logits[:, -1], scores[:, 0], 1e-5)
    assert close(step.logits[:, -1], scores[:, 1], 1e-5)


# ---- check 9: backends -----------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_sdpa_equals_eager_without_forcing_eager(family: str) -> None:
    sdpa, processor = zoo.load_tiny(family, attn_implementation="sdpa")
    eager, _ = zoo.load_tiny(family, attn_implementation="eager")
    inputs = inputs_for(processor, family, n=2, size=(112, 112) if family != "llava" else (56, 56))
    real = inputs["attention_mask"].bool()
    with cca(sdpa), cca(eager):
        assert sdpa.config.text_config._attn_implementation == "steer"
        assert sdpa.config.vision_config._attn_implementation == "sdpa"
        with torch.no_grad():
            out = sdpa(**inputs)
        assert out.attentions is None and not sdpa.config.output_attentions
        diff = (out.logits - logits(eager, inputs))[real].abs().max()
    assert diff < 1e-5
    assert eager.config.text_config._attn_implementation == "eager"


# ---- the handle -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["llava_next", "qwen2_5_vl"])
def test_remove_restores_and_state(family: str) -> None:
    model, processor = zoo.load_tiny(family)
    inputs = inputs_for(processor, family, n=2, size=(112, 112))
    ref, ref_tokens = logits(model, inputs), generate(model, inputs, num_beams=3)
    owner = model.model
    with pytest.warns(UserWarning, match="CCA was trained into its checkpoint"):
        handle = cca(model)
    assert "get_image_features" in owner.__dict__
    assert handle.params["cca"] == {
        "positions": True,
        "mask": True,
        "mrope": "ring_t",
        "next_blocks": "base",
        "trained_checkpoint": False,
    }
    generate(model, inputs, num_beams=3)
    state = handle.state["cca"]
    assert state["switches"] == {"positions": True, "mask": True}
    sample = state["samples"][0]
    assert set(sample) >= {"blocks", "deltas", "position_range", "position_ids"}
    assert sample["blocks"][0]["R"] == 2 if family == "qwen2_5_vl" else sample["blocks"][0]["grid"] == (2, 2)
    handle.remove()
    assert "get_rope_index" not in owner.__dict__ and "get_image_features" not in owner.__dict__
    assert Runtime.of(model) is None
    assert torch.equal(logits(model, inputs), ref)
    assert torch.equal(generate(model, inputs, num_beams=3), ref_tokens)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cca(model, trained_checkpoint=True).remove()


def test_llava_next_blocks_all_rings_the_high_res_grid() -> None:
    model, processor = zoo.load_tiny("llava_next")
    inputs = zoo.make_inputs(
        processor, "llava_next", [zoo.chat_prompt("llava_next", "Look.")], [[zoo.sample_image(4, (84, 56))]]
    )
    for mode, expected in [
        ("base", [((2, 2), 1, 4, "base")]),
        ("all", [((2, 2), 1, 4, "base"), ((2, 4), 1, 10, "highres")]),
    ]:
        with cca(model, next_blocks=mode) as handle:
            generate(model, inputs, max_new_tokens=2)  # generate hands the model encoded features only
            blocks = handle.state["cca"]["samples"][0]["blocks"]
            assert [(b["grid"], b["R"], b["tokens"], b["kind"]) for b in blocks] == expected
            with_sizes = handle.state["cca"]["samples"]
            logits(model, inputs)  # forward with pixel_values and image_sizes: same layout
            assert handle.state["cca"]["samples"][0]["blocks"] == with_sizes[0]["blocks"]


def test_errors_non_square_llava_block_and_bad_params() -> None:
    model, processor = zoo.load_tiny("llava")
    adapter = adapter_for(model)
    method = CCA(resolve_params(CCA, {}), adapter.info, {})
    ids = torch.tensor([[1, 2] + [model.config.image_token_id] * 15 + [3]])
    with pytest.raises(CCALayoutError, match="not a square grid"):
        method.blocks_for(adapter.image_layout(ids, None))
    nine = torch.tensor([[1] + [model.config.image_token_id] * 9])
    assert [b.grid for b in method.blocks_for(adapter.image_layout(nine, None))[0]] == [(3, 3)]
    with pytest.raises(steer.InvalidParameterError, match="mrope"):
        cca(model, mrope="ring_h")
    assert STOCK_WEIGHTS_WARNING.startswith("CCA was trained into its checkpoint")


def test_chunked_prefill_with_image_tokens_is_refused() -> None:
    model, processor = zoo.load_tiny("llava")
    inputs = row_of(processor, "llava", 0)
    ids = inputs["input_ids"]
    s = int((ids[0] == model.config.image_token_id).nonzero()[0])
    with steer.apply(model, "cca", trained_checkpoint=True), torch.no_grad():
        first = model(input_ids=ids[:, :s], use_cache=True)  # text-only first chunk
        with pytest.raises(CCALayoutError, match="chunked prefill"):
            model(
                input_ids=ids[:, s:],
                pixel_values=inputs["pixel_values"],
                use_cache=True,
                **with_cache(model, first),
            )


def test_recipes() -> None:
    for family in ("llava-1.5", "llava-next", "qwen2-vl", "qwen2.5-vl"):
        recipe = steer.recipe(f"{family}/cca")
        assert "cca" in recipe.methods
    model, processor = zoo.load_tiny("qwen2_vl")
    inputs = inputs_for(processor, "qwen2_vl", size=(112, 112))
    plain = logits(model, inputs)
    recipe = steer.recipe("qwen2-vl/cca")
    with steer.apply(model, recipe) as handle:
        assert handle.params["cca"]["mrope"] == "ring_t"
        from_recipe = logits(model, inputs)
        assert handle.state["cca"]["variant"] == "ring_t" and handle.state["cca"]["switches"] == {"positions": True, "mask": True}
    with steer.apply(model, "cca", **recipe.methods["cca"]):
        direct = logits(model, inputs)
    assert torch.equal(from_recipe, direct)  # the recipe is exactly its settings
    assert (from_recipe - plain)[inputs["attention_mask"].bool()].abs().max() > 1e-4  # and it acts


# ---- composition with FasterVLM (specs/cca.md step 1; specs/fastervlm.md step 9) -------------------------


def with_fastervlm(model: torch.nn.Module, cca_params: dict | None = None, **fastervlm: object) -> steer.Steering:
    return steer.apply(model, ["fastervlm", "cca"], fastervlm=fastervlm, cca=dict(cca_params or {}))


def cca_scratch(model: torch.nn.Module) -> dict:
    """CCA's per-call memo of the last prefill (its layout and masks)."""
    return Runtime.of(model).context.call.memo["cca"]


def hand_mask(length: int, start: int, ring: list[int], real: torch.Tensor) -> torch.Tensor:
    """ring(k) <= ring(q) among the block's kept tokens, causal with real keys elsewhere (loops, not CCA's code)."""
    allowed = torch.zeros(length, length, dtype=torch.bool)
    for q in range(length):
        for k in range(length):
            if start <= q < start + len(ring) and start <= k < start + len(ring):
                allowed[q, k] = ring[k - start] <= ring[q - start]
            else:
                allowed[q, k] = k <= q and bool(real[k])
    return allowed


@pytest.mark.parametrize("family", ["llava", "llava_next", "qwen2_vl", "qwen2_5_vl"])
def test_fastervlm_keeping_every_token_equals_cca_alone(family: str) -> None:
    model, processor = zoo.load_tiny(family)
    inputs = inputs_for(processor, family, n=2)
    n = 16 if family == "llava" else 4
    with cca(model):
        ref, ref_tokens = logits(model, inputs), generate(model, inputs, num_beams=2)
    with with_fastervlm(model, num_tokens=n):
        assert torch.equal(logits(model, inputs), ref)
        assert torch.equal(generate(model, inputs, num_beams=2), ref_tokens)


@pytest.mark.parametrize("mode", ["contiguous", "original"])
def test_fastervlm_pruned_llava_block_rings_of_the_kept_coordinates(mode: str) -> None:
    """4 x 4 grid keeping 6 tokens: positions p0 + ring(i, j) of the original (i, j), Delta = 6 - R = 4, the
    mask ring(k) <= ring(q) among the kept tokens; decode continues at pos0 - 4. Both FasterVLM position modes
    give the same ids as CCA on the unpruned prompt, taken at the kept columns."""
    model, processor = zoo.load_tiny("llava")
    inputs = inputs_for(processor, "llava", n=2)
    with cca(model, mask=False):
        stock, hook = record_positions(model)
        generate(model, inputs, max_new_tokens=3)
        hook.remove()
    with with_fastervlm(model, num_tokens=6, positions=mode) as h:
        seen, hook = record_positions(model)
        generate(model, inputs, max_new_tokens=3)
        hook.remove()
        ids = Runtime.of(model).context.prompt_ids
        real = Runtime.of(model).context.padding_mask[:, : ids.shape[1]]  # the prompt columns
        mask = next(v for k, v in cca_scratch(model).items() if isinstance(k, tuple) and k[0] == "mask")
        kept_rows = [row[0]["kept"] for row in h.state["fastervlm"]["samples"]]
        samples = h.state["cca"]["samples"]
    length = ids.shape[1]
    width = inputs["input_ids"].shape[1]
    for b in range(2):
        image = (ids[b] == model.config.image_token_id).nonzero().flatten()
        s = int(image[0])
        assert image.tolist() == list(range(s, s + 6))
        ring = [int(rings(4, 4)[k // 4, k % 4]) for k in kept_rows[b].tolist()]
        pos0 = (real[b].long().cumsum(0) - 1).clamp(min=0)
        expected = torch.cat([pos0[:s], pos0[s] + torch.tensor(ring), pos0[s + 6 :] - (6 - 2)])
        assert seen[0][b][real[b]].tolist() == expected[real[b]].tolist()
        assert int(seen[1][b, 0]) == int(pos0[-1]) + 1 - 4  # first decode step: pos0 - Delta
        assert samples[b]["blocks"] == [
            {"start": s, "grid": (4, 4), "R": 2, "tokens": 6, "kind": "image", "kept": kept_rows[b].tolist()}
        ]
        assert samples[b]["deltas"] == [4 if mode == "contiguous" else 14]  # original: Delta over the stock ids
        assert torch.equal(mask[b, 0], hand_mask(length, s, ring, real[b]))
        # = CCA on the unpruned prompt at the kept columns (text, kept image tokens, decode)
        full = inputs["attention_mask"][b].bool()
        s_full = int((inputs["input_ids"][b] == model.config.image_token_id).nonzero()[0])
        cols = torch.cat([torch.arange(s_full), s_full + kept_rows[b], torch.arange(s_full + 16, width)])
        cols = cols[full[cols]]
        assert seen[0][b][real[b]].tolist() == stock[0][b][cols].tolist()
        assert torch.equal(torch.cat(seen[1:], 1)[b], torch.cat(stock[1:], 1)[b])


def test_fastervlm_pruned_llava_next_base_and_all() -> None:
    """LLaVA-NeXT: the base block keeps its kept tokens' rings (Delta = T - R), the high-res tokens keep raster
    order; next_blocks='all' rings the kept high-res tokens (newlines: ring of their row's last cell). With
    positions='original' the ids equal CCA's on the unpruned prompt at the kept columns."""
    model, processor = zoo.load_tiny("llava_next")
    inputs = zoo.make_inputs(
        processor, "llava_next", [zoo.chat_prompt("llava_next", "Look.")], [[zoo.sample_image(4, (84, 56))]]
    )
    table = newline_grid_block(0, 2, 4).ring
    for blocks in ("base", "all"):
        with cca(model, mask=False, next_blocks=blocks):
            stock, hook = record_positions(model)
            generate(model, inputs, max_new_tokens=2)
            hook.remove()
        for mode in ("contiguous", "original"):
            with with_fastervlm(model, {"next_blocks": blocks}, reduction=0.5, positions=mode) as h:
                seen, hook = record_positions(model)
                generate(model, inputs, max_new_tokens=2)
                hook.remove()
                image = h.state["fastervlm"]["samples"][0][0]
                got = h.state["cca"]["samples"][0]
                ids = Runtime.of(model).context.prompt_ids[0]
            s = int((ids == model.config.image_token_id).nonzero()[0])
            base = image["crops"][0]["kept"]
            t = base.numel()
            assert got["blocks"][0] == {
                "start": s, "grid": (2, 2), "R": 1, "tokens": t, "kind": "base", "kept": base.tolist()
            }
            pos = seen[0][0]
            assert pos[s : s + t].tolist() == [s] * t  # 2 x 2: every cell is ring 0
            high = image["offsets"][t:] - 4
            if blocks == "all":
                assert got["blocks"][1]["tokens"] == image["sent"] - t and got["blocks"][1]["kept"] == high.tolist()
                assert pos[s + t : s + image["sent"]].tolist() == (pos[s] + 1 + table[high]).tolist()  # after the base block (R = 1)
            if mode == "contiguous":
                assert pos[s + image["sent"] :].tolist() == (
                    torch.arange(s + image["sent"], ids.numel()) - sum(b["tokens"] - b["R"] for b in got["blocks"])
                ).tolist()
            else:
                s_full = int((inputs["input_ids"][0] == model.config.image_token_id).nonzero()[0])
                cols = torch.cat(
                    [torch.arange(s_full), s_full + image["offsets"], torch.arange(s_full + image["stock"], inputs["input_ids"].shape[1])]
                )
                assert pos.tolist() == stock[0][0][cols].tolist()
                assert torch.equal(torch.cat(seen[1:], 1), torch.cat(stock[1:], 1))


def test_fastervlm_spatial_layout_refuses_next_blocks_all() -> None:
    model, processor = zoo.load_tiny("llava_next")
    inputs = zoo.make_inputs(
        processor, "llava_next", [zoo.chat_prompt("llava_next", "Look.")], [[zoo.sample_image(4, (84, 56))]]
    )
    with with_fastervlm(model, {"next_blocks": "all"}, reduction=0.5, next_layout="spatial"):
        with pytest.raises(CCALayoutError, match="spatial"):
            generate(model, inputs, max_new_tokens=2)
    with with_fastervlm(model, reduction=0.5, next_layout="spatial") as h:
        generate(model, inputs, max_new_tokens=2)
        assert h.state["cca"]["samples"][0]["blocks"][0]["kept"] == h.state["fastervlm"]["samples"][0][0]["crops"][0]["kept"].tolist()


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl"])
@pytest.mark.parametrize("params", [{}, {"mrope": "ring_all"}, {"mask": False}])
def test_fastervlm_pruned_qwen_block(family: str, params: dict) -> None:
    """Qwen (merged 4 x 4 grid keeping 6): M-RoPE ids = CCA's on the unpruned prompt at the kept columns
    (t = p0 + ring(i, j) of the original cell); the mask rings the kept tokens; the state shows the pruned block
    (per row as the model's get_rope_index saw it, before beam expansion, as without pruning)."""
    model, processor = zoo.load_tiny(family)
    inputs = inputs_for(processor, family, n=2, size=(112, 112))
    with cca(model, **params):
        full_ids, _ = rope_index(model, inputs)
    seen: list = []
    hook = model.model.language_model.register_forward_pre_hook(
        lambda m, a, kw: seen.append(kw["position_ids"][-3:].detach().clone()), with_kwargs=True
    )
    try:
        with with_fastervlm(model, params, num_tokens=6) as h:
            generate(model, inputs, max_new_tokens=2, num_beams=2)
            hook.remove()
            runtime = Runtime.of(model)
            ids = runtime.context.prompt_ids
            real = runtime.context.padding_mask[:, : ids.shape[1]]
            mask = next((v for k, v in cca_scratch(model).items() if isinstance(k, tuple) and k[0] == "mask"), None)
            fv = h.state["fastervlm"]["samples"]
            samples = h.state["cca"]["samples"]
    finally:
        hook.remove()
    assert ids.shape[0] == 4  # beams expanded
    width = inputs["input_ids"].shape[1]
    for b in range(2):
        kept = fv[b][0]["kept"]
        ring = [int(rings(4, 4)[k // 4, k % 4]) for k in kept.tolist()]
        s = int((ids[2 * b] == model.config.image_token_id).nonzero()[0])
        full = inputs["attention_mask"][b].bool()
        s_full = int((inputs["input_ids"][b] == model.config.image_token_id).nonzero()[0])
        cols = torch.cat([torch.arange(s_full), s_full + kept, torch.arange(s_full + 16, width)])
        cols = cols[full[cols]]
        expected = full_ids[:, b, cols]
        assert samples[b]["blocks"] == [
            {"start": s, "grid": (4, 4), "R": 2, "tokens": 6, "kind": "image", "kept": kept.tolist()}
        ]
        assert torch.equal(samples[b]["position_ids"], expected)
        for r in (2 * b, 2 * b + 1):
            assert torch.equal(seen[0][:, r][:, real[r]], expected)
            if mask is not None:
                assert torch.equal(mask[r, 0], hand_mask(ids.shape[1], s, ring, real[r]))
        if params.get("mrope") != "ring_all":  # ring_t: t = p0 + ring(i, j) of the original cell
            image = torch.isin(cols, s_full + kept)
            assert expected[0, image].tolist() == (full_ids[0, b, s_full] + torch.tensor(ring)).tolist()
    assert (mask is None) == (params.get("mask") is False)


@pytest.mark.parametrize("family", ["llava", "llava_next", "qwen2_vl", "qwen2_5_vl"])
def test_fastervlm_then_cca_generates(family: str) -> None:
    model, processor = zoo.load_tiny(family)
    inputs = inputs_for(processor, family, n=3)
    with steer.apply(model, ["fastervlm", "cca"], fastervlm={"reduction": 0.5}) as h:
        out = generate(model, inputs, max_new_tokens=3, num_beams=2)
        fv, samples = h.state["fastervlm"]["samples"], h.state["cca"]["samples"]
    assert out.shape == (3, 3)
    for row, sample in zip(fv, samples[::2] if len(samples) == 6 else samples):
        block = sample["blocks"][0]
        kept = row[0]["crops"][0]["kept"] if family == "llava_next" else row[0]["kept"]
        assert block["kept"] == kept.tolist() and block["tokens"] == kept.numel()
