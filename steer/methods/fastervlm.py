"""FasterVLM: [CLS]-attention visual token pruning (Zhang et al., arXiv 2412.01818 v1). Spec: specs/fastervlm.md.

Rank an image's patch tokens by the attention the vision encoder's [CLS] token gives them, keep the top
ones and drop the rest before the LLM, which then runs unchanged on a shorter sequence (smaller KV cache).

* **score layer** (CLIP: LLaVA-1.5, LLaVA-NeXT): the layer whose output feeds the projector,
  ``k = (f mod (L_v + 1)) - 1`` for ``f = vision_feature_layer`` (its last entry if a list).
* **[CLS] row, recomputed** from that layer's attention input ``x`` [crops, 1+N, D] (already
  ``layer_norm1``-ed) in fp32, per head h::

      q0 = x_0 W_q^T + b_q,   K = x W_k^T + b_k,
      a_h = softmax_j(q0_h . K_h,j^T * d^-1/2)  over all 1+N keys,
      s_j = mean_h a_h[1 + j]                    (CLS column dropped, no renormalisation: sum_j s_j < 1)

  The tower keeps its fused attention (no ``output_attentions``); the row costs O(N).
* **budget**: ``T = round(N (1 - reduction))`` (round half to even) or ``num_tokens``; ``T < 1`` is an error.
* **selection**: ``kept = sort(topk(s, T))`` (raster order kept); image features = projector output at
  ``kept`` (the projector is token-wise, so ``proj(X)[kept] == proj(X[kept])``). No text conditioning.
* **sequence**: each image's run of placeholder tokens is shortened to its kept count and re-padded on
  the left. ``positions="contiguous"`` (official): ordinary positions of the shorter sequence;
  ``"original"``: every kept token and every text token keeps its stock position, i.e. position
  ``p' = p + gap`` where ``gap`` counts the pruned tokens before it (prefill) and ``gap = sum_i (N_i - T_i)``
  for every decoded token.
* **LLaVA-NeXT**, ``next_layout="stock"``: per crop its own [CLS] row; the base crop keeps its top T; tile c
  keeps ``K_c = min(T, valid_c)`` of its tokens that survive unpadding; packed as stock (base, then each
  unpadded row's kept tokens left to right and one newline), so the count per image is
  ``T + sum_c K_c + rows_unpadded``. ``"spatial"`` (official FasterVLM layout): no unpadding, no newlines,
  every crop keeps T, tiles in stitched-grid raster order: ``T (1 + nh nw)`` tokens.
* **Qwen2-VL / Qwen2.5-VL** (no [CLS]; the authors' VisPruner recipe, our wiring, unvalidated): mean
  received attention in the last (full-attention) vision block, per image chunk::

      g_j = mean_h mean_q softmax_k(q . k^T * d^-1/2)_{q j}

  computed in query chunks; the 4 patches of a merge unit are averaged (``N' = t (h/2) (w/2)``) and, on
  Qwen2.5-VL, un-permuted with ``argsort(window_index)``; ``T_i = round(N'_i (1 - reduction))`` per image.
  Positions are always original: ``get_rope_index`` runs on the unpruned sequence, the pruned columns
  are dropped and ``rope_deltas = max_pos + 1 - new_len`` per row.

Integration (HF 5): a wrapper around ``generate`` and a top-level forward pre-hook (direct forward calls
with ``pixel_values`` and an empty cache) run the vision tower once, shorten ``input_ids`` /
``attention_mask`` / ``mm_token_type_ids`` and hand the model the kept features as ``mm_encoder_outputs``
(in place of ``pixel_values``), before any of the model's own bookkeeping. ``generate`` returns the
caller's prompt (unpruned) followed by the new tokens, so ``out[:, input_ids.shape[1]:]`` still slices the
answer. Other methods see the pruned sequence (the per-forward context is captured from it); at a pruned
prefill FasterVLM leaves its record in ``forward.scratch["fastervlm"]`` (CCA rings the kept tokens by it).
``Steering.state["fastervlm"]["samples"]``: per sample, per image: ``kept`` indices, ``N``, ``T``, ``sent``
(tokens sent to the LLM), ``stock`` (tokens the unpruned model gets) and ``offsets`` (each sent token's index
in the image's stock run); on LLaVA-NeXT ``kept`` / ``T`` per crop under ``crops``.
"""

from __future__ import annotations

import inspect
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from steer.edits import Edit, EditContext, InputEdit, MethodWrap, ModuleHook
from steer.errors import InvalidParameterError, MissingImageTokensError, SteerError, UnsupportedModelError
from steer.registry import Method, param, register

if TYPE_CHECKING:
    from steer.adapters.families import Qwen2VLAdapter

__all__ = [
    "FasterVLM",
    "FasterVLMError",
    "budget",
    "cls_attention",
    "next_token_counts",
    "received_attention",
    "select_top",
]


#: Methods that need every image token of the stock grid (see FasterVLM._check_partners).
_GRID_METHODS = ("cca",)


class FasterVLMError(SteerError, ValueError):
    """The prompt's image placeholders do not match the images, or the inputs cannot be pruned."""


# --------------------------------------------------------------------------------------------------
# pure functions


def budget(n: int, reduction: float, num_tokens: int | None = None) -> int:
    """Tokens kept out of ``n``: ``num_tokens`` if given, else ``round(n (1 - reduction))`` (half to even).

    Raises :class:`InvalidParameterError` when the result is below 1 or ``num_tokens > n``.
    """
    if num_tokens is not None:
        if num_tokens > n:
            raise InvalidParameterError(
                f"fastervlm: num_tokens={num_tokens} is more than the {n} visual tokens of an image (crop); "
                f"use 1 <= num_tokens <= {n}"
            )
        t = int(num_tokens)
    else:
        t = round(round(n * (1.0 - reduction), 9))
    if t < 1:
        raise InvalidParameterError(
            f"fastervlm: reduction={reduction} keeps T = round({n} * (1 - {reduction})) = {t} of {n} visual "
            "tokens; T must be at least 1 (lower the reduction or pass num_tokens)"
        )
    return t


def cls_attention(x: Tensor, attn: nn.Module) -> Tensor:
    """The [CLS] row of a CLIP attention layer, recomputed from its input ``x`` [B, 1+N, D]; returns [B, N].

    ``s_j = mean_h softmax(q0_h K_h^T * d^-1/2)[1 + j]`` in fp32 (column 0, CLS -> CLS, dropped, not
    renormalised).
    """
    x = x.float()
    batch, length, _ = x.shape
    heads = int(cast(Any, attn).num_heads)
    head_dim = int(getattr(attn, "head_dim", x.shape[-1] // heads))
    scale = float(getattr(attn, "scale", head_dim**-0.5))
    q_proj, k_proj = cast(nn.Linear, attn.q_proj), cast(nn.Linear, attn.k_proj)
    q_bias = q_proj.bias.float() if q_proj.bias is not None else None
    k_bias = k_proj.bias.float() if k_proj.bias is not None else None
    q0 = F.linear(x[:, :1], q_proj.weight.float(), q_bias).view(batch, 1, heads, head_dim).transpose(1, 2)
    k = F.linear(x, k_proj.weight.float(), k_bias).view(batch, length, heads, head_dim).transpose(1, 2)
    probs = torch.softmax((q0 @ k.transpose(-1, -2)) * scale, dim=-1)  # [B, H, 1, 1+N]
    return probs[:, :, 0, 1:].mean(dim=1)


def received_attention(
    x: Tensor,
    attn: nn.Module,
    cu_seqlens: Tensor,
    position_embeddings: tuple[Tensor, Tensor],
    chunk: int = 1024,
) -> Tensor:
    """Mean attention each token receives in a Qwen vision block: ``g_j = mean_h mean_q softmax_k(q k^T d^-1/2)_qj``
    per image chunk ``[cu_i, cu_{i+1})``; ``x`` [S, D] is the block's ``norm1`` output; returns [S] (fp32).

    q and k are recomputed from ``attn.qkv`` with the block's vision RoPE; queries are processed ``chunk``
    rows at a time, so the n x n map never exists.
    """
    seq = x.shape[0]
    heads = int(cast(Any, attn).num_heads)
    proj = cast(nn.Linear, attn.qkv)
    bias = proj.bias.float() if proj.bias is not None else None
    qkv = F.linear(x.float(), proj.weight.float(), bias).reshape(seq, 3, heads, -1).permute(1, 0, 2, 3)
    q, k = qkv[0], qkv[1]
    rope = sys.modules[type(attn).__module__].apply_rotary_pos_emb_vision
    cos, sin = position_embeddings
    q, k = rope(q, k, cos.float(), sin.float())
    q, k = q.float(), k.float()
    scale = float(getattr(attn, "scaling", q.shape[-1] ** -0.5))
    out = torch.zeros(seq, dtype=torch.float32, device=x.device)
    bounds = [int(b) for b in cu_seqlens.tolist()]
    for start, end in zip(bounds[:-1], bounds[1:]):
        n = end - start
        if n <= 0:
            continue
        qc = q[start:end].transpose(0, 1)  # [H, n, d]
        kc = k[start:end].transpose(0, 1)
        total = torch.zeros(n, dtype=torch.float32, device=x.device)
        for row in range(0, n, chunk):
            probs = torch.softmax((qc[:, row : row + chunk] @ kc.transpose(-1, -2)) * scale, dim=-1)
            total += probs.sum(dim=(0, 1))
        out[start:end] = total / (heads * n)
    return out


def select_top(scores: Tensor, k: int, valid: Tensor | None = None) -> Tensor:
    """``sort(topk(scores, k).indices)``: the k best indices in increasing (raster) order; ``valid`` (bool)
    excludes tokens from the choice."""
    if valid is not None:
        scores = scores.masked_fill(~valid.to(scores.device), float("-inf"))
    return torch.sort(torch.topk(scores, k).indices).values


def _next_grid(
    image_size: Sequence[int], grid_pinpoints: Any, crop_size: int, patch_size: int
) -> tuple[int, int, int, Tensor]:
    """LLaVA-NeXT tiles of an image (H, W): ``(nh, nw, n, cells)``: the tile grid, the crop side in tokens
    and the stitched-grid cell ids (``r * nw * n + c``) that survive ``unpad_image``, [rows, cols]."""
    from transformers.models.llava_next.modeling_llava_next import get_anyres_image_grid_shape, unpad_image

    n = crop_size // patch_size
    size = [int(v) for v in image_size]
    nh, nw = (int(v) for v in get_anyres_image_grid_shape(size, grid_pinpoints, crop_size))
    cells = torch.arange(nh * n * nw * n).view(1, nh * n, nw * n)
    return nh, nw, n, unpad_image(cells, torch.tensor(size))[0]


def next_token_counts(
    image_size: Sequence[int],
    grid_pinpoints: Any,
    crop_size: int,
    patch_size: int,
    t: int,
    layout: str = "stock",
) -> tuple[int, int]:
    """(stock, pruned) LLaVA-NeXT token count of one image of ``image_size`` (H, W) with T = ``t`` per crop.

    stock: ``n^2 + rows (cols + 1)``; pruned ``stock`` layout: ``T + sum_c min(T, valid_c) + rows``;
    ``spatial``: ``T (1 + nh nw)``. Functions of the image size only.
    """
    nh, nw, n, cells = _next_grid(image_size, grid_pinpoints, crop_size, patch_size)
    rows, cols = cells.shape
    stock = n * n + rows * (cols + 1)
    if layout == "spatial":
        return stock, t * (1 + nh * nw)
    width = nw * n
    flat = cells.flatten()
    tile = (flat // width // n) * nw + (flat % width) // n
    valid = torch.bincount(tile, minlength=nh * nw)
    return stock, t + int(valid.clamp(max=t).sum()) + rows


def _runs(row: Tensor) -> list[tuple[int, int]]:
    """[start, end) of each run of True in a 1-D bool tensor."""
    flags = row.to("cpu", torch.bool)
    if not bool(flags.any()):
        return []
    padded = torch.cat([torch.tensor([False]), flags, torch.tensor([False])]).int()
    diff = padded[1:] - padded[:-1]
    starts = (diff == 1).nonzero().flatten().tolist()
    ends = (diff == -1).nonzero().flatten().tolist()
    return list(zip(starts, ends))


# --------------------------------------------------------------------------------------------------
# per-call bookkeeping


@dataclass
class _Plan:
    """How one call's prompt was shortened (rows of the un-expanded batch)."""

    ids: Tensor  # the shortened input_ids [B, L']
    origin: Tensor  # [B, L'] column of each kept token in the caller's row (-1: new padding)
    orig_ids: Tensor
    orig_mask: Tensor | None
    orig_types: Tensor | None
    gap_cumsum: Tensor  # [B, L'] pruned tokens before each column (mask-cumsum positions)
    gap_arange: Tensor  # [B, L'] the same for plain arange positions
    total_cumsum: Tensor  # [B] pruned tokens per row
    total_arange: Tensor  # [B] L - L'
    fresh: bool = True
    extra: dict[str, Any] = field(default_factory=dict)


@register
class FasterVLM(Method):
    """[CLS]-attention visual token pruning as core edits (equations in the module docstring).

    Edits: a :class:`~steer.edits.MethodWrap` of ``generate`` and a prepended top-level
    :class:`~steer.edits.ModuleHook` pre-hook (shorten the prompt, encode the images once, pass
    ``mm_encoder_outputs``); a pre-hook on the scoring vision attention module (the [CLS] row / received
    attention, only while FasterVLM encodes); LLaVA-NeXT: a wrap of ``pack_image_features``; Qwen: a
    wrap of ``get_rope_index`` (original M-RoPE ids); LLaVA ``positions="original"``: an
    :class:`~steer.edits.InputEdit` adding the per-row gap to ``position_ids``.
    """

    name = "fastervlm"
    description = (
        "FasterVLM: keep the visual tokens the vision [CLS] token attends to most (top-k, raster order) and "
        "drop the rest before the LLM (Qwen: mean received attention)."
    )
    stage = "vision"
    needs_image_tokens = False

    @dataclass
    class Params:
        reduction: float = param(
            0.75, help="fraction of visual tokens dropped per image (per crop on LLaVA-NeXT)", range=(0.0, 1.0)
        )
        num_tokens: int | None = param(
            None, help="keep exactly this many tokens per image (crop); overrides reduction", range=(1, None)
        )
        positions: Literal["contiguous", "original"] = param(
            "contiguous",
            help="positions of the shorter sequence (official) or the stock ones (Qwen: always original)",
            choices=("contiguous", "original"),
        )
        next_layout: Literal["stock", "spatial"] = param(
            "stock",
            help="LLaVA-NeXT packing: stock unpad + newlines, or the official FasterVLM spatial layout",
            choices=("stock", "spatial"),
        )
        score_layer: int | None = param(
            None, help="vision layer (block) whose attention scores the tokens; None = the spec's choice"
        )

    def __init__(self, params: Any, adapter: Any, state: dict[str, Any]) -> None:
        super().__init__(params, adapter, state)
        self._armed: dict[str, Any] | None = None
        self._plan: _Plan | None = None

    # ---- configuration --------------------------------------------------------------------------
    @property
    def is_qwen(self) -> bool:
        return self.adapter.position_scheme == "mrope"

    @property
    def is_next(self) -> bool:
        return self.adapter.family == "llava-next"

    def _default_score_layer(self) -> int:
        if not self.is_qwen:
            return self.adapter.feature_layer
        full = getattr(self.adapter.config.vision_config, "fullatt_block_indexes", None)
        if self.adapter.family == "qwen2.5-vl" and full:
            return int(max(full))
        return len(self.adapter.vision_layers) - 1

    @property
    def score_layer(self) -> int:
        layer = self.params.score_layer
        n = len(self.adapter.vision_layers)
        if layer is None:
            return self._default_score_layer()
        return layer + n if layer < 0 else layer

    @property
    def crop_tokens(self) -> int | None:
        """N per image (LLaVA-1.5) or per crop (LLaVA-NeXT); None on Qwen (depends on the image)."""
        if self.is_qwen:
            return None
        vision = self.adapter.config.vision_config
        return (int(vision.image_size) // int(vision.patch_size)) ** 2

    def check(self) -> None:
        p = self.params
        base_forward = cast(Any, self.adapter.model).model.forward
        if "mm_encoder_outputs" not in inspect.signature(base_forward).parameters:
            import transformers

            raise UnsupportedModelError(
                f"fastervlm hands the kept image features to the model as `mm_encoder_outputs`, which "
                f"{type(self.adapter.model.model).__name__}.forward does not take in transformers "
                f"{transformers.__version__}; it does from 5.18 on: pip install -U 'transformers>=5.18'"
            )
        if not 0.0 <= p.reduction < 1.0:
            raise InvalidParameterError(f"fastervlm: reduction={p.reduction} must be in [0, 1)")
        n_layers = len(self.adapter.vision_layers)
        if p.score_layer is not None and not -n_layers <= p.score_layer < n_layers:
            raise InvalidParameterError(
                f"fastervlm: score_layer={p.score_layer} does not exist; the vision tower has {n_layers} layers "
                f"(valid: 0..{n_layers - 1}, or negative from the end)"
            )
        if self.adapter.family == "qwen2.5-vl" and p.score_layer is not None:
            full = list(getattr(self.adapter.config.vision_config, "fullatt_block_indexes", []) or [])
            if self.score_layer not in full:
                raise InvalidParameterError(
                    f"fastervlm: score_layer={p.score_layer} is a window-attention block; on Qwen2.5-VL use a "
                    f"full-attention block ({full})"
                )
        if not self.is_qwen:
            strategy = getattr(self.adapter.config, "vision_feature_select_strategy", "default")
            if strategy != "default":
                raise InvalidParameterError(
                    f"fastervlm: vision_feature_select_strategy={strategy!r} sends the [CLS] token to the LLM; "
                    "FasterVLM supports 'default' (CLS dropped) only"
                )
            if not self.is_noop():
                budget(self.crop_tokens or 0, p.reduction, p.num_tokens)
            if self.is_next and p.next_layout == "spatial" and p.positions == "original":
                raise InvalidParameterError(
                    "fastervlm: positions='original' needs the kept tokens to be a subset of the stock sequence; "
                    "next_layout='spatial' is not (no unpadding, no newlines): use next_layout='stock' or "
                    "positions='contiguous'"
                )

    def is_noop(self) -> bool:
        return self.params.reduction == 0.0 and self.params.num_tokens is None

    def edits(self) -> list[Edit]:
        p = self.params
        k = self.score_layer
        self.state.clear()
        self.state.update(
            reduction=p.reduction,
            num_tokens=p.num_tokens,
            positions="original" if self.is_qwen else p.positions,
            next_layout=p.next_layout if self.is_next else None,
            score_layer=k,
            samples=[],
        )
        out: list[Edit] = [
            MethodWrap(module=lambda a: a.model, name="generate", fn=self._generate),
            ModuleHook(module=lambda a: a.model, fn=self._before_forward, pre=True, prepend=True),
            ModuleHook(module=lambda a: a.model, fn=self._publish, pre=True),
            ModuleHook(
                module=lambda a: a.vision_attention(k),
                fn=self._score_qwen if self.is_qwen else self._score_clip,
                pre=True,
            ),
        ]
        if self.is_next:
            out.append(
                MethodWrap(
                    module=lambda a: cast(nn.Module, a.model.model),
                    name="pack_image_features",
                    fn=self._pack_next,
                )
            )
        if self.is_qwen:
            out.append(
                MethodWrap(
                    module=lambda a: cast("Qwen2VLAdapter", a).rope_index_owner,
                    name="get_rope_index",
                    fn=self._rope_index,
                )
            )
        elif p.positions == "original":
            out.append(InputEdit(fn=self._positions))
        return out

    # ---- entry points ---------------------------------------------------------------------------
    def _generate(self, original: Any, args: tuple, kwargs: dict, ectx: EditContext) -> Any:
        """Wrap ``generate``: prune before HF's bookkeeping; return the caller's prompt + new tokens."""
        kwargs = dict(kwargs)
        if args and isinstance(args[0], Tensor) and "input_ids" not in kwargs:
            kwargs["input_ids"], args = args[0], args[1:]
        if kwargs.get("pixel_values") is None:
            self._plan = None
            return original(*args, **kwargs)
        self._check_partners(ectx)
        with torch.no_grad():
            new = self._prepare(kwargs)
        plan = self._plan
        try:
            out = original(*args, **new)
        finally:
            if plan is not None:
                plan.fresh = False  # a later prefill without images must not reuse this plan
        if plan is None:
            return out
        seqs = out if isinstance(out, Tensor) else getattr(out, "sequences", None)
        if not isinstance(seqs, Tensor):
            return out
        prompt = plan.orig_ids.to(seqs.device)
        prompt = prompt.repeat_interleave(seqs.shape[0] // prompt.shape[0], dim=0)
        full = torch.cat([prompt.to(seqs.dtype), seqs[:, plan.ids.shape[1] :]], dim=1)
        if isinstance(out, Tensor):
            return full
        out.sequences = full
        return out

    def _before_forward(self, module: nn.Module, args: tuple, kwargs: dict, ectx: EditContext) -> Any:
        """Top-level pre-hook (runs before the context capture): prune a direct forward call's prompt."""
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        past = int(cache.get_seq_length()) if cache is not None and hasattr(cache, "get_seq_length") else 0
        if past > 0:
            return None
        if kwargs.get("pixel_values") is not None:
            kwargs = dict(kwargs)
            if args and isinstance(args[0], Tensor) and "input_ids" not in kwargs:
                kwargs["input_ids"], args = args[0], args[1:]
            self._check_partners(ectx)
            new = self._prepare(kwargs)
            if self._plan is not None:
                self._plan.fresh = False
            return args, new
        if self._plan is not None and self._plan.fresh:  # the prefill of a pruned generate call
            self._plan.fresh = False
        else:
            self._plan = None
        return None

    def _publish(self, module: nn.Module, args: tuple, kwargs: dict, ectx: EditContext) -> None:
        """Top-level pre-hook after the context capture: at a pruned prefill, leave the call's record in
        ``ectx.forward.scratch["fastervlm"]`` for methods that lay out the kept tokens (CCA): ``samples`` (per
        row of the un-expanded batch, as in the state), ``origin`` [B, L'], ``positions``, ``next_layout`` and
        ``gap`` [B, L'] (what :meth:`_positions` adds to given position ids at prefill; None unless it runs)."""
        plan = self._plan
        if ectx.phase != "prefill" or plan is None:
            return None
        original = not self.is_qwen and self.params.positions == "original"
        ectx.forward.scratch["fastervlm"] = {
            "samples": plan.extra["samples"],
            "origin": plan.origin,
            "positions": "original" if self.is_qwen else self.params.positions,
            "next_layout": self.params.next_layout if self.is_next else None,
            "gap": plan.gap_cumsum if original else None,
        }
        return None

    def _check_partners(self, ectx: EditContext) -> None:
        """Refuse methods that lay out image tokens as a full grid unless they declare pruning support.

        A grid method that derived each image's grid from its token count would be wrong on a pruned
        prompt. A method class that lays out the kept tokens from FasterVLM's per-call record
        (``forward.scratch["fastervlm"]``, see :meth:`_publish`) sets ``handles_pruned_tokens = True``
        (CCA does)."""
        from steer.registry import registered

        classes = registered()
        for handle in getattr(ectx.runtime, "handles", []):
            for name in handle.methods:
                if name in _GRID_METHODS and not getattr(classes.get(name), "handles_pruned_tokens", False):
                    raise FasterVLMError(
                        f"fastervlm cannot run together with {name} yet: {name} lays out each image's tokens as "
                        "its full grid, which pruning removes. Apply them separately."
                    )

    # ---- the pruning ----------------------------------------------------------------------------
    def _encoder_kwargs(self, kwargs: dict[str, Any]) -> dict[str, Any]:
        fn = cast(Any, self.adapter.model).model.get_image_features
        names = [n for n in inspect.signature(fn).parameters if n not in ("kwargs", "pixel_values")]
        return {n: kwargs[n] for n in names if kwargs.get(n) is not None}

    def _prepare(self, kwargs: dict[str, Any]) -> dict[str, Any]:
        """Encode the images with scoring on, keep the top tokens, shorten the prompt; returns new kwargs."""
        ids = kwargs.get("input_ids")
        if ids is None:
            raise MissingImageTokensError(
                "fastervlm shortens each image's run of placeholder tokens, but the model was called with "
                "pixel_values and inputs_embeds only. Call it (or generate) with input_ids from the processor."
            )
        if kwargs.get("position_ids") is not None:
            raise FasterVLMError(
                "fastervlm: position_ids were passed with pixel_values; the prompt gets shorter, so let the model "
                "build positions (use positions='original' to keep the stock ones)"
            )
        encoder = self._encoder_kwargs(kwargs)
        self._armed = {"scores": [], "next": [], "grid": encoder.get("image_grid_thw")}
        try:
            out = cast(Any, self.adapter.model).model.get_image_features(
                pixel_values=kwargs["pixel_values"], **encoder, return_dict=True
            )
            images = self._select(out)
        finally:
            self._armed = None
        self._plan = self._shorten(kwargs, images)
        new = dict(kwargs)
        new.pop("pixel_values")
        plan = self._plan
        new["input_ids"] = plan.ids
        if plan.extra.get("mask") is not None:
            new["attention_mask"] = plan.extra["mask"]
        if plan.extra.get("types") is not None:
            new["mm_token_type_ids"] = plan.extra["types"]
        encoded = dict(new.get("mm_encoder_outputs") or {})
        encoded["image"] = out
        new["mm_encoder_outputs"] = encoded
        return new

    def _select(self, out: Any) -> list[dict[str, Any]]:
        """Keep the top tokens of every image in ``out.pooler_output`` (in place); per-image records."""
        armed = self._armed
        assert armed is not None
        if self.is_next:
            records = armed["next"]
            if not records:
                raise FasterVLMError("fastervlm: LLaVA-NeXT features were not packed through pack_image_features")
            return records
        if not armed["scores"]:
            raise FasterVLMError(
                f"fastervlm: the scoring layer {self.score_layer} of the vision tower did not run while encoding"
            )
        features = list(out.pooler_output)
        scores = armed["scores"][-1]
        if not self.is_qwen:
            scores = list(scores)
        else:
            scores = list(torch.split(scores, [int(f.shape[0]) for f in features]))
        p = self.params
        kept_features, records = [], []
        for i, (feature, score) in enumerate(zip(features, scores)):
            n = int(feature.shape[0])
            if score.numel() != n:
                raise FasterVLMError(f"fastervlm: image {i} has {n} features but {score.numel()} scores")
            t = budget(n, p.reduction, p.num_tokens)
            kept = select_top(score, t)
            kept_features.append(feature[kept.to(feature.device)])
            record: dict[str, Any] = {"kept": kept.cpu(), "N": n, "T": t, "sent": t, "stock": n, "offsets": kept.cpu()}
            if self.is_qwen:
                record["grid"] = tuple(int(v) for v in armed["grid"][i].tolist())
            records.append(record)
        out.pooler_output = kept_features
        return records

    # ---- scoring hooks --------------------------------------------------------------------------
    def _score_clip(self, module: nn.Module, args: tuple, kwargs: dict, ectx: EditContext) -> None:
        if self._armed is None:
            return None
        x = args[0] if args else kwargs["hidden_states"]
        self._armed["scores"].append(cls_attention(x.detach(), module))
        return None

    def _score_qwen(self, module: nn.Module, args: tuple, kwargs: dict, ectx: EditContext) -> None:
        if self._armed is None:
            return None
        x = args[0] if args else kwargs["hidden_states"]
        cu = kwargs.get("cu_seqlens", args[1] if len(args) > 1 else None)
        rope = kwargs.get("position_embeddings", args[2] if len(args) > 2 else None)
        assert cu is not None and rope is not None  # a Qwen vision block passes both to its attention
        patch = received_attention(x.detach(), module, cu, rope)
        vision = self.adapter.config.vision_config
        unit = int(vision.spatial_merge_size) ** 2
        merged = patch.view(-1, unit).mean(dim=-1)
        if self.adapter.family == "qwen2.5-vl":
            merged = merged[torch.argsort(self._window_index(self._armed["grid"]).to(merged.device))]
        self._armed["scores"].append(merged)
        return None

    def _window_index(self, grid: Tensor) -> Tensor:
        """Qwen2.5-VL's merge-unit window permutation for ``image_grid_thw``, from the model's own function."""
        visual = cast(Any, self.adapter.vision_tower)
        own = getattr(visual, "get_window_index", None)
        if own is not None:
            return own(grid)[0]
        from transformers.vision_utils import get_vision_window_index

        return get_vision_window_index(
            grid,
            spatial_merge_size=int(visual.spatial_merge_size),
            window_size=int(visual.window_size),
            patch_size=int(visual.patch_size),
        )[0]

    # ---- LLaVA-NeXT packing ---------------------------------------------------------------------
    def _pack_next(self, original: Any, args: tuple, kwargs: dict, ectx: EditContext) -> Any:
        """Wrap ``pack_image_features``: per crop top-T by its own [CLS] row, packed per ``next_layout``."""
        if self._armed is None:
            return original(*args, **kwargs)
        bound = inspect.signature(original).bind(*args, **kwargs).arguments
        features = list(bound["image_features"])
        sizes = bound["image_sizes"]
        newline = bound.get("image_newline")
        if not self._armed["scores"]:
            raise FasterVLMError(f"fastervlm: the scoring layer {self.score_layer} did not run while encoding")
        scores = torch.split(self._armed["scores"][-1], [int(f.shape[0]) for f in features])
        packed = []
        for feature, score, size in zip(features, scores, sizes):
            tokens, record = self._pack_one(feature, score, [int(v) for v in size.tolist()], newline)
            packed.append(tokens)
            self._armed["next"].append(record)
        lens = torch.tensor([int(t.shape[0]) for t in packed], dtype=torch.long, device=packed[0].device)
        return packed, lens

    def _pack_one(
        self, feature: Tensor, score: Tensor, size: list[int], newline: Tensor | None
    ) -> tuple[Tensor, dict[str, Any]]:
        """One image: ``feature`` [crops, N, D] (projected), ``score`` [crops, N]; returns (tokens, record)."""
        p = self.params
        config = self.adapter.config
        crops, n_tok, dim = feature.shape
        t = budget(n_tok, p.reduction, p.num_tokens)
        spatial = p.next_layout == "spatial"
        base = select_top(score[0], t)
        crop_records = [{"kept": base.cpu(), "N": n_tok, "T": t}]
        parts = [feature[0, base.to(feature.device)]]
        nl = newline.to(feature.device, feature.dtype)[None] if newline is not None else None
        record: dict[str, Any] = {"N": n_tok, "T": t, "image_size": tuple(size), "crops": crop_records}
        offsets = [base.cpu()]
        if crops == 1:
            if nl is not None and not spatial:
                parts.append(nl)
                offsets.append(torch.tensor([n_tok]))
            record["stock"] = n_tok + (1 if nl is not None else 0)
        else:
            vision = config.vision_config
            nh, nw, n, cells = _next_grid(size, config.image_grid_pinpoints, int(vision.image_size), int(vision.patch_size))
            if crops - 1 != nh * nw or n * n != n_tok:
                raise FasterVLMError(
                    f"fastervlm: a LLaVA-NeXT image of size {size} has {crops - 1} tiles of {n_tok} tokens, "
                    f"expected {nh} x {nw} tiles of {n * n}"
                )
            height, width = nh * n, nw * n
            grid = torch.arange(height * width).view(height, width)
            kept_cells = grid if spatial else cells
            valid = torch.zeros(height * width, dtype=torch.bool)
            valid[kept_cells.flatten()] = True
            rows = torch.arange(height)[:, None].expand(height, width)
            cols = torch.arange(width)[None, :].expand(height, width)
            tile_of = ((rows // n) * nw + cols // n).flatten()
            local_of = ((rows % n) * n + cols % n).flatten()
            selected = torch.zeros(height * width, dtype=torch.bool)
            for c in range(nh * nw):
                cell_ids = (tile_of == c).nonzero().flatten()
                order = torch.argsort(local_of[cell_ids])
                cell_ids = cell_ids[order]  # tile-local raster order
                valid_c = valid[cell_ids]
                k_c = min(t, int(valid_c.sum()))
                local = select_top(score[c + 1].cpu(), k_c, valid_c) if k_c > 0 else torch.zeros(0, dtype=torch.long)
                selected[cell_ids[local]] = True
                crop_records.append({"kept": local, "N": n_tok, "T": k_c, "valid": int(valid_c.sum())})
            table = feature[1:].reshape(nh, nw, n, n, dim).permute(0, 2, 1, 3, 4).reshape(height * width, dim)
            if nl is not None and not spatial:
                table = torch.cat([table, nl], dim=0)
            r, w = cells.shape  # the stock (unpadded) grid, whatever the layout
            stride = int(w) + (1 if nl is not None else 0)
            order_ids: list[int] = []
            if spatial:
                order_ids = grid.flatten()[selected].tolist()
            else:
                for i, row in enumerate(cells):
                    chosen = selected[row]
                    order_ids.extend(row[chosen].tolist())
                    offsets.append(n_tok + i * stride + chosen.nonzero().flatten())
                    if nl is not None:
                        order_ids.append(height * width)
                        offsets.append(torch.tensor([n_tok + i * stride + int(w)]))
            parts.append(table[torch.tensor(order_ids, dtype=torch.long, device=table.device)])
            record.update(grid=(nh, nw), unpadded=(int(r), int(w)))
            record["stock"] = n_tok + int(r) * (int(w) + (1 if nl is not None else 0))
        tokens = torch.cat(parts, dim=0)
        record["sent"] = int(tokens.shape[0])
        # each sent token's index in the image's stock token run (spatial: not a subset of it)
        record["offsets"] = torch.arange(record["sent"]) if spatial else torch.cat(offsets).long()
        return tokens, record

    # ---- the shorter prompt ---------------------------------------------------------------------
    def _shorten(self, kwargs: dict[str, Any], images: list[dict[str, Any]]) -> _Plan:
        """Replace each image's run of ``stock`` placeholders by its ``sent`` tokens and re-pad on the left.

        A sent token stands for the stock column ``start + offset`` (its ``offsets`` entry), which is what
        the original positions (1-D gap, M-RoPE gather) are computed from.
        """
        ids: Tensor = kwargs["input_ids"]
        mask = kwargs.get("attention_mask")
        mask = mask if isinstance(mask, Tensor) and mask.dim() == 2 else None
        types = kwargs.get("mm_token_type_ids") if self.is_qwen else None
        batch, length = ids.shape
        flags = self.adapter.image_token_mask(ids).cpu()
        if mask is not None:
            flags &= mask.cpu().bool()
        queue = list(range(len(images)))
        samples: list[list[dict[str, Any]]] = []
        sources: list[Tensor] = []  # per row: the caller's column each new token copies (id, mask, type)
        origins: list[Tensor] = []  # per row: the caller's column each new token stands for (positions)
        for b in range(batch):
            row_images, src, orig, cursor = [], [], [], 0
            for start, end in _runs(flags[b]):
                pos = start
                while pos < end:
                    if not queue:
                        raise FasterVLMError(
                            f"fastervlm: row {b} holds more image placeholder tokens than the images passed describe "
                            "(placeholders and images do not match)"
                        )
                    i = queue.pop(0)
                    stock, offsets = images[i]["stock"], images[i]["offsets"]
                    if pos + stock > end:
                        raise FasterVLMError(
                            f"fastervlm: image {i} needs {stock} placeholder tokens but row {b} has a run of "
                            f"{end - start} at [{start}, {end}) (placeholders and images do not match)"
                        )
                    src += [torch.arange(cursor, pos), pos + offsets.clamp(max=stock - 1)]
                    orig += [torch.arange(cursor, pos), pos + offsets]
                    row_images.append(images[i])
                    pos += stock
                    cursor = pos
            src.append(torch.arange(cursor, length))
            orig.append(torch.arange(cursor, length))
            sources.append(torch.cat(src).long())
            origins.append(torch.cat(orig).long())
            samples.append(row_images)
        if queue:
            raise FasterVLMError(
                f"fastervlm: {len(queue)} image(s) have no placeholder tokens in the prompt "
                "(placeholders and images do not match)"
            )
        kept = torch.tensor([c.numel() for c in sources])
        width = int(kept.max())
        device = ids.device
        pad_id = getattr(self.adapter.model.generation_config, "pad_token_id", None)
        if pad_id is None:
            pad_id = getattr(self.adapter.text_config, "pad_token_id", None) or 0
        if isinstance(pad_id, (list, tuple)):
            pad_id = pad_id[0]
        new_ids = torch.full((batch, width), int(pad_id), dtype=ids.dtype, device=device)
        base_mask = mask if mask is not None else torch.ones_like(ids)
        new_mask = torch.zeros(batch, width, dtype=base_mask.dtype, device=device)
        new_types = torch.zeros(batch, width, dtype=types.dtype, device=device) if types is not None else None
        origin = torch.full((batch, width), -1, dtype=torch.long)
        for b in range(batch):
            offset = width - sources[b].numel()
            origin[b, offset:] = origins[b]
            cols = sources[b].to(device)
            new_ids[b, offset:] = ids[b, cols]
            new_mask[b, offset:] = base_mask[b, cols]
            if new_types is not None:
                assert types is not None  # new_types exists only when types does
                new_types[b, offset:] = types[b, cols.to(types.device)]
        pos0 = (base_mask.long().cumsum(-1) - 1).clamp(min=0).cpu()
        pos1 = (new_mask.long().cumsum(-1) - 1).clamp(min=0).cpu()
        real = (origin >= 0) & new_mask.cpu().bool()
        safe = origin.clamp(min=0, max=length - 1)
        gap_cumsum = torch.where(real, pos0.gather(1, safe) - pos1, torch.zeros_like(pos1))
        gap_arange = torch.where(origin >= 0, origin - torch.arange(width)[None], torch.zeros_like(origin))
        self.state["samples"] = samples
        plan = _Plan(
            ids=new_ids,
            origin=origin,
            orig_ids=ids,
            orig_mask=mask,
            orig_types=types,
            gap_cumsum=gap_cumsum,
            gap_arange=gap_arange,
            total_cumsum=base_mask.long().sum(dim=1).cpu() - new_mask.long().sum(dim=1).cpu(),
            total_arange=torch.full((batch,), length - width, dtype=torch.long),
        )
        if mask is not None or bool((kept != width).any()):
            plan.extra["mask"] = new_mask
        plan.extra["types"] = new_types
        plan.extra["samples"] = samples
        return plan

    # ---- positions ------------------------------------------------------------------------------
    def _positions(self, kwargs: dict[str, Any], ectx: EditContext) -> dict[str, Any] | None:
        """``positions="original"`` (1-D RoPE): ``p' = p + gap`` at prefill, ``p + sum_i (N_i - T_i)`` at decode."""
        plan = self._plan
        if plan is None:
            return None
        ref = kwargs.get("inputs_embeds")
        if ref is None:
            ref = kwargs.get("input_ids")
        if ref is None:
            return None
        batch, length = ref.shape[0], ref.shape[1]
        if batch % plan.ids.shape[0]:
            return None
        repeat = batch // plan.ids.shape[0]
        pos = kwargs.get("position_ids")
        if ectx.phase == "prefill":
            if length != plan.ids.shape[1]:
                raise FasterVLMError(
                    "fastervlm positions='original' needs the whole prompt in one prefill call (chunked prefill)"
                )
            gap = plan.gap_arange if pos is None else plan.gap_cumsum
            base = torch.arange(length, device=ref.device)[None].expand(batch, length) if pos is None else pos
            shift = gap.to(ref.device).repeat_interleave(repeat, dim=0)
        else:
            past = ectx.forward.past_length
            if pos is None:
                base = torch.arange(past, past + length, device=ref.device)[None].expand(batch, length)
                total = plan.total_arange
            else:
                base, total = pos, plan.total_cumsum
            shift = total.to(ref.device).repeat_interleave(repeat, dim=0)[:, None]
        kwargs["position_ids"] = base + shift.to(base.dtype)
        return kwargs

    def _rope_index(self, original: Any, args: tuple, kwargs: dict, ectx: EditContext) -> Any:
        """Wrap ``get_rope_index``: stock ids of the unpruned prompt, pruned columns dropped,
        ``rope_deltas = max_pos + 1 - new_len`` per row."""
        plan = self._plan
        bound = inspect.signature(original).bind_partial(*args, **kwargs).arguments
        ids = bound.get("input_ids")
        if (
            plan is None
            or not isinstance(ids, Tensor)
            or ids.shape != plan.ids.shape
            or not torch.equal(ids, plan.ids.to(ids.device))
        ):
            return original(*args, **kwargs)
        call = dict(bound)
        call.update(call.pop("kwargs", {}) or {})
        call.update(input_ids=plan.orig_ids, mm_token_type_ids=plan.orig_types, attention_mask=plan.orig_mask)
        position_ids, deltas = original(**call)
        origin = plan.origin.to(position_ids.device)
        gathered = position_ids.gather(2, origin.clamp(min=0, max=position_ids.shape[2] - 1)[None].expand(position_ids.shape[0], -1, -1))
        mask = bound.get("attention_mask")
        real = (origin >= 0) & (mask.bool().to(origin.device) if isinstance(mask, Tensor) else True)
        gathered = torch.where(real[None], gathered, torch.zeros_like(gathered))
        top = torch.where(real[None], gathered, torch.full_like(gathered, -1)).amax(dim=(0, 2))
        new_deltas = (top + 1 - real.sum(dim=1)).view(-1, 1).to(deltas.dtype)
        return gathered, new_deltas
