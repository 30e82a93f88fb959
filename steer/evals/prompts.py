"""Prompts of ``steer eval``: the benchmark user texts and the templates that wrap them for a model.

The user texts (:data:`CHAIR_PROMPT`, :data:`POPE_PROMPTS`) live in `steer.protocols` (the demo model is trained
on them) and are re-exported here. A template turns one user text into the model's full prompt with its image
placeholder (:func:`build_prompt`); ``auto`` is resolved per model by :func:`resolve_template`.
"""

from __future__ import annotations

from typing import Any

from steer.errors import EvalInputError
from steer.evals.loading import ZOO_MODEL_TYPES
from steer.protocols import CHAIR_PROMPT, POPE_PROMPTS

__all__ = [
    "CHAIR_PROMPT",
    "LLAVA_V1_SYSTEM",
    "POPE_PROMPTS",
    "TEMPLATES",
    "build_prompt",
    "resolve_template",
]

LLAVA_V1_SYSTEM = (
    "A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions."
)
"""The system line of LLaVA's ``vicuna_v1`` conversation (template ``llava_v1``)."""

TEMPLATES = ("auto", "llava_v1", "chat", "plain")
"""Prompt templates: ``llava_v1`` = ``"{system} USER: <image>\\n{text} ASSISTANT:"`` (LLaVA-1.5 only);
``chat`` = the processor's chat template (image first, then the text); ``plain`` = ``steer.zoo.chat_prompt``;
``auto`` = ``llava_v1`` for LLaVA-1.5, else ``chat`` when the processor has a chat template, else ``plain``."""


def _has_chat_template(processor: Any) -> bool:
    return bool(getattr(processor, "chat_template", None)) and hasattr(processor, "apply_chat_template")


def resolve_template(template: str, model_type: str, processor: Any) -> str:
    """The concrete template name for ``template`` (``auto`` resolved) on this model."""
    if template not in TEMPLATES:
        raise EvalInputError(f"unknown --template {template!r}; expected one of {', '.join(TEMPLATES)}")
    if template == "auto":
        if model_type == "llava":
            return "llava_v1"
        return "chat" if _has_chat_template(processor) else "plain"
    if template == "llava_v1" and model_type != "llava":
        raise EvalInputError(f"--template llava_v1 is LLaVA-1.5's conversation; this model is {model_type}")
    if template == "chat" and not _has_chat_template(processor):
        raise EvalInputError("--template chat: the processor has no chat template; use plain")
    return template


def build_prompt(text: str, template: str, model_type: str, processor: Any) -> str:
    """The full prompt (with the image placeholder) for one user ``text`` under a resolved ``template``."""
    if template == "llava_v1":
        return f"{LLAVA_V1_SYSTEM} USER: <image>\n{text} ASSISTANT:"
    if template == "chat":
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}]
        return processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    if model_type not in ZOO_MODEL_TYPES:
        raise EvalInputError(f"no plain prompt format for model type {model_type!r}; use --template chat")
    from steer import zoo  # torch and transformers: only when a plain prompt is built

    return zoo.chat_prompt(ZOO_MODEL_TYPES[model_type], text)
