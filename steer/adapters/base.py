"""What steer needs to know about a model family, in one place.

An adapter answers: where the decoder layers, their attention modules, the final norm, ``lm_head`` and
the input embeddings are; how many heads and KV heads there are; which token ids are image tokens and
where each image's tokens sit in a prompt; where the vision tower, its layers, the layer that feeds the
projector and the projector are; and how position ids are built (1-D RoPE or Qwen's M-RoPE).
The decoder stack comes from the adapter, never from "the longest ModuleList" (that is Qwen's vision tower).
"""

from __future__ import annotations

from typing import Any, ClassVar, cast

import torch
from torch import nn


class Adapter:
    """Base class; one subclass per family. Construct with :func:`steer.adapters.adapter_for`."""

    family: ClassVar[str] = ""
    model_classes: ClassVar[tuple[str, ...]] = ()
    position_scheme: ClassVar[str] = "1d"  # "1d" or "mrope"

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    # ---- language model -------------------------------------------------------------------------
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

    # ---- images ---------------------------------------------------------------------------------
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

    def tokens_per_image(self, inputs: dict[str, Any]) -> list[int] | None:
        """Image-token count of each image of the batch in order, when the inputs make it knowable."""
        return None

    @property
    def tokens_per_image_fixed(self) -> int | None:
        """The token count of every image when it does not depend on the image (LLaVA-1.5)."""
        return None

    def image_spans(self, input_ids: torch.Tensor, inputs: dict[str, Any] | None = None) -> list[list[tuple[int, int]]]:
        """Per sample, the [start, end) span of each image's tokens, in prompt order.

        Spans are the runs of image tokens; a run that holds several adjacent images is split when the
        per-image token counts are known (:attr:`tokens_per_image_fixed`, or :meth:`tokens_per_image` from
        the inputs; `generate` passes encoded images instead of pixel inputs, so those may be absent).
        """
        mask = self.image_token_mask(input_ids).cpu()
        fixed = self.tokens_per_image_fixed
        counts = self.tokens_per_image(inputs or {})
        queue = list(counts) if counts else None
        spans: list[list[tuple[int, int]]] = []
        for row in mask:
            runs = _runs(row)
            row_spans: list[tuple[int, int]] = []
            for start, end in runs:
                if fixed:
                    row_spans.extend((p, min(p + fixed, end)) for p in range(start, end, fixed))
                    continue
                if queue is None:
                    row_spans.append((start, end))
                    continue
                pos = start
                while pos < end and queue:
                    n = queue.pop(0)
                    row_spans.append((pos, min(pos + n, end)))
                    pos += n
                if pos < end:
                    row_spans.append((pos, end))
            spans.append(row_spans)
        return spans

    # ---- vision side ----------------------------------------------------------------------------
    @property
    def vision_tower(self) -> nn.Module:
        return cast(Any, self.model).model.vision_tower

    @property
    def vision_layers(self) -> nn.ModuleList:
        tower = self.vision_tower
        encoder = getattr(tower, "encoder", None) or cast(Any, tower).vision_model.encoder
        return encoder.layers

    def vision_attention(self, layer: int) -> nn.Module:
        return cast(nn.Module, self.vision_layers[layer].self_attn)

    @property
    def projector(self) -> nn.Module:
        return cast(Any, self.model).model.multi_modal_projector

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

    def describe(self) -> dict[str, Any]:
        """A summary for error messages, `steer.methods()` and the CLI."""
        return {
            "family": self.family,
            "class": type(self.model).__name__,
            "layers": self.num_layers,
            "heads": self.num_heads,
            "kv_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "hidden_size": self.hidden_size,
            "positions": self.position_scheme,
        }


def _runs(row: torch.Tensor) -> list[tuple[int, int]]:
    """[start, end) of each run of True in a 1-D bool tensor."""
    if not bool(row.any()):
        return []
    padded = torch.cat([torch.tensor([False]), row, torch.tensor([False])]).int()
    diff = padded[1:] - padded[:-1]
    starts = (diff == 1).nonzero().flatten().tolist()
    ends = (diff == -1).nonzero().flatten().tolist()
    return list(zip(starts, ends))
