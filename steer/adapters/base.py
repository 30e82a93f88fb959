"""What steer knows about a model family, in one place: the site table and the family facts.

An adapter answers, for one model class:

* **sites** (`steer.edits.sites`): where the decoder layers, their attention and MLP modules, the final norm,
  ``lm_head``, the input embeddings, the vision tower and its layers are; how many heads and KV heads there
  are (:meth:`Adapter.module_for` resolves a tensor site to a module and a hook point);
* **facts** (one definition each): the static :class:`~steer.edits.facts.ModelInfo`; where each image's
  tokens sit in a prompt and which grids they form (:meth:`Adapter.image_layout`); the text-only variant of
  a prompt (:meth:`Adapter.text_only_inputs`); position ids (1-D or M-RoPE); visual-token scores
  (``[CLS]`` row or mean received attention, :mod:`steer.adapters.scores`); the chat prompt.

The decoder stack comes from the adapter, never from "the longest ModuleList" (that is Qwen's vision tower).
Subclasses (one module per family) override what differs.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any, ClassVar, cast

import torch
from torch import nn

from steer.edits.facts import ImageBlock, ImageLayout, ImageSpan, ModelInfo, runs

ImageInfo = tuple[int, Any]
"""(token count, meta) of one image in prompt order; meta is the image size (LLaVA-NeXT), the
``(t, h, w)`` grid (Qwen) or None."""

MISMATCH = "image placeholders and images do not match"


class Adapter:
    """Base class; one subclass per family. Construct with :func:`steer.adapters.adapter_for`."""

    family: ClassVar[str] = ""
    model_classes: ClassVar[tuple[str, ...]] = ()
    position_scheme: ClassVar[str] = "1d"  # "1d" or "mrope"
    vision_score: ClassVar[str] = "cls"  # the visual-token score the tower supports
    vision_has_cls: ClassVar[bool] = True  # the tower's sequence starts with a [CLS] token (CLIP, InternViT)
    image_block_kinds: ClassVar[tuple[str, ...]] = ("image",)  # the grids an image's tokens form
    #: How the language model's own mask treats the tokens of one image: "causal" (raster order, like text) or
    #: "bidirectional" (Gemma 3: every token of an image sees the whole image). Mask edits compose with it.
    image_attention: ClassVar[str] = "causal"
    #: Language-model inputs besides embeddings, mask and positions that carry image features (Qwen3-VL's
    #: DeepStack), by how rows without an image extend them: "row_mask" (bool [B, T], False on added rows) or
    #: "features" (the features of the image tokens in row order, unchanged). An auxiliary run on the prompt
    #: itself keeps them; a text-only run drops them.
    lm_visual_inputs: ClassVar[dict[str, str]] = {}
    #: Model inputs aligned with the prompt's tokens ([B, T]) besides input_ids and attention_mask (Qwen's
    #: ``mm_token_type_ids``, Gemma 3's ``token_type_ids``): pruning shortens them with the prompt.
    per_token_inputs: ClassVar[tuple[str, ...]] = ()

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.wrappers: list[str] = []  # known wrappers around the model (torch.compile, DDP, PeftModel), if any

    # ---- language model sites --------------------------------------------------------------------
    @property
    def config(self) -> Any:
        return self.model.config

    @property
    def text_config(self) -> Any:
        return cast(Any, self.model).config.text_config

    @property
    def text_model(self) -> nn.Module:
        """The decoder (``...language_model``) whose forward takes embeddings, mask and position ids."""
        return cast(Any, self.model).model.language_model

    @property
    def decoder_layers(self) -> nn.ModuleList:
        return cast(nn.ModuleList, self.text_model.layers)

    def attention(self, layer: int) -> nn.Module:
        return cast(nn.Module, self.decoder_layers[layer].self_attn)

    def mlp(self, layer: int) -> nn.Module:
        return cast(nn.Module, self.decoder_layers[layer].mlp)

    @property
    def final_norm(self) -> nn.Module:
        return cast(nn.Module, self.text_model.norm)

    @property
    def lm_head(self) -> nn.Module:
        return cast(nn.Module, self.model.lm_head)

    @property
    def embed_tokens(self) -> nn.Module:
        return cast(Any, self.model).get_input_embeddings()

    @property
    def num_layers(self) -> int:
        return len(self.decoder_layers)

    @property
    def num_heads(self) -> int:
        return int(self.text_config.num_attention_heads)

    @property
    def num_kv_heads(self) -> int:
        return int(getattr(self.text_config, "num_key_value_heads", None) or self.num_heads)

    @property
    def head_dim(self) -> int:
        return int(getattr(self.text_config, "head_dim", None) or self.hidden_size // self.num_heads)

    @property
    def hidden_size(self) -> int:
        return int(self.text_config.hidden_size)

    @property
    def attention_config(self) -> Any:
        """The config object the text attention modules read ``_attn_implementation`` from."""
        return self.attention(0).config

    def module_for(self, site: str, layer: int) -> tuple[nn.Module, str]:
        """A per-layer tensor site as ``(module, point)``: ``point`` is ``"input"`` (the module's first
        argument, a pre-hook) or ``"output"`` (its output, a forward hook)."""
        if site == "layer.in":
            return self.decoder_layers[layer], "input"
        if site in ("layer.out", "layer.logits", "layer.logits.normed"):
            return self.decoder_layers[layer], "output"
        if site == "layer.mlp.out":
            return self.mlp(layer), "output"
        raise ValueError(f"{site!r} is not a module site of {type(self).__name__}")

    # ---- vision sites ----------------------------------------------------------------------------
    @property
    def vision_tower(self) -> nn.Module:
        return cast(Any, self.model).model.vision_tower

    @property
    def vision_layers(self) -> nn.ModuleList:
        tower = self.vision_tower
        encoder = getattr(tower, "encoder", None) or cast(Any, tower).vision_model.encoder
        return cast(nn.ModuleList, encoder.layers)

    def vision_attention(self, layer: int) -> nn.Module:
        return cast(nn.Module, self.vision_layers[layer].self_attn)

    @property
    def projector(self) -> nn.Module:
        return cast(Any, self.model).model.multi_modal_projector

    @property
    def image_encoder(self) -> nn.Module:
        """The module whose ``get_image_features`` encodes images (``generate`` calls it before the prefill)."""
        return cast(nn.Module, cast(Any, self.model).model)

    @property
    def feature_layer(self) -> int:
        """Index (0-based) of the vision layer whose output feeds the projector."""
        f = self.config.vision_feature_layer
        f = f[-1] if isinstance(f, (list, tuple)) else f
        n = len(self.vision_layers)
        k = (f % (n + 1)) - 1
        if k < 0:
            raise ValueError(f"vision_feature_layer={f} selects the embeddings, not a vision layer")
        return k

    @property
    def default_score_layer(self) -> int:
        """The vision layer whose attention scores visual tokens by default (the one feeding the projector)."""
        return self.feature_layer

    @property
    def vision_full_attention_layers(self) -> tuple[int, ...] | None:
        """The vision blocks with full attention when the tower also has windowed ones, else None."""
        return None

    @property
    def sends_cls(self) -> bool:
        """The [CLS] token reaches the language model (LLaVA's ``"full"`` feature strategy on a CLIP tower; a
        SigLIP tower has no [CLS], so ``"full"`` sends patch tokens only)."""
        strategy = getattr(self.config, "vision_feature_select_strategy", "default")
        return self.vision_has_cls and strategy == "full"

    @property
    def deepstack_layers(self) -> tuple[int, ...]:
        """Decoder layers whose output gets image features added (Qwen3-VL's DeepStack), else ()."""
        return ()

    # ---- static facts ----------------------------------------------------------------------------
    @functools.cached_property
    def info(self) -> ModelInfo:
        """The static facts methods see (:class:`~steer.edits.facts.ModelInfo`)."""
        config = self.config
        try:
            vision_layers = len(self.vision_layers)
        except AttributeError:  # pragma: no cover - every supported family has a tower
            vision_layers = 0
        try:
            score_layer = self.default_score_layer
        except (AttributeError, ValueError):
            score_layer = -1
        return ModelInfo(
            family=self.family,
            model_class=type(self.model).__name__,
            model_type=str(getattr(config, "model_type", "")),
            text_model_type=str(getattr(self.text_config, "model_type", "")),
            num_layers=self.num_layers,
            num_heads=self.num_heads,
            num_kv_heads=self.num_kv_heads,
            head_dim=self.head_dim,
            hidden_size=self.hidden_size,
            position_scheme=self.position_scheme,
            image_token_id=self.image_token_id,
            image_tokens_per_crop=self.tokens_per_crop,
            vision_layers=vision_layers,
            vision_full_attention_layers=self.vision_full_attention_layers,
            vision_score=self.vision_score,
            default_score_layer=score_layer,
            sends_cls=self.sends_cls,
            image_block_kinds=self.image_block_kinds,
            image_attention=self.image_attention,
            deepstack_layers=self.deepstack_layers,
        )

    def describe(self) -> dict[str, Any]:
        """A summary for error messages, `steer.methods()` and the CLI."""
        return self.info.describe()

    # ---- image tokens ----------------------------------------------------------------------------
    @property
    def image_token_id(self) -> int:
        return int(self.config.image_token_id)

    @property
    def image_related_token_ids(self) -> tuple[int, ...]:
        """Token ids that belong to an image in the prompt (placeholders and delimiters)."""
        return (self.image_token_id,)

    def image_token_mask(self, input_ids: torch.Tensor) -> torch.Tensor:
        """bool [B, T]: positions holding image tokens."""
        return input_ids == self.image_token_id

    def image_related_mask(self, input_ids: torch.Tensor) -> torch.Tensor:
        """bool [B, T]: the tokens that belong to an image in the prompt (placeholders and delimiters): the
        text-only variant drops them. Default: the ids of :attr:`image_related_token_ids`."""
        return torch.isin(input_ids, torch.tensor(self.image_related_token_ids, device=input_ids.device))

    @property
    def tokens_per_crop(self) -> int | None:
        """The token count of one image (or one crop) when it does not depend on the image, else None."""
        return None

    @property
    def tokens_per_image_fixed(self) -> int | None:
        """The token count of every image when it does not depend on the image (LLaVA-1.5)."""
        return None

    def images_from_inputs(self, inputs: dict[str, Any]) -> list[ImageInfo] | None:
        """(count, meta) of each image of the batch in prompt order, from the processor's outputs
        (``pixel_values``, ``image_sizes``, ``image_grid_thw``), when they make it knowable."""
        return None

    def images_from_features(self, features: Any, meta: Sequence[Any] | None) -> list[ImageInfo] | None:
        """(count, meta) of each image from encoded image features (what ``generate`` hands the model):
        ``features`` is a list of per-image [n, D] tensors or a [N, n, D] tensor; ``meta`` the per-image
        sizes / grids noted when they were encoded (None where unknown)."""
        if isinstance(features, (list, tuple)):
            metas = list(meta) if meta is not None else [None] * len(features)
            return [(int(f.shape[0]), m) for f, m in zip(features, metas)]
        if isinstance(features, torch.Tensor) and features.dim() == 3:
            return [(int(features.shape[1]), None)] * int(features.shape[0])
        return None

    def image_blocks(self, count: int, meta: Any) -> tuple[ImageBlock, ...]:
        """The raster grids of one image of ``count`` tokens, image-relative (the family's layout)."""
        return (ImageBlock(0, count, problem=f"{self.family} gives no grid for its image tokens"),)

    def image_layout(self, input_ids: torch.Tensor, images: list[ImageInfo] | None) -> ImageLayout:
        """Per row, each image's span and grids (one definition for every method).

        Spans are the runs of image tokens; a run that holds several adjacent images is split by the images'
        token counts (:attr:`tokens_per_image_fixed`, else ``images`` in batch order). A count that does not
        fit its run is recorded as a problem on that image's blocks (only methods that need the grids
        refuse it).
        """
        mask = self.image_token_mask(input_ids)
        fixed = self.tokens_per_image_fixed
        queue = list(images) if images else None
        rows: list[list[ImageSpan]] = []
        index = 0
        for row in mask.cpu():
            spans: list[ImageSpan] = []
            for start, end in runs(row):
                if fixed:
                    for p in range(start, end, fixed):
                        stop = min(p + fixed, end)
                        spans.append(self._span(p, stop, index, stop - p, None))
                        index += 1
                    continue
                if queue is None:
                    spans.append(self._span(start, end, index, end - start, None))
                    index += 1
                    continue
                pos = start
                while pos < end and queue:
                    n, meta = queue.pop(0)
                    stop = min(pos + n, end)
                    spans.append(self._span(pos, stop, index, n, meta))
                    index += 1
                    pos += n
                if pos < end:
                    spans.append(ImageSpan(pos, end, index, (ImageBlock(pos, end, problem=MISMATCH),)))
                    index += 1
            rows.append(spans)
        return ImageLayout(mask=mask, rows=rows)

    def _span(self, start: int, end: int, index: int, count: int, meta: Any) -> ImageSpan:
        if end - start != count:
            blocks: tuple[ImageBlock, ...] = (
                ImageBlock(start, end, problem=f"an image of {count} tokens does not fit the run of image tokens "
                                               f"[{start}, {end}) ({MISMATCH})"),
            )
        else:
            blocks = tuple(b.shifted(start) for b in self.image_blocks(count, meta))
        return ImageSpan(start, end, index, blocks)

    # ---- preprocessed pixels per image (auxiliary passes on distorted images) -----------------------
    def image_pixels(self, inputs: dict[str, Any]) -> list[torch.Tensor]:
        """Each image's preprocessed pixels as [S, C, H, W], in processor order, from the arguments of
        ``get_image_features`` (``pixel_values`` and the family's ``image_sizes`` / ``image_grid_thw``).
        LLaVA-1.5: ``pixel_values`` [N, C, H, W], S = 1 per image."""
        pixels = inputs["pixel_values"]
        return [pixels[i : i + 1] for i in range(pixels.shape[0])]

    def with_image_pixels(self, inputs: dict[str, Any], images: list[torch.Tensor]) -> torch.Tensor:
        """``pixel_values`` rebuilt from per-image tensors in the layout of :meth:`image_pixels` (the inverse)."""
        return torch.cat(images, dim=0).to(inputs["pixel_values"].dtype)

    # ---- text-only variant of a prompt (auxiliary passes) -----------------------------------------
    def text_only_inputs(
        self, prompt_ids: torch.Tensor, padding: torch.Tensor | None, length: int | None = None
    ) -> dict[str, Any]:
        """Language-model inputs of the prompt without its image: image placeholders (and delimiters) removed,
        every other token kept, rows re-padded on the left (to ``length`` when given), embedded, with the
        positions ``generate`` builds for a text-only prompt (:meth:`text_positions`).

        Returns ``inputs_embeds``, ``attention_mask`` and ``position_ids``.
        """
        padding = padding if padding is not None else torch.ones_like(prompt_ids, dtype=torch.bool)
        pad_id = getattr(self.text_config, "pad_token_id", None) or 0
        ids, mask = strip_tokens(
            prompt_ids, padding.to(prompt_ids.device), self.image_related_token_ids, length, pad_id,
            drop=self.image_related_mask(prompt_ids),
        )  # fmt: skip
        return {
            "inputs_embeds": self.embed_tokens(ids),
            "attention_mask": mask,
            "position_ids": self.text_positions(ids, mask),
        }

    def text_positions(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Positions of text-only rows: ``cumsum(mask) - 1`` (0 on padding), [B, L]."""
        return (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 0)

    def lm_attention_mask(self, mask: torch.Tensor, image_mask: torch.Tensor, embeds: torch.Tensor) -> Any:
        """The attention mask the language model takes for rows steer builds itself (auxiliary runs that stack
        the prompt's rows with other rows): ``mask`` [B, L] (1 = real token), ``image_mask`` bool [B, L] (the
        rows' image tokens). A plainly causal model takes the 2-D mask; a model whose mask treats image tokens
        specially (:attr:`image_attention`) builds its own."""
        return mask

    # ---- chat prompt -------------------------------------------------------------------------------
    def chat_prompt(self, question: str, n_images: int = 1) -> str:
        """The family's usual single-turn chat prompt with ``n_images`` image placeholders before the question."""
        raise NotImplementedError(f"{type(self).__name__} has no chat prompt")


def strip_tokens(
    input_ids: torch.Tensor,
    padding: torch.Tensor,
    drop_ids: tuple[int, ...],
    length: int | None = None,
    pad_id: int = 0,
    drop: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row, keep the real tokens that are not in ``drop_ids`` (or, when given, not flagged in ``drop``
    bool [B, T]), then re-pad on the left.

    Returns ``(ids, mask)`` [B, L'] with L' = the longest kept row (or ``length`` when given, >= that).
    Raises ``ValueError`` for a row with nothing left.
    """
    if drop is None:
        drop = torch.isin(input_ids, torch.tensor(drop_ids, device=input_ids.device))
    keep = padding.bool() & ~drop.to(input_ids.device).bool()
    counts = keep.sum(dim=1)
    kept = counts.tolist()  # the one host sync: the width of the new rows
    empty = [row for row, n in enumerate(kept) if n == 0]
    if empty:
        raise ValueError(
            f"prompt row(s) {empty} hold nothing but image tokens; the no-image branch needs the rest of the "
            "prompt (e.g. the question)"
        )
    width = max(kept) if length is None else length
    if width < max(kept):
        raise ValueError(f"length {width} is shorter than the longest no-image row ({max(kept)})")
    # kept token j of a row goes to column width - count + j; dropped tokens to a spare column cut off below
    dest = (width - counts)[:, None] + keep.long().cumsum(dim=1) - 1
    dest = torch.where(keep, dest, torch.full_like(dest, width))
    ids = input_ids.new_full((input_ids.shape[0], width + 1), pad_id).scatter_(1, dest, input_ids)[:, :width]
    columns = torch.arange(width, device=input_ids.device)
    mask = (columns[None, :] >= (width - counts)[:, None]).long()
    return ids, mask


__all__ = ["MISMATCH", "Adapter", "ImageInfo", "strip_tokens"]
