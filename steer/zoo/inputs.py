"""Inputs for the zoo models: sample images, chat prompts, batched processor calls, and the Qwen processor.

`make_inputs` turns prompts (with the family's image placeholders) and per-row image lists into one
left-padded `BatchFeature` that `model(**inputs)` / `model.generate(**inputs)` accept:

* LLaVA-1.5: `input_ids`, `attention_mask`, `pixel_values`
* LLaVA-NeXT: the same plus `image_sizes`
* Qwen2-VL / Qwen2.5-VL / Qwen3-VL: `input_ids`, `attention_mask`, `pixel_values`, `image_grid_thw`,
  `mm_token_type_ids`
* LLaVA-OneVision: `input_ids`, `attention_mask`, `pixel_values`, `image_sizes`, `batch_num_images`
* Gemma 3: `input_ids`, `attention_mask`, `pixel_values` (one row per crop), `token_type_ids`; pan-and-scan
  is on (`PROCESSOR_KWARGS`), so a wide or tall image gets crops after the full image
* InternVL: `input_ids`, `attention_mask`, `pixel_values` (one row per tile, the thumbnail last)
* SmolVLM: `input_ids`, `attention_mask`, `pixel_values` [B, sub-images, 3, H, W], `pixel_attention_mask`

LLaVA, LLaVA-NeXT and Gemma 3 use the real transformers processors; Qwen3-VL, LLaVA-OneVision, InternVL and
SmolVLM the real processor classes without their video processor (`steer.zoo.processors`). `Qwen2VLProcessor` / `Qwen2_5_VLProcessor` cannot
be constructed without torchvision (their video processor lookup fails), so `QwenProcessorLite` does what
their `__call__` does for images and text: run the image processor, expand each `<|image_pad|>` into
`prod(grid_thw) // merge_size**2` copies, tokenize with padding and add `mm_token_type_ids`
(1 on image tokens, 2 on video tokens, 0 elsewhere).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image
from transformers import AutoTokenizer, BatchFeature
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

FAMILIES: tuple[str, ...] = (
    "llava",
    "llava_next",
    "qwen2_vl",
    "qwen2_5_vl",
    "qwen3_vl",
    "llava_onevision",
    "gemma3",
    "internvl",
    "smolvlm",
)

#: The placeholder a prompt carries for one image, per family (before the processor expands it).
IMAGE_PLACEHOLDER: dict[str, str] = {
    "llava": "<image>",
    "llava_next": "<image>",
    "qwen2_vl": "<|image_pad|>",
    "qwen2_5_vl": "<|image_pad|>",
    "qwen3_vl": "<|image_pad|>",
    "llava_onevision": "<image>",
    "gemma3": "<start_of_image>",
    "internvl": "<IMG_CONTEXT>",
    "smolvlm": "<image>",
}

#: Families whose processor takes the images nested per prompt row (it counts them per row).
NESTED_IMAGES = ("llava_onevision", "gemma3", "smolvlm")

#: Processor options `make_inputs` passes per family: Gemma 3's pan-and-scan crops (off in the processor's
#: defaults) are on, with crops of at least 28 px, at most 2 per image.
PROCESSOR_KWARGS: dict[str, dict[str, Any]] = {
    "gemma3": {"do_pan_and_scan": True, "pan_and_scan_min_crop_size": 28, "pan_and_scan_max_num_crops": 2},
}


def check_family(family: str) -> str:
    """Return `family` if it is one of `FAMILIES`, else raise a `ValueError` that lists them."""
    if family not in FAMILIES:
        raise ValueError(f"unknown model family {family!r}; supported: {', '.join(FAMILIES)}")
    return family


def sample_image(seed: int, size: tuple[int, int] = (56, 56)) -> Image.Image:
    """A deterministic RGB test image: a random 4x4 grid of coloured blocks with a little pixel noise.

    Args:
        seed: seeds a private `numpy` generator (the global RNGs are not touched).
        size: `(width, height)` in pixels, as PIL orders it.
    """
    width, height = size
    rng = np.random.default_rng(seed)
    blocks = rng.integers(0, 256, size=(4, 4, 3), dtype=np.uint8)
    image = Image.fromarray(blocks, mode="RGB").resize((width, height), Image.Resampling.NEAREST)
    noise = rng.integers(-16, 17, size=(height, width, 3))
    pixels = np.clip(np.asarray(image, dtype=np.int64) + noise, 0, 255).astype(np.uint8)
    return Image.fromarray(pixels, mode="RGB")


def chat_prompt(family: str, question: str, n_images: int = 1) -> str:
    """The family's usual single-turn chat prompt with `n_images` image placeholders before the question.

    * `llava` (LLaVA-1.5, vicuna style): `"USER: <image>\\n{question} ASSISTANT:"`
    * `llava_next` (LLaVA-v1.6-Mistral style): `"[INST] <image>\\n{question} [/INST]"`
    * `qwen2_vl` / `qwen2_5_vl` / `qwen3_vl` (ChatML, no system turn):
      `"<|im_start|>user\\n<|vision_start|><|image_pad|><|vision_end|>{question}<|im_end|>\\n<|im_start|>assistant\\n"`
      with one vision block per image.
    * `llava_onevision` (ChatML): `"<|im_start|>user <image>\\n{question}<|im_end|>\\n<|im_start|>assistant\\n"`
    * `gemma3`: `"<start_of_turn>user\\n<start_of_image>{question}<end_of_turn>\\n<start_of_turn>model\\n"`
    * `internvl` (ChatML): `"<|im_start|>user\\n<IMG_CONTEXT>\\n{question}<|im_end|>\\n<|im_start|>assistant\\n"`
    * `smolvlm`: `"<|im_start|>User:<image>{question}<end_of_utterance>\\nAssistant:"`

    `n_images=0` gives a text-only prompt.
    """
    check_family(family)
    if n_images < 0:
        raise ValueError(f"n_images must be >= 0, got {n_images}")
    if family == "llava":
        return "USER: " + "<image>\n" * n_images + f"{question} ASSISTANT:"
    if family == "llava_next":
        return "[INST] " + "<image>\n" * n_images + f"{question} [/INST]"
    if family == "llava_onevision":
        return "<|im_start|>user " + "<image>\n" * n_images + f"{question}<|im_end|>\n<|im_start|>assistant\n"
    if family == "gemma3":
        return "<start_of_turn>user\n" + "<start_of_image>" * n_images + f"{question}<end_of_turn>\n<start_of_turn>model\n"
    if family == "internvl":
        return "<|im_start|>user\n" + "<IMG_CONTEXT>\n" * n_images + f"{question}<|im_end|>\n<|im_start|>assistant\n"
    if family == "smolvlm":
        return "<|im_start|>User:" + "<image>" * n_images + f"{question}<end_of_utterance>\nAssistant:"
    vision = "<|vision_start|><|image_pad|><|vision_end|>" * n_images
    return f"<|im_start|>user\n{vision}{question}<|im_end|>\n<|im_start|>assistant\n"


class QwenProcessorLite:
    """A torchvision-free stand-in for `Qwen2VLProcessor` / `Qwen2_5_VLProcessor` (images and text only).

    Holds `tokenizer` (left padding) and `image_processor` (`Qwen2VLImageProcessorPil`). `save_pretrained` /
    `from_pretrained` delegate to the parts, each of which loads with its own real `from_pretrained`, so a
    folder written by this class is a normal Hugging Face folder (`tokenizer.json`, `tokenizer_config.json`,
    `preprocessor_config.json`).
    """

    image_token = "<|image_pad|>"
    video_token = "<|video_pad|>"

    def __init__(self, image_processor: Qwen2VLImageProcessorPil, tokenizer: Any) -> None:
        self.image_processor = image_processor
        self.tokenizer = tokenizer
        self.tokenizer.padding_side = "left"
        self.image_token_id: int = tokenizer.convert_tokens_to_ids(self.image_token)
        self.video_token_id: int = tokenizer.convert_tokens_to_ids(self.video_token)

    def __repr__(self) -> str:
        return f"QwenProcessorLite(tokenizer={type(self.tokenizer).__name__}, image_processor={self.image_processor!r})"

    def save_pretrained(self, save_directory: str | os.PathLike, **kwargs: Any) -> None:
        """Save the tokenizer and the image processor into `save_directory`."""
        self.tokenizer.save_pretrained(save_directory, **kwargs)
        self.image_processor.save_pretrained(save_directory, **kwargs)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, **kwargs: Any) -> QwenProcessorLite:
        """Load the tokenizer (`AutoTokenizer`) and the image processor (`Qwen2VLImageProcessorPil`) from `path`."""
        tokenizer = AutoTokenizer.from_pretrained(path, **kwargs)
        image_processor = Qwen2VLImageProcessorPil.from_pretrained(path, **kwargs)
        return cls(image_processor=image_processor, tokenizer=tokenizer)

    def __call__(
        self,
        text: str | Sequence[str],
        images: Sequence[Image.Image] | None = None,
        padding: bool | str = True,
        return_tensors: str | None = "pt",
        **tokenizer_kwargs: Any,
    ) -> BatchFeature:
        """Tokenize `text` the way the Qwen processor does, with `images` (flat, in placeholder order).

        Each `<|image_pad|>` in the text is replaced by as many copies as the image has merged patches.
        """
        texts = [text] if isinstance(text, str) else list(text)
        images = list(images) if images else []
        n_placeholders = sum(t.count(self.image_token) for t in texts)
        if n_placeholders != len(images):
            raise ValueError(
                f"the prompts hold {n_placeholders} {self.image_token} placeholders but {len(images)} images were passed"
            )
        data: dict[str, Any] = {}
        if images:
            vision = self.image_processor(images=images, return_tensors="pt")
            merge = self.image_processor.merge_size**2
            counts = iter((vision["image_grid_thw"].prod(-1) // merge).tolist())
            texts = [self._expand(t, counts) for t in texts]
            data.update(vision)
        encoded = self.tokenizer(texts, padding=padding, return_tensors=return_tensors, **tokenizer_kwargs)
        data.update(encoded)
        ids = encoded["input_ids"]
        types: torch.Tensor | list[list[int]]
        if isinstance(ids, torch.Tensor):
            types = (ids == self.image_token_id).long() + 2 * (ids == self.video_token_id).long()
        else:
            types = [
                [int(i == self.image_token_id) + 2 * int(i == self.video_token_id) for i in row]
                for row in ids
            ]
        data["mm_token_type_ids"] = types
        return BatchFeature(data)

    def _expand(self, text: str, counts: Any) -> str:
        parts = text.split(self.image_token)
        out = [parts[0]]
        for part in parts[1:]:
            out.append(self.image_token * next(counts))
            out.append(part)
        return "".join(out)

    def batch_decode(self, *args: Any, **kwargs: Any) -> list[str]:
        """Same as `tokenizer.batch_decode`."""
        return self.tokenizer.batch_decode(*args, **kwargs)

    def decode(self, *args: Any, **kwargs: Any) -> str:
        """Same as `tokenizer.decode`."""
        return self.tokenizer.decode(*args, **kwargs)


def make_inputs(
    processor: Any,
    family: str,
    prompts: list[str],
    images: list[list[Image.Image]] | None = None,
) -> BatchFeature:
    """Batch `prompts` (one per row) with their images into left-padded model inputs.

    Args:
        processor: the processor returned by `zoo.build` / `zoo.load` for `family`.
        family: one of `FAMILIES`.
        prompts: one string per row, each with one image placeholder per image of that row
            (see `chat_prompt`); a row without placeholders is text-only.
        images: per row, the list of that row's images (`[]` for a text-only row), or `None` if no row has
            images.

    Returns:
        A `BatchFeature` of tensors (see the module docstring for the keys per family).
    """
    check_family(family)
    prompts = list(prompts)
    rows = [list(r) for r in images] if images is not None else [[] for _ in prompts]
    if len(rows) != len(prompts):
        raise ValueError(f"got {len(prompts)} prompts but images for {len(rows)} rows")
    placeholder = IMAGE_PLACEHOLDER[family]
    for i, (prompt, row) in enumerate(zip(prompts, rows)):
        if prompt.count(placeholder) != len(row):
            raise ValueError(
                f"row {i}: the prompt holds {prompt.count(placeholder)} {placeholder} placeholders "
                f"but {len(row)} images were given"
            )
    rows = [[im.convert("RGB") for im in row] for row in rows]
    flat = [im for row in rows for im in row]
    processor.tokenizer.padding_side = "left"
    extra = PROCESSOR_KWARGS.get(family, {}) if flat else {}
    if flat and family in NESTED_IMAGES:
        return processor(text=prompts, images=rows, padding=True, return_tensors="pt", **extra)
    return processor(text=prompts, images=flat or None, padding=True, return_tensors="pt", **extra)
