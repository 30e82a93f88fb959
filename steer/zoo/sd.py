"""Tiny random-weight Stable Diffusion pipelines, built from configs with no network.

Two layouts, both miniatures of the real ones so that depths, grids and layer names mean the same thing:

* ``"sd"`` (SD 1.x/2.x layout): `UNet2DConditionModel` with down blocks ``CrossAttnDown ×3, Down`` and up blocks
  ``Up, CrossAttnUp ×3`` (block_out_channels 32, 32, 64, 64; one layer per block; heads 2, 2, 4, 4), a CLIP text
  model (hidden 32, 2 layers, 77 positions), an `AutoencoderKL` with two blocks (latent = image / 2) and DDIM.
  At the default 32×32 px the latent is 16×16 and the depth-d attention grid is (16 / 2^d)²: depth 1 → 8², depth
  2 → 4² (5 `attn2` layers at depth 2: ``down_blocks.2`` + ``up_blocks.1``, as in SD 1.5); at 64×64 px, 16² and 8².
* ``"sdxl"``: `StableDiffusionXLPipeline` layout: down ``Down, CrossAttnDown ×2``, up ``CrossAttnUp ×2, Up``
  (32, 64, 64), two text encoders (the second with projection), ``addition_embed_type="text_time"``.

The tokenizer is a real `CLIPTokenizer` over a small BPE vocabulary: the 256 byte symbols (plain and with
``</w>``), merges that make about a hundred common prompt words single tokens (``cat``, ``dog``, ``red`` …),
then ``<|startoftext|>`` / ``<|endoftext|>``. Words outside the list split into sub-tokens, as rare words do
with the real CLIP vocabulary. `save_sd` / `load_sd` go through the real ``save_pretrained`` /
``DiffusionPipeline.from_pretrained``; `sd_path` caches one saved folder per (kind, seed) under
``$STEER_ZOO_DIR`` (default ``~/.cache/steer/zoo``), like the VLM zoo.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from tokenizers.pre_tokenizers import ByteLevel

from steer.zoo.tiny import cache_root, saved_once

SD_KINDS = ("sd", "sdxl")
#: Bumped whenever a config changes, so that `sd_path` never reuses a stale cached folder.
SD_ZOO_VERSION = "v1"

#: Words that the tiny tokenizer keeps whole (one token each).
WORDS = (
    "a an the and with of on in at next to near under above behind photo painting picture image of "
    "cat dog bird frog bear horse cow sheep mouse rabbit lion tiger elephant monkey turtle duck fish owl "
    "car bus bike boat train plane bench chair table bed sofa clock crown hat bowl cup glass vase apple "
    "banana orange cake pizza ball cube box house tree flower grass road sky sea lake mountain field room "
    "red blue green yellow black white brown purple pink gray orange small big large tiny old young wooden "
    "sitting standing running playing holding wearing man woman boy girl person"
).split()


def _bpe_vocab(words: tuple[str, ...] | list[str]) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """CLIP-style byte-level BPE vocabulary and merges under which every word in `words` is a single token."""
    from tokenizers import Tokenizer
    from tokenizers.models import BPE

    alphabet = sorted(ByteLevel.alphabet())
    vocab: dict[str, int] = {}
    for ch in alphabet:
        vocab[ch] = len(vocab)
    for ch in alphabet:
        vocab[ch + "</w>"] = len(vocab)
    merges: list[tuple[str, str]] = []
    seen: set[tuple[str, str]] = set()

    def encode(word: str) -> list[str]:
        model = BPE(vocab=dict(vocab), merges=list(merges), end_of_word_suffix="</w>", unk_token=None)
        return [t.value for t in Tokenizer(model).model.tokenize(word)]

    for word in dict.fromkeys(words):  # unique, in order
        pieces = encode(word)
        # Append merges joining the current pieces left to right; they have the lowest priority, so they
        # act after every earlier merge has been applied, and the word ends as one token.
        while len(pieces) > 1:
            pair = (pieces[0], pieces[1])
            joined = pieces[0] + pieces[1]
            if pair not in seen:
                seen.add(pair)
                merges.append(pair)
            if joined not in vocab:
                vocab[joined] = len(vocab)
            pieces = [joined, *pieces[2:]]
        if encode(word) != [word + "</w>"]:  # pragma: no cover - guarded by the zoo tests
            raise RuntimeError(f"tiny CLIP vocabulary: {word!r} is not a single token")
    return vocab, merges


def make_clip_tokenizer(words: tuple[str, ...] | list[str] = tuple(WORDS), max_length: int = 77) -> Any:
    """A `CLIPTokenizer` (SOT/EOT specials, ``</w>`` word ends, lower-casing, padding with EOT) over a tiny vocab."""
    from transformers import CLIPTokenizer

    vocab, merges = _bpe_vocab(words)
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    tok = CLIPTokenizer(vocab=vocab, merges=merges)  # type: ignore[arg-type]
    tok.model_max_length = max_length
    return tok


def _text_config(tok: Any, hidden: int = 32, projection: bool = False) -> Any:
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=len(tok),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=77,
        projection_dim=hidden,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        hidden_act="gelu",
    )


def _vae() -> Any:
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(32, 64),
        latent_channels=4,
        norm_num_groups=32,
        sample_size=32,
    )


def _scheduler() -> Any:
    from diffusers import DDIMScheduler

    return DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    )


def _build_sd(tok: Any) -> Any:
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel

    unet = UNet2DConditionModel(
        sample_size=16,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(32, 32, 64, 64),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=(2, 2, 4, 4),
        norm_num_groups=32,
    )
    text = CLIPTextModel(_text_config(tok))
    return StableDiffusionPipeline(
        vae=_vae(),
        text_encoder=text,
        tokenizer=tok,
        unet=unet,
        scheduler=_scheduler(),
        safety_checker=None,
        feature_extractor=None,
        image_encoder=None,
        requires_safety_checker=False,
    )


def _build_sdxl(tok: Any) -> Any:
    from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    unet = UNet2DConditionModel(
        sample_size=16,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(32, 64, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=64,  # text_encoder (32) + text_encoder_2 (32), concatenated as in SDXL
        attention_head_dim=(2, 4, 4),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        transformer_layers_per_block=(1, 1, 1),
        projection_class_embeddings_input_dim=6 * 8 + 32,
        norm_num_groups=32,
    )
    text = CLIPTextModel(_text_config(tok))
    text_2 = CLIPTextModelWithProjection(_text_config(tok, projection=True))
    return StableDiffusionXLPipeline(
        vae=_vae(),
        text_encoder=text,
        text_encoder_2=text_2,
        tokenizer=tok,
        tokenizer_2=make_clip_tokenizer(),
        unet=unet,
        scheduler=_scheduler(),
        force_zeros_for_empty_prompt=True,
    )


def _check_kind(kind: str) -> None:
    if kind not in SD_KINDS:
        raise ValueError(f"unknown tiny Stable Diffusion kind {kind!r}; choose one of {', '.join(SD_KINDS)}")


def build_sd(seed: int = 0, kind: str = "sd") -> Any:
    """Build the tiny pipeline of `kind` (``"sd"`` or ``"sdxl"``) with random weights; no files are written.

    Weights depend only on `seed` (``torch.manual_seed(seed)`` inside ``torch.random.fork_rng``, so the caller's
    RNG is untouched). fp32, eval mode, on CPU, progress bars off.
    """
    _check_kind(kind)
    tok = make_clip_tokenizer()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        pipe = _build_sd(tok) if kind == "sd" else _build_sdxl(tok)
    for module in pipe.components.values():
        if isinstance(module, torch.nn.Module):
            module.eval()
    pipe.set_progress_bar_config(disable=True)
    return pipe


def save_sd(path: str | os.PathLike, seed: int = 0, kind: str = "sd") -> Path:
    """Build the tiny `kind` pipeline with `seed` and write it to `path` with ``save_pretrained``."""
    path = Path(path)
    pipe = build_sd(seed, kind)
    path.mkdir(parents=True, exist_ok=True)
    pipe.save_pretrained(path, safe_serialization=True)
    return path


def load_sd(path: str | os.PathLike, dtype: torch.dtype = torch.float32) -> Any:
    """Load a saved pipeline folder the way a user loads a checkpoint: ``DiffusionPipeline.from_pretrained``.

    Works for zoo folders and real SD/SDXL checkpoints alike; nothing is fetched (``local_files_only=True``).
    """
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(path, dtype=dtype, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _is_complete(path: Path) -> bool:
    return (path / "model_index.json").is_file() and (path / "unet" / "diffusion_pytorch_model.safetensors").is_file()


def sd_path(seed: int = 0, kind: str = "sd", root: str | os.PathLike | None = None) -> Path:
    """The folder holding the saved tiny `kind` pipeline for `seed`, saving it first if needed.

    ``<root>/<kind>-<seed>-v1`` with `root` = `$STEER_ZOO_DIR` or ``~/.cache/steer/zoo``; written into a
    temporary sibling and renamed into place, so concurrent processes never see a half-written folder.
    """
    _check_kind(kind)
    final = cache_root(root) / f"tiny-{kind}-{seed}-{SD_ZOO_VERSION}"
    return saved_once(final, lambda tmp: save_sd(tmp, seed, kind), _is_complete)


def load_tiny_sd(seed: int | str = 0, kind: str = "sd", dtype: torch.dtype = torch.float32) -> Any:
    """``load_sd(sd_path(seed, kind))``: the tiny pipeline through the real loading path.

    ``load_tiny_sd("sdxl")`` works too (a kind given first), as does ``load_tiny_sd(kind="sdxl", seed=1)``.
    """
    if isinstance(seed, str):
        return load_sd(sd_path(0, seed), dtype=dtype)
    return load_sd(sd_path(seed, kind), dtype=dtype)


__all__ = [
    "SD_KINDS",
    "SD_ZOO_VERSION",
    "WORDS",
    "build_sd",
    "load_sd",
    "load_tiny_sd",
    "make_clip_tokenizer",
    "save_sd",
    "sd_path",
]
