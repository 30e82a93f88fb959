"""Small helpers shared by the tests."""

from __future__ import annotations

from typing import Any

import torch

from steer import zoo

QUESTIONS = ("Describe the image.", "What color is the big object in this picture?", "Count.")


def batch_inputs(processor: Any, family: str, n: int = 3, prefix: bool = True) -> Any:
    """n prompts of different lengths, one image each (different images), left padded."""
    prompts = [zoo.chat_prompt(family, QUESTIONS[i % len(QUESTIONS)]) for i in range(n)]
    images = [[zoo.sample_image(10 + i)] for i in range(n)]
    return zoo.make_inputs(processor, family, prompts, images)


def row_inputs(processor: Any, family: str, i: int) -> Any:
    prompt = zoo.chat_prompt(family, QUESTIONS[i % len(QUESTIONS)])
    return zoo.make_inputs(processor, family, [prompt], [[zoo.sample_image(10 + i)]])


def generate(model: Any, inputs: Any, **kwargs: Any) -> torch.Tensor:
    """Greedy (or beam) generation of exactly ``max_new_tokens`` tokens; returns only the new tokens."""
    n = kwargs.pop("max_new_tokens", 5)
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=n, min_new_tokens=n, do_sample=False, **kwargs)
    return out[:, inputs["input_ids"].shape[1] :]


def logits(model: Any, inputs: Any) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs).logits


def real(inputs: Any) -> torch.Tensor:
    """bool [B, T]: positions that are not padding."""
    return inputs["attention_mask"].bool()


def hook_count(model: torch.nn.Module) -> int:
    return sum(
        len(m._forward_hooks) + len(m._forward_pre_hooks) + len(getattr(m, "_forward_hooks_with_kwargs", {}))
        for m in model.modules()
    )


def with_cache(model: Any, previous: Any) -> dict[str, Any]:
    """The keyword that hands ``previous``'s KV cache back to ``model``: ``cache`` from transformers 5.24 on,
    ``past_key_values`` before (the output attribute was renamed with it)."""
    import inspect

    name = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    return {name: getattr(previous, name)}
