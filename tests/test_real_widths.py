"""Real widths (issue 15, slow: ``pytest -m slow tests/test_real_widths.py``): each new family built from its
smallest public checkpoint's config (benchmarks/families.py ``build_real``: hidden size, heads, KV heads,
vision width, image size, token counts per image), decoder and vision tower cut to 2 layers (VAR: 3, as it
edits layers 2..L-1), random weights in bf16, on a 640 x 480 image through the family's processor. Every VLM
method at its defaults (VAR with a sink channel given) generates without crashing and changes the output,
and after ``remove()`` the generated tokens and the logits of every step are bit-identical to the unsteered
model's. Where a family refuses a method at real widths (LLaVA-OneVision's stock pruning layout on an
anyres-max interpolated grid; VAR without known sink channels) it refuses with steer's typed error."""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import torch
from conftest import NEW_FAMILIES

import steer
from steer.backends.transformers.runtime import Runtime

pytestmark = pytest.mark.slow

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
NEW_TOKENS = 3
#: the VLM methods (benchmarks/families.py METHODS holds their benchmark settings: the defaults, VAR's channel).
METHODS = ("scale_heads", "image_attention", "var", "vhr", "cca", "fastervlm", "vista")

#: image tokens in the prompt of one 640 x 480 image, as the real checkpoints' processors give them.
IMAGE_TOKENS = {
    "qwen3_vl": 300,  # 40 x 30 patches of 16, merged 2 x 2
    "llava_onevision": 729 + 54 * 40 + 40,  # base crop + the 768 x 768 grid unpadded to 4:3 + a newline per row
    "gemma3": 3 * 256,  # the image + 2 pan-and-scan crops
    "internvl": 13 * 256,  # 12 tiles + the thumbnail
    "smolvlm": 13 * 64,  # 4 x 3 sub-images of the image resized to 2048 + the global image
}


@functools.cache
def bench() -> ModuleType:
    """benchmarks/families.py as a module (it imports its sibling memory.py)."""
    sys.path.insert(0, str(BENCHMARKS))
    try:
        spec = importlib.util.spec_from_file_location("bench_families", BENCHMARKS / "families.py")
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(BENCHMARKS))
    return module


@functools.lru_cache(maxsize=1)  # one real-width build alive at a time
def built(family: str, layers: int) -> tuple[Any, Any, dict[str, Any]]:
    """The real-width model, its real-size prompt and the unsteered generation of ``NEW_TOKENS`` tokens."""
    model, processor = bench().build_real(family, layers, 2)
    inputs = bench().real_inputs(processor, family)
    return model, inputs, bench().generate(model, inputs, NEW_TOKENS)


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # CCA's stock-weights warning
        yield


def assert_unsteered(model: Any, inputs: Any, reference: dict[str, Any]) -> None:
    assert Runtime.of(model) is None
    after = bench().generate(model, inputs, NEW_TOKENS)
    assert torch.equal(after["tokens"], reference["tokens"])
    assert torch.equal(after["logits"], reference["logits"])  # every step's logits, bit for bit


def test_the_benchmark_runs_every_vlm_method() -> None:
    # the attention/vision/residual methods of issue 15; the baselines of issue 16 (vcd, m3id, pai, opera) are
    # checked on every family at tiny widths (tests/test_vcd.py, test_pai.py, test_opera.py), not here yet
    baselines = {"vcd", "m3id", "pai", "opera"}
    vlm = {m["name"] for m in steer.methods() if m["target"] == "vlm"} - baselines
    assert set(bench().METHODS) == set(METHODS) == vlm
    assert tuple(bench().FAMILIES) == NEW_FAMILIES


CASES = [(family, method) for family in NEW_FAMILIES for method in ("unsteered", *METHODS)]


@pytest.mark.parametrize(("family", "method"), sorted(CASES, key=lambda c: (c[0], c[1] == "var")))
def test_method_at_real_widths(family: str, method: str) -> None:
    layers = 3 if method == "var" else 2
    model, inputs, reference = built(family, layers)
    if method == "unsteered":
        assert next(model.parameters()).dtype == torch.bfloat16
        assert model.config.get_text_config().num_hidden_layers == 2
        assert int((inputs["input_ids"] == model.config.image_token_id).sum()) == IMAGE_TOKENS[family]
        assert reference["tokens"].shape[1] == inputs["input_ids"].shape[1] + NEW_TOKENS
        assert torch.isfinite(reference["logits"]).all()
        return
    if method == "var":
        with pytest.raises(steer.InvalidParameterError, match="steer calibrate sinks"):
            steer.apply(model, "var")  # no sink channels are known for the new families
        assert Runtime.of(model) is None
    with quiet(), steer.apply(model, method, **bench().METHODS[method]):
        steered = bench().generate(model, inputs, NEW_TOKENS)
    assert steered["tokens"].shape == reference["tokens"].shape
    assert torch.isfinite(steered["logits"]).all()
    assert not bench().same(steered, reference), f"{method} at its defaults left {family} unchanged"
    assert_unsteered(model, inputs, reference)


def test_llava_onevision_interpolated_grid_refuses_stock_pruning_at_real_widths() -> None:
    """A 1536 x 1152 image takes the 4 x 3 pinpoint, whose 108 x 81 grid anyres-max-9 interpolates to 93 x 70:
    FasterVLM's stock packing is refused with the typed error naming the spatial layout, which runs; both
    leave the model exactly unsteered."""
    built.cache_clear()
    model, processor = bench().build_real("llava_onevision", 2, 2)
    inputs = bench().real_inputs(processor, "llava_onevision", (1536, 1152))
    assert int((inputs["input_ids"] == model.config.image_token_id).sum()) == 729 + 93 * 70 + 70
    reference = bench().generate(model, inputs, 2)
    with steer.apply(model, "fastervlm"):
        with pytest.raises(steer.VisionPruningError, match="next_layout='spatial'"):
            bench().generate(model, inputs, 2)
    assert Runtime.of(model) is None
    with steer.apply(model, "fastervlm", next_layout="spatial") as handle:
        steered = bench().generate(model, inputs, 2)
        assert handle.state["fastervlm"]["score"] == "received"
    assert not bench().same(steered, reference)
    after = bench().generate(model, inputs, 2)
    assert bench().same(after, reference)
