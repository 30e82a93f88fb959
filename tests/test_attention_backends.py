"""steer's attention function with backends other than SDPA/eager: the mask formats it reads and the
delegation of unedited layers to the model's original backend."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from helpers import batch_inputs, logits, row_inputs
from torch.nn.attention.flex_attention import create_block_mask
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

import steer
from steer import edits, zoo
from steer.backends.transformers import attention as attention_module
from steer.backends.transformers.attention import bool_mask
from steer.kernels import dispatch

MIN = torch.finfo(torch.float32).min


def expected_mask(pad: torch.Tensor, q_len: int) -> torch.Tensor:
    """[B, 1, Lq, Lk]: causal aligned to the last key (row q is position k_len - q_len + q) and not padding."""
    k_len = pad.shape[1]
    rows = torch.arange(k_len - q_len, k_len)[:, None]
    keys = torch.arange(k_len)[None, :]
    return ((keys <= rows)[None, None] & pad.bool()[:, None, None, :]).clone()


@pytest.mark.parametrize("q_len", [6, 1], ids=["prefill", "decode"])
def test_bool_mask_reads_every_backend_format(q_len: int) -> None:
    """The sdpa (bool), eager (additive float), flash (2-D padding) and flex (BlockMask) masks of one
    left-padded batch all read as the same boolean mask."""
    pad = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]])
    batch, k_len = pad.shape
    want = expected_mask(pad, q_len)
    eager = torch.zeros(want.shape).masked_fill(~want, MIN)

    def allowed(b: Any, h: Any, q: Any, k: Any) -> Any:
        return want[b, 0, q, k]

    flex = create_block_mask(allowed, batch, None, q_len, k_len, device="cpu")
    for name, mask in [
        ("sdpa", want),
        ("eager", eager),
        ("flash_attention_2", pad),
        ("flex_attention", flex),
    ]:
        got = bool_mask(mask, name, batch, q_len, k_len, torch.device("cpu"))
        assert torch.equal(got.expand_as(want), want), name


def test_bool_mask_without_a_mask_is_sdpa_causal_or_everything() -> None:
    """``None`` (SDPA's ``is_causal``): upper-left causal for a prompt, every key for one decode row."""
    prefill = bool_mask(None, "sdpa", 2, 4, 4, torch.device("cpu"))
    assert torch.equal(prefill[0, 0], torch.ones(4, 4).tril().bool()) and prefill.shape == (2, 1, 4, 4)
    assert bool_mask(None, "sdpa", 2, 1, 7, torch.device("cpu")).all()


CALLS: list[int] = []


def spy_attention(module: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
    """A third-party backend: SDPA, recording which decoder layers call it (the vision tower uses it too)."""
    if hasattr(module, "layer_idx"):
        CALLS.append(module.layer_idx)
    return sdpa_attention_forward(module, *args, **kwargs)


def test_unedited_layers_call_the_models_own_backend() -> None:
    """A model on a backend steer does not know keeps it: layers without an active edit call that backend
    (with the mask it built), edited layers give what they give on SDPA, and ``remove()`` switches back."""
    AttentionInterface.register("spy_sdpa", spy_attention)
    AttentionMaskInterface.register("spy_sdpa", sdpa_mask)
    model, processor = zoo.load_tiny("llava", attn_implementation="spy_sdpa")
    reference, _ = zoo.load_tiny("llava", attn_implementation="sdpa")
    layers = model.config.text_config.num_hidden_layers
    inputs = batch_inputs(processor, "llava")
    CALLS.clear()
    plain = logits(model, inputs)
    assert sorted(set(CALLS)) == list(range(layers))
    assert torch.allclose(plain, logits(reference, inputs), atol=1e-6)

    scale = edits.HeadScale(layers=[1], heads=[0], scale=3.0)
    with steer.apply(model, [scale]):
        assert model.config.text_config._attn_implementation == "steer"
        CALLS.clear()
        steered = logits(model, inputs)
        # every layer ran the spy: unedited ones directly, the edited one for its base output
        assert sorted(set(CALLS)) == list(range(layers))
    with steer.apply(reference, [scale]):
        expected = logits(reference, inputs)
    assert (steered - plain).abs().max() > 1e-3
    assert torch.allclose(steered, expected, atol=1e-6)
    assert model.config.text_config._attn_implementation == "spy_sdpa"
    assert torch.equal(logits(model, inputs), plain)


def test_flex_attention_model_prefill_matches_sdpa() -> None:
    """A model on transformers' compiled flex_attention backend (Inductor builds it for the CPU, ~25 s cold):
    its mask arrives as a BlockMask, and the steered logits equal the steered SDPA model's; ``remove()``
    restores the flex model's own output exactly. (Generation is not checked: torch 2.13's Inductor fails to
    build flex attention's CPU decode kernel even without steer.)"""
    model, processor = zoo.load_tiny("llava", attn_implementation="flex_attention")
    reference, _ = zoo.load_tiny("llava", attn_implementation="sdpa")
    inputs = batch_inputs(processor, "llava")
    real = inputs["attention_mask"].bool()
    plain = logits(model, inputs)
    assert torch.allclose(plain[real], logits(reference, inputs)[real], atol=1e-5)
    with steer.apply(model, "image_attention", scale=2.0):
        assert model.config.text_config._attn_implementation == "steer"
        steered = logits(model, inputs)
    with steer.apply(reference, "image_attention", scale=2.0):
        expected = logits(reference, inputs)
    assert (steered - plain)[real].abs().max() > 1e-3
    assert torch.allclose(steered[real], expected[real], atol=1e-5)
    assert model.config.text_config._attn_implementation == "flex_attention"
    assert torch.equal(logits(model, inputs), plain)


def test_unpadded_prefill_keeps_the_causal_mask_implicit(monkeypatch: pytest.MonkeyPatch) -> None:
    """With no padding transformers passes no mask (SDPA's is_causal). A reweighting edit then builds no
    [Lq, Lk] triangle (O(L²) memory); it hands ``causal=True`` down instead, and the sample's steered logits
    equal its row in a left-padded batch, where the mask is real."""
    model, processor = zoo.load_tiny("llava")
    alone_inputs, batch = row_inputs(processor, "llava", 0), batch_inputs(processor, "llava")
    built: list[int] = []
    flags: list[tuple[int, bool]] = []
    real_bool_mask, real_dispatch = attention_module.bool_mask, dispatch.reweighted_attention

    def spy_bool_mask(attention_mask: Any, *args: Any) -> torch.Tensor:
        out = real_bool_mask(attention_mask, *args)
        built.append(out.shape[2])
        return out

    def spy_dispatch(query: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        flags.append((query.shape[2], kwargs.get("causal", False)))
        return real_dispatch(query, *args, **kwargs)

    monkeypatch.setattr(attention_module, "bool_mask", spy_bool_mask)
    monkeypatch.setattr(dispatch, "reweighted_attention", spy_dispatch)
    plain = logits(model, alone_inputs)
    with steer.apply(model, "image_attention", scale=3.0):
        alone = logits(model, alone_inputs)
        assert built == [] and flags and all(causal for _, causal in flags)
        flags.clear()
        together = logits(model, batch)
        assert built and not any(causal for _, causal in flags)
    real = batch["attention_mask"][0].bool()
    assert torch.allclose(alone[0], together[0][real], atol=1e-5)
    assert (alone - plain).abs().max() > 1e-3
