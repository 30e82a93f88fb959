"""Compiled and wrapped models (issue 17 A3, A4): every method acts whether steer is applied before or after
``torch.compile`` and ``remove()`` restores the model; known wrappers (``torch.compile(model)``, DataParallel,
PEFT's PeftModel) are unwrapped and the handle says what it steered. Dynamo runs with the "eager" backend here:
it traces (and keeps module hooks unguarded, the trap) without Inductor's compile time; the every-method matrix is
marked ``slow`` (``pytest -m slow``) except the two methods most at risk."""

from __future__ import annotations

import warnings
from typing import Any

import pytest
import torch
from helpers import batch_inputs, logits

import steer
from steer import zoo
from steer.backends.transformers.runtime import Runtime

METHODS: dict[str, dict[str, Any]] = {
    "scale_heads": {"alpha": 3.0},
    "image_attention": {"scale": 4.0},
    "var": {"sink_dims": list(range(16)), "tau": 2.5, "p": 0.1, "rho": 0.0, "min_visual_mass": 0.0},
    "vhr": {"alpha": 3.0},
    "vista": {"lam": 0.5},
    "cca": {"trained_checkpoint": True},
    "fastervlm": {"reduction": 0.5},
}


@pytest.fixture(autouse=True)
def _fresh_dynamo() -> Any:
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def steered_eager(method: str, inputs: Any) -> tuple[torch.Tensor, torch.Tensor]:
    model, _ = zoo.load_tiny("llava")
    ref = logits(model, inputs)
    with steer.apply(model, method, **METHODS[method]):
        return ref, logits(model, inputs)


def close(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and bool((a - b).abs().max() < 1e-5)


def compile_(model: Any) -> None:
    """Compile the language model (where the edits act; Dynamo traces it in seconds, the whole VLM in minutes)."""
    model.model.language_model.compile(backend="eager")


@pytest.mark.slow
@pytest.mark.parametrize("method", list(METHODS))
def test_compile_then_apply_and_apply_then_compile(method: str) -> None:
    _, processor = zoo.load_tiny("llava")
    inputs = batch_inputs(processor, "llava")
    ref, expected = steered_eager(method, inputs)
    assert not close(ref, expected)

    model, _ = zoo.load_tiny("llava")
    compile_(model)
    assert close(logits(model, inputs), ref)
    with pytest.warns(UserWarning, match="reset Dynamo's caches"):
        handle = steer.apply(model, method, **METHODS[method])
    assert close(logits(model, inputs), expected)  # the edits act on compiled code (VISTA did not before)
    with pytest.warns(UserWarning, match="reset Dynamo's caches"):
        handle.remove()
    assert close(logits(model, inputs), ref)

    torch._dynamo.reset()
    model, _ = zoo.load_tiny("llava")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        handle = steer.apply(model, method, **METHODS[method])
    compile_(model)
    assert close(logits(model, inputs), expected)
    with pytest.warns(UserWarning):
        handle.remove()
    assert close(logits(model, inputs), ref)


def test_vista_acts_when_applied_after_compiling() -> None:
    """The reported case (VISTA silently did nothing on a compiled model), in the default run; the matrix above
    covers both orders for every method."""
    _, processor = zoo.load_tiny("llava")
    inputs = batch_inputs(processor, "llava", n=1)
    ref, expected = steered_eager("vista", inputs)
    model, _ = zoo.load_tiny("llava")
    compile_(model)
    with pytest.warns(UserWarning, match="reset Dynamo's caches"):
        handle = steer.apply(model, "vista", **METHODS["vista"])
    assert close(logits(model, inputs), expected)
    with pytest.warns(UserWarning):
        handle.remove()
    assert close(logits(model, inputs), ref)


def test_torch_compile_wrapper_is_unwrapped() -> None:
    model, processor = zoo.load_tiny("llava")
    inputs = batch_inputs(processor, "llava")
    ref, expected = steered_eager("scale_heads", inputs)
    wrapped = torch.compile(model, backend="eager")
    with steer.apply(wrapped, "scale_heads", **METHODS["scale_heads"]) as handle:
        assert handle.model is model
        assert handle.state["steered"] == {"class": "LlavaForConditionalGeneration", "inside": ["torch.compile (OptimizedModule)"]}
        assert close(logits(wrapped, inputs), expected)
    assert close(logits(wrapped, inputs), ref) and Runtime.of(model) is None


def test_data_parallel_is_unwrapped() -> None:
    model, processor = zoo.load_tiny("llava")
    inputs = batch_inputs(processor, "llava")
    ref, expected = steered_eager("scale_heads", inputs)
    wrapped = torch.nn.DataParallel(model)  # no GPU: DataParallel calls the module itself
    with steer.apply(wrapped, "scale_heads", **METHODS["scale_heads"]) as handle:
        assert handle.state["steered"]["inside"] == ["DataParallel"]
        assert close(wrapped(**inputs).logits.detach(), expected)
    assert close(logits(model, inputs), ref)


def test_peft_model_is_unwrapped() -> None:
    peft = pytest.importorskip("peft")
    model, processor = zoo.load_tiny("llava")
    inputs = batch_inputs(processor, "llava")
    ref, expected = steered_eager("image_attention", inputs)
    config = peft.LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=True)  # B = 0: the model unchanged
    wrapped = peft.get_peft_model(model, config)
    with steer.apply(wrapped, "image_attention", **METHODS["image_attention"]) as handle:
        assert handle.state["steered"]["inside"] == ["PeftModel"]
        with torch.no_grad():
            assert close(wrapped(**inputs).logits, expected)
    with torch.no_grad():
        assert close(wrapped(**inputs).logits, ref)


def test_an_unknown_wrapped_class_names_the_inner_model() -> None:
    class Holder(torch.nn.Module):
        def __init__(self, module: torch.nn.Module) -> None:
            super().__init__()
            self.module = module

    model, _ = zoo.load_tiny("llava")
    with pytest.raises(steer.UnsupportedModelError, match="no adapter for Holder"):
        steer.apply(Holder(model), "scale_heads")
