"""The pipeline adapter: what a pipeline is (family, variant, ``attn2`` layer depths, tokenizer) as the facts
methods see (:class:`~steer.edits.pipeline_facts.PipelineInfo`). diffusers is imported only to classify a
pipeline.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from steer.edits.pipeline_facts import PipelineInfo, TokenizerInfo
from steer.errors import SteerInputError, UnsupportedModelError

_LAYER = re.compile(r"^(down_blocks|up_blocks|mid_block)(?:\.(\d+))?\..*\.attn2\.processor$")


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


def tokenizer_info(tokenizer: Any) -> TokenizerInfo:
    """The prompt tokenizer's facts (:class:`TokenizerInfo`): its functions call ``tokenizer`` as
    ``encode_prompt`` does."""
    if tokenizer is None:

        def missing(*args: Any) -> Any:
            raise SteerInputError("this pipeline has no tokenizer: give the concepts as token positions (ints)")

        return TokenizerInfo(77, -1, missing, missing, missing)
    length = int(tokenizer.model_max_length)

    def encode(text: str) -> list[int]:
        return list(tokenizer(text, add_special_tokens=False).input_ids)

    def prompt_ids(prompt: str) -> list[int]:
        return list(tokenizer(prompt, padding="max_length", max_length=length, truncation=True).input_ids)

    def tokens(ids: Any) -> list[str]:
        return list(tokenizer.convert_ids_to_tokens(list(ids)))

    return TokenizerInfo(length, int(tokenizer.eos_token_id), encode, prompt_ids, tokens)


@dataclass
class PipelineAdapter:
    """One steered pipeline: ``source`` (the pipeline whose modules are steered; a handle's ``pipe`` given to
    ``steer.apply`` resolves to its source), ``family``, ``variant``, ``depths`` and the facts ``info``."""

    source: Any
    family: str
    variant: str  # "sd1" (text width 768 or tiny), "sd2" (1024), "sdxl"
    depths: dict[str, int]
    info: PipelineInfo

    @classmethod
    def of(cls, pipe: Any) -> PipelineAdapter:
        """The adapter of ``pipe``; raises UnsupportedModelError naming the supported pipelines."""
        source = getattr(pipe, "_steer_source", None) or pipe
        family = pipeline_family(source)
        if family is None:
            raise unsupported_pipeline(pipe)
        unet = source.unet
        if family == "sdxl":
            variant = "sdxl"
        else:
            variant = "sd2" if int(unet.config.cross_attention_dim) == 1024 else "sd1"
        depths = attn2_depths(unet)
        info = PipelineInfo(
            family=family,
            variant=variant,
            pipeline_class=type(source).__name__,
            tokenizer=tokenizer_info(getattr(source, "tokenizer", None)),
            depths=dict(depths),
        )
        return cls(source=source, family=family, variant=variant, depths=depths, info=info)

    @property
    def unet(self) -> Any:
        return self.source.unet

    def describe(self) -> str:
        return f"{type(self.source).__name__} ({self.variant})"


__all__ = ["PipelineAdapter", "PipelineInfo", "TokenizerInfo", "attn2_depths", "pipeline_family", "tokenizer_info", "unsupported_pipeline"]
