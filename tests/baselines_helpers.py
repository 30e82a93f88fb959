"""Shared by tests/test_vcd.py, test_pai.py and test_opera.py: recomputations without a cache, step recorders."""

from __future__ import annotations

import re
from typing import Any

import pytest
import torch
from transformers import LogitsProcessor

import steer
from steer import zoo
from steer.adapters import adapter_for
from steer.errors import InvalidParameterError


class Prefixes(LogitsProcessor):
    """A logits processor that records the sequences (``input_ids``) each decoding step scored."""

    def __init__(self) -> None:
        self.seen: list[torch.Tensor] = []

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        self.seen.append(input_ids.clone())
        return scores


class Force(LogitsProcessor):
    """Force the tokens of ``target`` [n_rows, steps] (teacher forcing through ``generate``)."""

    def __init__(self, target: torch.Tensor) -> None:
        self.target = target
        self.step = 0

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        forced = torch.full_like(scores, float("-inf"))
        forced[torch.arange(scores.shape[0]), self.target[:, self.step]] = 0.0
        self.step += 1
        return forced


def sampled_rows_equal_alone(model: Any, inputs: Any, rows: list[Any], steps: int = 4, seed: int = 5) -> float:
    """Seeded sampling on the batch; then each row alone, forced to the batch row's tokens: the largest difference
    of the (edited) logits each row sampled from, batch vs alone."""
    torch.manual_seed(seed)
    with torch.no_grad():
        out = model.generate(
            **inputs, do_sample=True, max_new_tokens=steps, min_new_tokens=steps, return_dict_in_generate=True,
            output_logits=True,
        )
    tokens = out.sequences[:, -steps:]
    worst = 0.0
    for i, row in enumerate(rows):
        with torch.no_grad():
            alone = model.generate(
                **row, do_sample=False, max_new_tokens=steps, min_new_tokens=steps, return_dict_in_generate=True,
                output_logits=True, logits_processor=[Force(tokens[i : i + 1])],
            )
        assert torch.equal(alone.sequences[0, -steps:], tokens[i])
        for a, b in zip(out.logits, alone.logits):
            finite = torch.isfinite(a[i]) & torch.isfinite(b[0])
            assert torch.equal(torch.isfinite(a[i]), torch.isfinite(b[0]))
            worst = max(worst, float((a[i][finite] - b[0][finite]).abs().max()))
    return worst


def distorted_inputs(model: Any, inputs: Any, distort: Any) -> dict[str, Any]:
    """``inputs`` with every image's pixels replaced by ``distort(pixels)`` (the adapter's per-image layout)."""
    adapter = adapter_for(model)
    out = dict(inputs)
    images = adapter.image_pixels(out)
    out["pixel_values"] = adapter.with_image_pixels(out, [distort(x) for x in images])
    return out


def expand_rows(inputs: dict[str, Any], rows: torch.Tensor) -> dict[str, Any]:
    """LLaVA inputs of the prompt rows ``rows`` (a beam's row -> its sample's row), one image per row."""
    out = {k: v for k, v in inputs.items()}
    out["input_ids"] = inputs["input_ids"][rows]
    out["attention_mask"] = inputs["attention_mask"][rows]
    out["pixel_values"] = inputs["pixel_values"][rows]
    return out


def no_cache_logits(model: Any, inputs: dict[str, Any], sequences: torch.Tensor) -> torch.Tensor:
    """Last-position logits of ``sequences`` (prompt + generated) recomputed without a cache, unsteered (the caller
    removes steering first). ``inputs`` are the prompt rows of ``sequences``."""
    prompt = inputs["input_ids"].shape[1]
    extra = sequences.shape[1] - prompt
    kw = dict(inputs)
    kw["input_ids"] = sequences
    kw["attention_mask"] = torch.cat(
        [inputs["attention_mask"], torch.ones(sequences.shape[0], extra, dtype=inputs["attention_mask"].dtype)], 1
    )
    if "mm_token_type_ids" in inputs:
        kw["mm_token_type_ids"] = torch.cat(
            [inputs["mm_token_type_ids"], torch.zeros(sequences.shape[0], extra, dtype=torch.long)], 1
        )
    inner = getattr(model, "model", None)
    if hasattr(inner, "rope_deltas"):
        inner.rope_deltas = None
    with torch.no_grad():
        return model(**kw, use_cache=False).logits[:, -1].float()


#: Token names (regular expressions) of the image delimiters and markers of the newer families' prompts:
#: Gemma 3 ``<start_of_image>`` / ``<end_of_image>``, InternVL ``<img>`` / ``</img>``, SmolVLM the fake tokens around
#: each sub-image, its ``<row_i_col_j>`` marker and ``<global-img>``.
IMAGE_MARKERS = {
    "gemma3": r"<start_of_image>|<end_of_image>",
    "internvl": r"</?img>",
    "smolvlm": r"<fake_token_around_image>|<global-img>|<row_\d+_col_\d+>",
}


def text_only_logits(
    model: Any, family: str, sequences: torch.Tensor, mask: torch.Tensor, prompt_len: int | None = None
) -> torch.Tensor:
    """Last-position logits of ``sequences`` with every image token (and the family's delimiters) of the first
    ``prompt_len`` columns removed, each row re-padded on the left and run as a text-only prompt by the unsteered
    model (no cache)."""
    cfg = model.config
    drop = [cfg.image_token_id]
    if family.startswith("qwen"):
        drop += [cfg.vision_start_token_id, cfg.vision_end_token_id]
    elif family in IMAGE_MARKERS:  # the delimiters and markers the family's processor writes around images
        vocab = zoo.load_processor(zoo.tiny_path(family)).tokenizer.get_vocab()
        drop += [i for t, i in vocab.items() if re.fullmatch(IMAGE_MARKERS[family], t)]
    prompt = mask.shape[1] if prompt_len is None else prompt_len  # generated tokens are text, whatever they are
    dropped = torch.isin(sequences, torch.tensor(drop)) & (torch.arange(sequences.shape[1]) < prompt)
    rows = [s[m.bool() & ~d] for s, m, d in zip(sequences, mask, dropped)]
    width = max(len(r) for r in rows)
    ids = torch.stack([torch.cat([torch.zeros(width - len(r), dtype=torch.long), r]) for r in rows])
    real = torch.stack(
        [torch.cat([torch.zeros(width - len(r), dtype=torch.long), torch.ones(len(r), dtype=torch.long)]) for r in rows]
    )
    kw: dict[str, Any] = {"input_ids": ids, "attention_mask": real}
    if family.startswith("qwen"):
        kw["mm_token_type_ids"] = torch.zeros_like(ids)
        model.model.rope_deltas = None
    with torch.no_grad():
        return model(**kw, use_cache=False).logits[:, -1].float()


def model_fingerprint(model: torch.nn.Module) -> tuple[Any, ...]:
    """State that ``remove()`` must restore: parameters, hooks, instance attributes of every module."""
    params = {k: v.clone() for k, v in model.state_dict().items()}
    hooks = sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())
    attrs = tuple(sorted(k for m in model.modules() for k in m.__dict__ if not k.startswith("_modules")))
    return params, hooks, attrs, model.config.text_config._attn_implementation


def same_fingerprint(a: tuple[Any, ...], b: tuple[Any, ...]) -> bool:
    pa, ha, aa, ia = a
    pb, hb, ab, ib = b
    return ha == hb and aa == ab and ia == ib and pa.keys() == pb.keys() and all(torch.equal(pa[k], pb[k]) for k in pa)


#: Families whose model hands its language model a mask per layer type (Gemma 3: bidirectional images, sliding
#: windows) instead of a [B, L] mask: a contrastive branch cannot be stacked with the caller's rows there.
MASK_MAPPING_FAMILIES = ("gemma3",)


def batched_mode(model: Any, inputs: Any, family: str, method: str) -> str:
    """The ``batch`` setting whose branch runs stacked with the caller's rows where the family allows it:
    ``"batched"``; on a mask-mapping family that setting is a typed error (checked here) and ``"auto"`` falls
    back to the sequential branch."""
    if family not in MASK_MAPPING_FAMILIES:
        return "batched"
    with pytest.raises(InvalidParameterError, match="batch='batched' needs"), steer.apply(model, method, batch="batched"):
        with torch.no_grad():
            model.generate(**inputs, max_new_tokens=1, do_sample=False)
    return "auto"
