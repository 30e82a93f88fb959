"""steer-demo-llava: a small real `LlavaForConditionalGeneration` for SynthScenes, trainable on 2 CPU cores.

* Vision: CLIP vision tower (with its [CLS] token) at 64 px, patch 8 -> 64 patches + CLS; hidden 128, 3 layers.
  LLaVA's ``default`` feature strategy drops the CLS, so an image becomes 64 ``<image>`` tokens.
* Projector: LLaVA's 2-layer GELU MLP.
* Text: Llama decoder, hidden 128, 4 layers, 4 heads (2 KV heads), vocabulary = the word-level tokenizer's.
* Tokenizer: `tokenizers` ``WordLevel`` over the SynthScenes caption words, the words of the two prompts and
  ``<pad> <s> </s> <unk> <image>``; lower-cases, splits punctuation off (``image?`` -> ``image ?``), prepends
  ``<s>``; decoding joins words with spaces.
* Processor: the real `LlavaProcessor` with `CLIPImageProcessorPil`.
* Prompts: those of ``steer eval`` with the ``plain`` template (`steer.zoo.chat_prompt("llava", ...)`), so the
  evaluation runner asks exactly what the model was trained on: `caption_prompt` (CHAIR's
  ``Please describe this image in detail.``) and `question_prompt` (POPE's ``llava`` prompt).

`build` makes a randomly initialised model and processor (seeded); `train_demo` trains it; `load` reads a
saved folder with the real `from_pretrained`; `load_demo` reads the trained weights shipped in
``steer/zoo/demo/`` (`weights_dir`).
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, cast

import torch
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
from transformers import (
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    PreTrainedModel,
    PreTrainedTokenizerFast,
)
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

from steer.protocols import CHAIR_PROMPT, POPE_PROMPTS

from . import synthscenes
from .inputs import chat_prompt

IMAGE_SIZE = 64
PATCH_SIZE = 8
IMAGE_TOKENS = (IMAGE_SIZE // PATCH_SIZE) ** 2
SPECIALS: tuple[str, ...] = ("<pad>", "<s>", "</s>", "<unk>", "<image>")
ANSWERS: tuple[str, ...] = ("yes", "no")


def caption_prompt() -> str:
    """The captioning prompt: ``USER: <image>\nPlease describe this image in detail. ASSISTANT:``."""
    return chat_prompt("llava", CHAIR_PROMPT)


def question_prompt(kind: str) -> str:
    """The yes/no prompt about `kind`: POPE's question with the ``llava`` answer instruction, as a chat turn."""
    return chat_prompt("llava", POPE_PROMPTS["llava"].format(question=synthscenes.pope_question(kind)))


def answer(kind: str, present: bool) -> str:
    """The demo model's answer to `question_prompt(kind)`: ``<kind> yes`` when present, ``no`` when absent.

    The decision is taken at the first answer token, as a choice between the asked kind's own word and
    ``no``. That makes it additive, which a model this small learns within minutes: the kind's logit gets
    one push from the question (copying the asked word) and one from the image (the captioning circuit that
    already says which kinds are there), and only both together beat ``no``. A fixed ``yes``/``no`` token
    after the question would need the product "asked kind x kind present", which has no first-order
    gradient from a random start: training sat at ln 2 for it (measured, see the model card). POPE's
    official parser reads ``cup yes`` as yes and ``no`` as no.
    """
    return f"{kind} yes" if present else "no"


CAPTION_PROMPT = caption_prompt()
"""The training prompt; the model continues it with a SynthScenes caption."""


def _words(text: str) -> list[str]:
    """The tokenizer's split: lower-case, runs of word characters or of punctuation (``Whitespace``)."""
    return re.findall(r"\w+|[^\w\s]+", text.replace("<image>", " ").lower())


PROMPT_WORDS: tuple[str, ...] = tuple(
    dict.fromkeys([*_words(CAPTION_PROMPT), *_words(question_prompt("cup")), *ANSWERS])
)
"""Words of the prompts and answers (the question's kind comes from the caption vocabulary)."""


def vocabulary() -> list[str]:
    """All tokens, in id order: specials, then caption words, then the remaining prompt/question words."""
    words = list(SPECIALS)
    for w in [*synthscenes.caption_vocabulary(), *PROMPT_WORDS]:
        if w not in words:
            words.append(w)
    return words


def build_tokenizer() -> PreTrainedTokenizerFast:
    """The word-level tokenizer (left padding, ``<s>`` prepended by the post-processor)."""
    vocab = {w: i for i, w in enumerate(vocabulary())}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.normalizer = normalizers.Lowercase()
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", vocab["<s>"])]
    )
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        additional_special_tokens=["<image>"],
        padding_side="left",
    )
    tok.padding_side = "left"
    return tok


def build_processor(tokenizer: PreTrainedTokenizerFast | None = None) -> LlavaProcessor:
    """`LlavaProcessor` over `CLIPImageProcessorPil` at 64 px (64 image tokens per image)."""
    tok = tokenizer or build_tokenizer()
    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}
    )
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tok,
        patch_size=PATCH_SIZE,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
    )


def build_config(tokenizer: PreTrainedTokenizerFast) -> LlavaConfig:
    """The steer-demo-llava configuration."""
    vision = CLIPVisionConfig(
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=3,
        num_attention_heads=4,
        patch_size=PATCH_SIZE,
        image_size=IMAGE_SIZE,
        projection_dim=128,
    )
    text = LlamaConfig(
        hidden_size=128,
        intermediate_size=384,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        vocab_size=len(tokenizer),
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    return LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=cast(int, tokenizer.convert_tokens_to_ids("<image>")),  # one token in, one id out
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        image_seq_length=IMAGE_TOKENS,
    )


def build(seed: int = 0) -> tuple[LlavaForConditionalGeneration, LlavaProcessor]:
    """A randomly initialised steer-demo-llava (fp32, train mode off) and its processor.

    Weights depend only on `seed`; the caller's RNG state is left untouched.
    """
    processor = build_processor()
    tok = processor.tokenizer
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlavaForConditionalGeneration(build_config(tok))
    gen = model.generation_config
    gen.pad_token_id, gen.bos_token_id, gen.eos_token_id = (
        tok.pad_token_id,
        tok.bos_token_id,
        tok.eos_token_id,
    )
    return model.float().eval(), processor


def save(model: PreTrainedModel, processor: LlavaProcessor, path: str | os.PathLike) -> Path:
    """`save_pretrained` of model (safetensors) and processor into `path`."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path


def load(
    path: str | os.PathLike, attn_implementation: str = "sdpa", **kwargs: Any
) -> tuple[PreTrainedModel, Any]:
    """Load a saved steer-demo-llava folder through `steer.zoo.load` (real `from_pretrained`, local only)."""
    from .tiny import load as zoo_load

    model, processor = zoo_load(path, attn_implementation=attn_implementation, **kwargs)
    processor.tokenizer.padding_side = "left"
    return model, processor


def weights_dir() -> Path:
    """The folder of the shipped, trained steer-demo-llava (``steer/zoo/demo/``; model card in its README.md)."""
    return Path(__file__).resolve().parent / "demo"


def shipped_weights() -> Path:
    """`weights_dir`, checked to hold the trained weights; `FileNotFoundError` saying how to train them if not."""
    path = weights_dir()
    if not (path / "model.safetensors").is_file():
        raise FileNotFoundError(
            f"the demo model's weights are missing from {path}; reinstall steer or train them: "
            f"python -m steer.zoo.train_demo --out {path}"
        )
    return path


def load_demo(attn_implementation: str = "sdpa", **kwargs: Any) -> tuple[PreTrainedModel, Any]:
    """The trained steer-demo-llava shipped with steer, loaded with `from_pretrained` from `weights_dir`."""
    return load(shipped_weights(), attn_implementation=attn_implementation, **kwargs)


def caption_inputs(processor: LlavaProcessor, images: list[Any]) -> Any:
    """Batched generation inputs asking for a caption of each image (the training prompt)."""
    return processor(images=images, text=[CAPTION_PROMPT] * len(images), return_tensors="pt", padding=True)


__all__ = [
    "CAPTION_PROMPT",
    "IMAGE_SIZE",
    "IMAGE_TOKENS",
    "PATCH_SIZE",
    "build",
    "build_config",
    "build_processor",
    "build_tokenizer",
    "answer",
    "caption_inputs",
    "caption_prompt",
    "load",
    "load_demo",
    "question_prompt",
    "save",
    "shipped_weights",
    "vocabulary",
    "weights_dir",
]
