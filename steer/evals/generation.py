"""One batch of generations: open the images, run ``model.generate`` with left padding, decode the answers.

Nothing here knows about tasks, files or runs; `steer.evals.run` calls :func:`generate_batch` for each batch
(tests replace it to script the model's answers).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from steer.evals.loading import LoadedModel

__all__ = ["batch_seed", "count_tokens", "generate_batch", "open_image", "seed_batch"]


def batch_seed(seed: int, key: str) -> int:
    """The seed of the batch whose first sample is ``key``: a function of the run's seed and that sample only,
    so a resumed or sharded run seeds each batch as an uninterrupted one with the same batches would."""
    import hashlib

    return int(hashlib.sha256(f"{seed}:{key}".encode()).hexdigest()[:15], 16)


def seed_batch(seed: int, key: str) -> None:
    """Seed torch's generators (CPU and every CUDA device) for the batch starting at ``key``."""
    import torch

    torch.manual_seed(batch_seed(seed, key))


def open_image(path: Path) -> Any:
    """The image at ``path``, fully read and converted to RGB (raises whatever PIL raises for a bad file)."""
    from PIL import Image

    with Image.open(path) as image:
        image.load()
        return image.convert("RGB")


def count_tokens(row: Sequence[int], stop: set[int]) -> int:
    """The number of generated tokens in ``row`` before the first stop (end-of-sequence or padding) token."""
    for i, token in enumerate(row):
        if token in stop:
            return i
    return len(row)


def generate_batch(
    loaded: LoadedModel, prompts: list[str], images: list[Any], generation: Mapping[str, Any]
) -> list[tuple[str, int]]:
    """Generate for one batch (left padding); ``[(answer, n_generated_tokens)]`` in input order.

    ``generation`` holds the keyword arguments of ``model.generate``. The answer is the decoded generation with special tokens skipped and surrounding
    whitespace stripped.
    """
    import torch

    model, processor = loaded.model, loaded.processor
    processor.tokenizer.padding_side = "left"
    inputs = processor(text=prompts, images=images, padding=True, return_tensors="pt")
    inputs = inputs.to(model.device)
    pixels = inputs.get("pixel_values")
    if isinstance(pixels, torch.Tensor) and pixels.is_floating_point():
        inputs["pixel_values"] = pixels.to(model.dtype)
    with torch.no_grad():
        out = model.generate(**inputs, **generation)
    new = out[:, inputs["input_ids"].shape[1] :].tolist()
    gen = model.generation_config
    eos = gen.eos_token_id
    stop = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
    if gen.pad_token_id is not None:
        stop.add(gen.pad_token_id)
    texts = processor.tokenizer.batch_decode(new, skip_special_tokens=True)
    return [(text.strip(), count_tokens(row, stop)) for text, row in zip(texts, new)]
