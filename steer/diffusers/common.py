"""Shared pieces of the diffusers plugin: the input error, pipeline families, layer depths, token positions.

Depth of a cross-attention (``attn2``) layer: the number of downsamplings above it. ``down_blocks[k]`` sits at
depth k, ``up_blocks[k]`` at ``n_up − 1 − k``, ``mid_block`` at ``n_down − 1``. Its query grid for a latent of
(h_lat, w_lat) is (⌈h_lat / 2^d⌉, ⌈w_lat / 2^d⌉), height first (stride-2 convolutions with padding 1 round up).
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from steer.errors import SteerInputError, UnsupportedModelError

#: Pipeline classes steer's diffusers plugin hosts, with the family name methods declare.
SUPPORTED_PIPELINES = {
    "StableDiffusionPipeline": "sd",
    "StableDiffusionXLPipeline": "sdxl",
}
PIPELINE_FAMILIES = ("sd", "sdxl")
_ARTICLES = {"a", "an", "the"}


def pipeline_family(pipe: Any) -> str | None:
    """``"sd"`` for `StableDiffusionPipeline` (SD 1.x/2.x) and its subclasses, ``"sdxl"`` for
    `StableDiffusionXLPipeline`; None for anything else."""
    try:
        from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
    except ImportError:  # pragma: no cover - diffusers is a dependency
        return None
    if isinstance(pipe, StableDiffusionXLPipeline):
        return "sdxl"
    if isinstance(pipe, StableDiffusionPipeline):
        return "sd"
    return None


def unsupported_pipeline(pipe: Any) -> UnsupportedModelError:
    supported = "StableDiffusionPipeline (SD 1.x / 2.x) and StableDiffusionXLPipeline"
    return UnsupportedModelError(
        f"{type(pipe).__name__}: steer supports these diffusers pipelines: {supported} (and subclasses). Load the "
        "checkpoint with one of them (e.g. StableDiffusionPipeline.from_pretrained(...)), or build one on the same "
        "components with StableDiffusionPipeline.from_pipe(pipe)."
    )


_LAYER = re.compile(r"^(down_blocks|up_blocks|mid_block)(?:\.(\d+))?\..*\.attn2\.processor$")


def attn2_depths(unet: Any) -> dict[str, int]:
    """Processor key (``unet.attn_processors`` name) of every cross-attention layer → its depth."""
    n_down = len(unet.down_blocks)
    n_up = len(unet.up_blocks)
    out: dict[str, int] = {}
    for name in unet.attn_processors:
        m = _LAYER.match(name)
        if m is None:
            continue
        kind, index = m.group(1), m.group(2)
        if kind == "down_blocks":
            out[name] = int(index)
        elif kind == "up_blocks":
            out[name] = n_up - 1 - int(index)
        else:
            out[name] = n_down - 1
    return out


def grid_at(h_lat: int, w_lat: int, depth: int) -> tuple[int, int]:
    """(⌈h_lat / 2^depth⌉, ⌈w_lat / 2^depth⌉)."""
    f = 2**depth
    return math.ceil(h_lat / f), math.ceil(w_lat / f)


@dataclass
class PipelineAdapter:
    """What the plugin needs to know about one pipeline: family, variant, UNet, tokenizer and layer depths."""

    pipe: Any
    family: str
    variant: str  # "sd1" (text width 768 or tiny), "sd2" (1024), "sdxl"
    depths: dict[str, int] = field(default_factory=dict)

    @classmethod
    def of(cls, pipe: Any) -> PipelineAdapter:
        family = pipeline_family(pipe)
        if family is None:
            raise unsupported_pipeline(pipe)
        unet = pipe.unet
        if family == "sdxl":
            variant = "sdxl"
        else:
            variant = "sd2" if int(unet.config.cross_attention_dim) == 1024 else "sd1"
        return cls(pipe=pipe, family=family, variant=variant, depths=attn2_depths(unet))

    @property
    def unet(self) -> Any:
        return self.pipe.unet

    @property
    def tokenizer(self) -> Any:
        return self.pipe.tokenizer

    def available_depths(self) -> list[int]:
        return sorted(set(self.depths.values()))

    def layers_at(self, depths: Sequence[int]) -> list[str]:
        wanted = set(depths)
        return [name for name, d in self.depths.items() if d in wanted]

    def describe(self) -> str:
        return f"{type(self.pipe).__name__} ({self.variant})"


# ---------------------------------------------------------------------------------------------------------
# token positions


def prompt_ids(tokenizer: Any, prompt: str) -> list[int]:
    """The prompt's ids exactly as ``encode_prompt`` builds them: padded/truncated to ``model_max_length``."""
    return list(
        tokenizer(
            prompt, padding="max_length", max_length=tokenizer.model_max_length, truncation=True
        ).input_ids
    )


def eot_position(tokenizer: Any, ids: Sequence[int]) -> int:
    """Position of the first end-of-text token after SOT (the last position when the prompt was truncated)."""
    eos = tokenizer.eos_token_id
    for i in range(1, len(ids)):
        if ids[i] == eos:
            return i
    return len(ids) - 1


def listing(tokenizer: Any, ids: Sequence[int]) -> str:
    """``0: <|startoftext|>, 1: a</w>, …`` up to and including EOT."""
    end = eot_position(tokenizer, ids)
    tokens = tokenizer.convert_ids_to_tokens(list(ids[: end + 1]))
    return ", ".join(f"{i}: {t}" for i, t in enumerate(tokens))


def _find_run(ids: Sequence[int], run: Sequence[int], used: set[int], stop: int) -> int | None:
    n = len(run)
    for start in range(1, stop - n + 1):
        if list(ids[start : start + n]) == list(run) and not used.intersection(range(start, start + n)):
            return start
    return None


def locate(
    tokenizer: Any,
    ids: Sequence[int],
    item: str | int,
    used: set[int],
    *,
    what: str,
    single_token: bool,
    prompt: str | None,
) -> list[int]:
    """Positions of one concept in the prompt ids.

    A string is tokenised without special tokens and matched as a contiguous id run (SOT = position 0 is never
    matched), first occurrence not overlapping positions already used. An int is a position itself (A&E's
    ``token_indices``). ``single_token``: a word the tokenizer splits into several tokens is an error that names
    the sub-tokens. Raises :class:`SteerInputError` with the prompt's ``index: token`` listing.
    """
    end = eot_position(tokenizer, ids)
    if isinstance(item, bool) or not isinstance(item, (int, str)):
        raise SteerInputError(f"{what}: {item!r} is neither a word (str) nor a token position (int)")
    if isinstance(item, int):
        if not 1 <= item < end:
            raise SteerInputError(
                f"{what}: token position {item} is outside the prompt's words (1..{end - 1}); prompt tokens: "
                f"{listing(tokenizer, ids)}"
            )
        return [item]
    run = list(tokenizer(item, add_special_tokens=False).input_ids)
    if not run:
        raise SteerInputError(f"{what}: {item!r} tokenises to nothing")
    pieces = tokenizer.convert_ids_to_tokens(run)
    start = _find_run(ids, run, used, end)
    where = f"in the prompt {prompt!r}" if prompt is not None else "in the prompt"
    if start is None:
        split = f" (tokens {pieces})" if len(run) > 1 else ""
        again = " again (each occurrence is used once)" if _find_run(ids, run, set(), end) is not None else ""
        raise SteerInputError(
            f"{what}: {item!r}{split} is not {where}{again}. Prompt tokens: {listing(tokenizer, ids)}. "
            "Give a word of the prompt, or its position (an int)."
        )
    positions = list(range(start, start + len(run)))
    if single_token and len(run) > 1:
        raise SteerInputError(
            f"{what}: {item!r} is split by the tokenizer into {len(run)} sub-tokens {pieces} at positions "
            f"{positions}; this method needs one token per concept. Pass the position of the sub-token to use "
            f"(e.g. indices=[{positions[-1]}]) or multi_token='mean' to average the sub-tokens' maps."
        )
    return positions


def per_prompt(spec: Sequence[Any], n_prompts: int, what: str) -> list[list[Any]]:
    """A flat list (the same concepts for every prompt) or one list per prompt."""
    items = list(spec)
    if items and all(isinstance(x, (list, tuple)) for x in items):
        if len(items) != n_prompts:
            raise SteerInputError(
                f"{what}: {len(items)} lists given (one per prompt) but the call has {n_prompts} prompt(s)"
            )
        return [list(x) for x in items]
    if any(isinstance(x, (list, tuple)) for x in items):
        raise SteerInputError(f"{what}: mix of lists and single items; give a flat list or one list per prompt")
    return [items for _ in range(n_prompts)]


def resolve_concepts(
    tokenizer: Any,
    prompts: Sequence[str] | None,
    n_prompts: int,
    spec: Sequence[Any],
    *,
    what: str,
    single_token: bool,
) -> list[list[list[int]]]:
    """Per prompt, per concept: its token positions. ``prompts`` None (``prompt_embeds`` given): ints only."""
    out: list[list[list[int]]] = []
    for p, items in enumerate(per_prompt(spec, n_prompts, what)):
        if not items:
            raise SteerInputError(f"{what}: no concepts given for prompt {p}")
        if prompts is None:
            if not all(isinstance(x, int) and not isinstance(x, bool) for x in items):
                raise SteerInputError(
                    f"{what}: words can only be found in a text prompt; this call passed prompt_embeds. "
                    "Pass prompt=..., or give token positions (ints)."
                )
            out.append([[int(x)] for x in items])
            continue
        ids = prompt_ids(tokenizer, prompts[p])
        used: set[int] = set()
        concepts = []
        for item in items:
            positions = locate(
                tokenizer, ids, item, used, what=what, single_token=single_token, prompt=prompts[p]
            )
            used.update(positions)
            concepts.append(positions)
        out.append(concepts)
    return out


def content_positions(tokenizer: Any, ids: Sequence[int], positions: Sequence[int]) -> list[int]:
    """``positions`` without the articles a/an/the (Detector Guidance's ``detect_tokens="content"``)."""
    tokens = tokenizer.convert_ids_to_tokens([ids[p] for p in positions])
    kept = [p for p, t in zip(positions, tokens) if t.replace("</w>", "").lower() not in _ARTICLES]
    return kept or [positions[-1]]


def images_of(per_prompt_values: list[Any], n_per_prompt: int) -> list[Any]:
    """Expand per-prompt values to per-image values; image b = prompt b // n (encode_prompt's repeat order)."""
    return [v for v in per_prompt_values for _ in range(n_per_prompt)]


__all__ = [
    "PIPELINE_FAMILIES",
    "SUPPORTED_PIPELINES",
    "PipelineAdapter",
    "SteerInputError",
    "attn2_depths",
    "content_positions",
    "eot_position",
    "grid_at",
    "images_of",
    "listing",
    "locate",
    "pipeline_family",
    "prompt_ids",
    "resolve_concepts",
]
