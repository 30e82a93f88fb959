"""Tiny random-weight models of every supported family, built from configs with no network.

Every model has a 4-layer Llama/Qwen2 text decoder (hidden 64, 4 heads, 2 KV heads so GQA is exercised,
vocabulary = the tokenizer's) and a 2-layer vision tower:

* `llava`: LLaVA-1.5 with CLIP at 56 px / patch 14 -> 16 image tokens per image.
* `llava_next`: LLaVA-NeXT with CLIP at 28 px and grid pinpoints `[[28, 56], [56, 28], [56, 56]]`
  (anyres: the token count depends on the image size).
* `qwen2_vl`, `qwen2_5_vl`: patch 14, merge 2; images are resized to between 56*56 and 112*112 pixels
  (56x56 -> grid (1, 4, 4) -> 4 tokens; 56x84 -> 6 tokens).
* `qwen3_vl`: Qwen3-VL (interleaved M-RoPE, DeepStack features added after decoder layers 0 and 1), patch 16,
  merge 2, images resized to between 64*64 and 128*128 pixels (56x56 -> grid (1, 4, 4) -> 4 tokens).
* `llava_onevision`: LLaVA-OneVision with a SigLIP tower (no [CLS]) at 28 px / patch 14 (2 x 2 tokens per
  crop), anyres-max-9 over pinpoints up to 112 x 112 (4 x 4 tiles: the max rule interpolates the grid).
* `gemma3`: Gemma 3 with a SigLIP tower at 56 px / patch 14, 4 x 4 patches average-pooled to 2 x 2 = 4 tokens
  per crop; sliding-window layers (window 16) alternate with full layers; pan-and-scan crops (see
  `zoo.make_inputs`).
* `internvl`: InternVL (InternViT with [CLS], pixel shuffle 0.5) at 56 px / patch 14: 4 x 4 patches -> 2 x 2
  = 4 tokens per tile; up to 4 tiles plus a thumbnail per image.
* `smolvlm`: SmolVLM (Idefics3 family), SigLIP-like tower at 56 px / patch 14, pixel shuffle 2: 4 tokens per
  sub-image; an image is split into 56 px sub-images (longest edge 112) plus a global image.

The tokenizer is byte-level BPE with no merges (any text round-trips) plus `<pad> <s> </s> <unk>` and the
family's special tokens. `save` / `load` go through the real `save_pretrained` / `from_pretrained`, and
`tiny_path` caches one saved folder per (family, seed).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from tokenizers.pre_tokenizers import ByteLevel
from transformers import (
    AutoModelForImageTextToText,
    CLIPVisionConfig,
    Gemma3Config,
    Gemma3ForConditionalGeneration,
    Gemma3Processor,
    Gemma3TextConfig,
    InternVLConfig,
    InternVLForConditionalGeneration,
    InternVLVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaNextConfig,
    LlavaNextForConditionalGeneration,
    LlavaNextProcessor,
    LlavaOnevisionConfig,
    LlavaOnevisionForConditionalGeneration,
    LlavaProcessor,
    PreTrainedModel,
    PreTrainedTokenizerFast,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2Config,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
    Qwen3VLConfig,
    Qwen3VLForConditionalGeneration,
    SiglipVisionConfig,
    SmolVLMConfig,
    SmolVLMForConditionalGeneration,
    SmolVLMVisionConfig,
)
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
from transformers.models.gemma3.image_processing_pil_gemma3 import Gemma3ImageProcessorPil
from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import GotOcr2ImageProcessorPil
from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil
from transformers.models.llava_onevision.image_processing_pil_llava_onevision import (
    LlavaOnevisionImageProcessorPil,
)
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
from transformers.models.smolvlm.image_processing_pil_smolvlm import SmolVLMImageProcessorPil

from .inputs import FAMILIES, QwenProcessorLite, check_family
from .processors import (
    InternVLProcessorLite,
    LlavaOnevisionProcessorLite,
    Qwen3VLProcessorLite,
    SmolVLMProcessorLite,
)

#: Bumped whenever a config changes, so that `tiny_path` never reuses a stale cached folder.
ZOO_VERSION = "v1"

_QWEN_SPECIALS = (
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
)
_NEXT_PINPOINTS = [[28, 56], [56, 28], [56, 56]]
_ONEVISION_PINPOINTS = [[28, 28], [28, 56], [56, 28], [56, 56], [56, 84], [84, 56], [112, 112]]
_GEMMA3_SPECIALS = {"boi_token": "<start_of_image>", "image_token": "<image_soft_token>", "eoi_token": "<end_of_image>"}
_INTERNVL_SPECIALS = {
    "start_image_token": "<img>",
    "end_image_token": "</img>",
    "context_image_token": "<IMG_CONTEXT>",
    "video_token": "<video>",
}
#: SmolVLM's row/column markers of the sub-image grid (up to 4 x 4 sub-images).
SMOLVLM_GRID_TOKENS = tuple(f"<row_{r}_col_{c}>" for r in range(1, 5) for c in range(1, 5))
_SMOLVLM_SPECIALS = {
    "image_token": "<image>",
    "fake_image_token": "<fake_token_around_image>",
    "global_image_token": "<global-img>",
    "end_of_utterance_token": "<end_of_utterance>",
}
_MODEL_TYPE_TO_FAMILY = {
    "llava": "llava",
    "llava_next": "llava_next",
    "qwen2_vl": "qwen2_vl",
    "qwen2_5_vl": "qwen2_5_vl",
    "qwen3_vl": "qwen3_vl",
    "llava_onevision": "llava_onevision",
    "gemma3": "gemma3",
    "internvl": "internvl",
    "smolvlm": "smolvlm",
}


def _make_tokenizer(specials: tuple[str, ...], named: dict[str, str] | None = None) -> PreTrainedTokenizerFast:
    """Byte-level BPE with no merges: 4 control tokens, 256 byte symbols, then `specials`; left padding.

    ``named`` gives some specials a name the family's processor reads from the tokenizer (e.g.
    ``tokenizer.boi_token`` for Gemma 3); they are added after ``specials``."""
    named = dict(named or {})
    specials = tuple(specials) + tuple(t for t in named.values() if t not in specials)
    vocab = {t: i for i, t in enumerate(["<pad>", "<s>", "</s>", "<unk>"])}
    for ch in sorted(ByteLevel.alphabet()):
        vocab[ch] = len(vocab)
    for s in specials:
        vocab[s] = len(vocab)
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        additional_special_tokens=list(specials),
        padding_side="left",
        **({"extra_special_tokens": named} if named else {}),
    )
    if named:  # the named specials replace the list above; keep the others special too (same ids)
        tok.add_tokens([t for t in specials if t not in named.values()], special_tokens=True)
    tok.padding_side = "left"
    return tok


def _text_config(tok: Any) -> dict[str, Any]:
    return dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        vocab_size=len(tok),
        pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
    )


def _clip_config(image_size: int) -> CLIPVisionConfig:
    return CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        patch_size=14,
        projection_dim=32,
        image_size=image_size,
    )


def _llava(tok: Any) -> tuple[PreTrainedModel, LlavaProcessor]:
    config = LlavaConfig(
        vision_config=_clip_config(56),
        text_config=LlamaConfig(**_text_config(tok)),
        image_token_index=tok.convert_tokens_to_ids("<image>"),
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        image_seq_length=16,
    )
    image_processor = CLIPImageProcessorPil(size={"shortest_edge": 56}, crop_size={"height": 56, "width": 56})
    processor = LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tok,
        patch_size=14,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
    )
    return LlavaForConditionalGeneration(config), processor


def _llava_next(tok: Any) -> tuple[PreTrainedModel, LlavaNextProcessor]:
    config = LlavaNextConfig(
        vision_config=_clip_config(28),
        text_config=LlamaConfig(**_text_config(tok)),
        image_token_index=tok.convert_tokens_to_ids("<image>"),
        image_grid_pinpoints=_NEXT_PINPOINTS,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        image_seq_length=4,
    )
    image_processor = LlavaNextImageProcessorPil(
        size={"shortest_edge": 28},
        crop_size={"height": 28, "width": 28},
        image_grid_pinpoints=_NEXT_PINPOINTS,
    )
    processor = LlavaNextProcessor(
        image_processor=image_processor,
        tokenizer=tok,
        patch_size=14,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
    )
    return LlavaNextForConditionalGeneration(config), processor


def _qwen(family: str, tok: Any) -> tuple[PreTrainedModel, QwenProcessorLite]:
    text = dict(
        _text_config(tok),
        rope_parameters={"rope_type": "default", "rope_theta": 1e4, "mrope_section": [2, 3, 3]},
    )
    ids = dict(
        image_token_id=tok.convert_tokens_to_ids("<|image_pad|>"),
        video_token_id=tok.convert_tokens_to_ids("<|video_pad|>"),
        vision_start_token_id=tok.convert_tokens_to_ids("<|vision_start|>"),
        vision_end_token_id=tok.convert_tokens_to_ids("<|vision_end|>"),
    )
    vision_common = dict(
        depth=2, num_heads=4, patch_size=14, spatial_merge_size=2, temporal_patch_size=2, in_channels=3
    )
    model: PreTrainedModel
    vision: dict[str, Any]
    if family == "qwen2_vl":
        vision = dict(vision_common, embed_dim=32, hidden_size=64, mlp_ratio=2)
        model = Qwen2VLForConditionalGeneration(Qwen2VLConfig(text_config=text, vision_config=vision, **ids))
    else:
        vision = dict(
            vision_common,
            hidden_size=32,
            out_hidden_size=64,
            intermediate_size=64,
            window_size=56,
            fullatt_block_indexes=[1],
        )
        model = Qwen2_5_VLForConditionalGeneration(
            Qwen2_5_VLConfig(text_config=text, vision_config=vision, **ids)
        )
    image_processor = Qwen2VLImageProcessorPil(
        size={"shortest_edge": 56 * 56, "longest_edge": 112 * 112},
        patch_size=14,
        merge_size=2,
        temporal_patch_size=2,
    )
    return model, QwenProcessorLite(image_processor=image_processor, tokenizer=tok)


def _qwen3_vl(tok: Any) -> tuple[PreTrainedModel, Qwen3VLProcessorLite]:
    text = dict(
        _text_config(tok),
        head_dim=16,
        rope_parameters={"rope_type": "default", "rope_theta": 1e4, "mrope_section": [2, 3, 3], "mrope_interleaved": True},
    )
    vision = dict(
        depth=2,
        hidden_size=32,
        intermediate_size=64,
        num_heads=4,
        patch_size=16,
        spatial_merge_size=2,
        temporal_patch_size=2,
        out_hidden_size=64,
        num_position_embeddings=16,
        deepstack_visual_indexes=[0, 1],
    )
    config = Qwen3VLConfig(
        text_config=text,
        vision_config=vision,
        image_token_id=tok.convert_tokens_to_ids("<|image_pad|>"),
        video_token_id=tok.convert_tokens_to_ids("<|video_pad|>"),
        vision_start_token_id=tok.convert_tokens_to_ids("<|vision_start|>"),
        vision_end_token_id=tok.convert_tokens_to_ids("<|vision_end|>"),
    )
    image_processor = Qwen2VLImageProcessorPil(
        size={"shortest_edge": 64 * 64, "longest_edge": 128 * 128},
        patch_size=16,
        merge_size=2,
        temporal_patch_size=2,
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
    )
    processor = Qwen3VLProcessorLite(image_processor=image_processor, tokenizer=tok, video_processor=None)
    return Qwen3VLForConditionalGeneration(config), processor


def _siglip_config(image_size: int) -> SiglipVisionConfig:
    return SiglipVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, patch_size=14,
        image_size=image_size,
    )  # fmt: skip


def _llava_onevision(tok: Any) -> tuple[PreTrainedModel, LlavaOnevisionProcessorLite]:
    config = LlavaOnevisionConfig(
        vision_config=_siglip_config(28),
        text_config=Qwen2Config(**_text_config(tok)),
        image_token_index=tok.convert_tokens_to_ids("<image>"),
        video_token_index=tok.convert_tokens_to_ids("<video>"),
        image_grid_pinpoints=_ONEVISION_PINPOINTS,
        vision_feature_layer=-1,
        vision_feature_select_strategy="full",
        vision_aspect_ratio="anyres_max_9",
    )
    image_processor = LlavaOnevisionImageProcessorPil(
        size={"height": 28, "width": 28}, image_grid_pinpoints=_ONEVISION_PINPOINTS
    )
    processor = LlavaOnevisionProcessorLite(
        image_processor=image_processor,
        tokenizer=tok,
        video_processor=None,
        num_image_tokens=4,
        vision_feature_select_strategy="full",
        vision_aspect_ratio="anyres_max_9",
    )
    return LlavaOnevisionForConditionalGeneration(config), processor


def _gemma3(tok: Any) -> tuple[PreTrainedModel, Gemma3Processor]:
    text = Gemma3TextConfig(
        **_text_config(tok),
        head_dim=16,
        query_pre_attn_scalar=16,
        sliding_window=16,
        layer_types=["sliding_attention", "full_attention", "sliding_attention", "full_attention"],
    )
    config = Gemma3Config(
        text_config=text,
        vision_config=_siglip_config(56),
        mm_tokens_per_image=4,
        boi_token_index=tok.convert_tokens_to_ids("<start_of_image>"),
        eoi_token_index=tok.convert_tokens_to_ids("<end_of_image>"),
        image_token_index=tok.convert_tokens_to_ids("<image_soft_token>"),
    )
    image_processor = Gemma3ImageProcessorPil(size={"height": 56, "width": 56})
    return Gemma3ForConditionalGeneration(config), Gemma3Processor(image_processor=image_processor, tokenizer=tok, image_seq_length=4)


def _internvl(tok: Any) -> tuple[PreTrainedModel, InternVLProcessorLite]:
    vision = InternVLVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=[56, 56],
        patch_size=[14, 14],
    )  # fmt: skip
    config = InternVLConfig(
        vision_config=vision,
        text_config=Qwen2Config(**_text_config(tok)),
        image_token_id=tok.convert_tokens_to_ids("<IMG_CONTEXT>"),
        image_seq_length=4,
        downsample_ratio=0.5,
    )
    image_processor = GotOcr2ImageProcessorPil(
        size={"height": 56, "width": 56}, crop_to_patches=True, min_patches=1, max_patches=4
    )
    processor = InternVLProcessorLite(image_processor=image_processor, tokenizer=tok, video_processor=None, image_seq_length=4)
    return InternVLForConditionalGeneration(config), processor


def _smolvlm(tok: Any) -> tuple[PreTrainedModel, SmolVLMProcessorLite]:
    vision = SmolVLMVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, patch_size=14, image_size=56
    )
    config = SmolVLMConfig(
        vision_config=vision,
        text_config=LlamaConfig(**_text_config(tok)),
        image_token_id=tok.convert_tokens_to_ids("<image>"),
        scale_factor=2,
    )
    image_processor = SmolVLMImageProcessorPil(
        size={"longest_edge": 112}, max_image_size={"longest_edge": 56}, do_image_splitting=True
    )
    processor = SmolVLMProcessorLite(image_processor=image_processor, tokenizer=tok, video_processor=None, image_seq_len=4)
    return SmolVLMForConditionalGeneration(config), processor


#: family -> (tokenizer specials, named specials, builder) of the families added after the first four.
_BUILDERS: dict[str, tuple[tuple[str, ...], dict[str, str], Callable[[Any], tuple[PreTrainedModel, Any]]]] = {
    "qwen3_vl": (_QWEN_SPECIALS, {}, _qwen3_vl),
    "llava_onevision": (("<image>", "<video>", "<|im_start|>", "<|im_end|>"), {}, _llava_onevision),
    "gemma3": (("<start_of_turn>", "<end_of_turn>"), _GEMMA3_SPECIALS, _gemma3),
    "internvl": (("<|im_start|>", "<|im_end|>"), _INTERNVL_SPECIALS, _internvl),
    "smolvlm": (("<|im_start|>", *SMOLVLM_GRID_TOKENS), _SMOLVLM_SPECIALS, _smolvlm),
}


def _set_generation_ids(model: PreTrainedModel, tokenizer: Any) -> None:
    gen = model.generation_config
    gen.pad_token_id = tokenizer.pad_token_id
    gen.bos_token_id = tokenizer.bos_token_id
    gen.eos_token_id = tokenizer.eos_token_id


def fill_zero_weights(model: PreTrainedModel, std: float = 0.2) -> None:
    """Draw the matrices a family's initialisation leaves at zero (Gemma 3's projector weight, InternViT's [CLS]
    token and position embeddings): with random weights elsewhere, a zero projector makes every image the same
    (no method could change anything through the image) and a zero [CLS] token gives every patch the same score."""
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() >= 2 and not bool(param.any()):
                param.normal_(0.0, std)


def build(family: str, seed: int = 0) -> tuple[PreTrainedModel, Any]:
    """Build the tiny model of `family` with random weights and its processor; no files are written.

    The weights depend only on `seed`: `torch.manual_seed(seed)` runs right before construction, inside
    `torch.random.fork_rng` so the caller's RNG state is left as it was. The model is fp32, in eval mode.

    Returns:
        `(model, processor)`: the processor is the family's real class (`LlavaProcessor`, `LlavaNextProcessor`,
        `Gemma3Processor`) or its torchvision-free stand-in (`QwenProcessorLite`, `steer.zoo.processors`);
        `processor.tokenizer` pads on the left.
    """
    check_family(family)
    processor: Any
    if family in _BUILDERS:
        specials, named, make = _BUILDERS[family]
        tok = _make_tokenizer(specials, named)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model, processor = make(tok)
            fill_zero_weights(model)
        model = model.float().eval()
        _set_generation_ids(model, tok)
        return model, processor
    tok = _make_tokenizer(("<image>",) if family in ("llava", "llava_next") else _QWEN_SPECIALS)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if family == "llava":
            model, processor = _llava(tok)
        elif family == "llava_next":
            model, processor = _llava_next(tok)
        else:
            model, processor = _qwen(family, tok)
    model = model.float().eval()
    _set_generation_ids(model, tok)
    return model, processor


def save(family: str, path: str | os.PathLike, seed: int = 0) -> Path:
    """Build `family` with `seed` and write model and processor to `path` with `save_pretrained`."""
    path = Path(path)
    model, processor = build(family, seed)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path


def family_of(path: str | os.PathLike) -> str:
    """The zoo family of a saved model folder, from `config.json`'s `model_type`."""
    config = json.loads((Path(path) / "config.json").read_text())
    model_type = config.get("model_type")
    if model_type not in _MODEL_TYPE_TO_FAMILY:
        raise ValueError(
            f"{path}: model_type {model_type!r} is not supported; supported: {', '.join(_MODEL_TYPE_TO_FAMILY)}"
        )
    return _MODEL_TYPE_TO_FAMILY[model_type]


def load_processor(path: str | os.PathLike, family: str | None = None) -> Any:
    """Load the processor saved in `path` (real `from_pretrained`, local files only); tokenizer pads left."""
    family = family or family_of(path)
    classes: dict[str, Any] = {
        "llava": LlavaProcessor,
        "llava_next": LlavaNextProcessor,
        "qwen3_vl": Qwen3VLProcessorLite,
        "llava_onevision": LlavaOnevisionProcessorLite,
        "gemma3": Gemma3Processor,
        "internvl": InternVLProcessorLite,
        "smolvlm": SmolVLMProcessorLite,
    }
    processor = classes.get(family, QwenProcessorLite).from_pretrained(path, local_files_only=True)
    processor.tokenizer.padding_side = "left"
    return processor


def load(
    path: str | os.PathLike,
    attn_implementation: str = "sdpa",
    dtype: torch.dtype = torch.float32,
    device_map: Any = None,
) -> tuple[PreTrainedModel, Any]:
    """Load a saved model folder the way a user loads a checkpoint: `AutoModelForImageTextToText.from_pretrained`.

    Works for zoo folders and real checkpoints of the supported families alike; nothing is fetched from the
    hub (`local_files_only=True`). Returns `(model, processor)` with the model in eval mode.
    """
    family = family_of(path)
    model = AutoModelForImageTextToText.from_pretrained(
        path,
        attn_implementation=attn_implementation,
        dtype=dtype,
        device_map=device_map,
        local_files_only=True,
    )
    processor = load_processor(path, family)
    gen = model.generation_config
    if gen.pad_token_id is None:
        gen.pad_token_id = processor.tokenizer.pad_token_id
    return model.eval(), processor


def cache_root(root: str | os.PathLike | None = None) -> Path:
    """The zoo's cache folder: ``root``, else ``$STEER_ZOO_DIR``, else ``~/.cache/steer/zoo``."""
    if root is not None:
        return Path(root)
    env = os.environ.get("STEER_ZOO_DIR")
    return Path(env) if env else Path.home() / ".cache" / "steer" / "zoo"


def _is_complete(path: Path) -> bool:
    return (
        (path / "config.json").is_file()
        and (path / "model.safetensors").is_file()
        and (path / "tokenizer.json").is_file()
    )


def saved_once(final: Path, write: Callable[[Path], object], is_complete: Callable[[Path], bool]) -> Path:
    """Return ``final`` once it holds a complete save, writing it with ``write(folder)`` if needed.

    A complete existing folder is reused untouched. A new one is written into a temporary sibling and
    renamed into place, so concurrent processes never see a half-written folder; if another process wins
    the race, its folder is used and ours is discarded.
    """
    if is_complete(final):
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    try:
        tmp.chmod(0o755)  # mkdtemp makes it private; the cache may be shared
        write(tmp)
        if final.exists() and not is_complete(final):
            shutil.rmtree(final, ignore_errors=True)  # left over from a crash before atomic writes
        try:
            os.rename(tmp, final)
        except OSError:
            if not is_complete(final):
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return final


def tiny_path(family: str, seed: int = 0, root: str | os.PathLike | None = None) -> Path:
    """The folder holding the saved tiny `family` model for `seed`, saving it first if needed.

    The folder is `<root>/<family>-<seed>-v1`, with `root` defaulting to `$STEER_ZOO_DIR` or
    `~/.cache/steer/zoo`. A complete existing folder is reused untouched. A new one is written into a
    temporary sibling and renamed into place, so concurrent processes never see a half-written folder;
    if another process wins the race, its folder is used and ours is discarded.
    """
    check_family(family)
    final = cache_root(root) / f"{family}-{seed}-{ZOO_VERSION}"
    return saved_once(final, lambda tmp: save(family, tmp, seed), _is_complete)


def load_tiny(family: str, seed: int = 0, attn_implementation: str = "sdpa") -> tuple[PreTrainedModel, Any]:
    """`load(tiny_path(family, seed), attn_implementation)`: the tiny model through the real loading path."""
    return load(tiny_path(family, seed), attn_implementation=attn_implementation)


__all__ = [
    "FAMILIES",
    "SMOLVLM_GRID_TOKENS",
    "ZOO_VERSION",
    "build",
    "family_of",
    "load",
    "load_processor",
    "load_tiny",
    "save",
    "tiny_path",
]
