"""steer's one attention function, registered with transformers' `AttentionInterface` as ``"steer"``.

Every text attention module of a steered model calls it (the model's text sub-config has
``_attn_implementation == "steer"`` while attention edits are installed). For a module without an
active edit it calls the model's *original* backend (sdpa, eager, flash_attention_2, flex_attention)
unchanged, so unedited layers keep their fused kernels and give bit-identical results. For an edited
layer it runs, in order: mask edits, the group reweighting (LSE merge, `steer.kernels`), per-head output
edits and collects (``layer.attn.head_out``), each only in the runs it lists.

A mask function is registered under the same name with `AttentionMaskInterface` (otherwise transformers
silently drops causal and padding masks); it builds the mask the original backend expects.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from steer.backends.transformers.collected import select, store
from steer.edits.context import EditContext
from steer.edits.kinds import (
    AttentionMask,
    Collect,
    GroupReweight,
    HeadOutputEdit,
    HeadScale,
    ScoreEdit,
    evaluate,
)
from steer.errors import MissingImageTokensError
from steer.kernels import lse

if TYPE_CHECKING:
    from steer.backends.transformers.runtime import Runtime

IMPLEMENTATION = "steer"

# id(text config) -> the backend it had before steer switched it. Configs are not hashable.
_ORIGINAL_BACKEND: dict[int, str] = {}


class LayerTag:
    """Attached to an attention module while edits are installed: which runtime, which decoder layer."""

    __slots__ = ("runtime", "layer")

    def __init__(self, runtime: Runtime, layer: int) -> None:
        self.runtime = runtime
        self.layer = layer


def set_original_backend(config: Any, name: str) -> None:
    _ORIGINAL_BACKEND[id(config)] = name


def forget_original_backend(config: Any) -> None:
    _ORIGINAL_BACKEND.pop(id(config), None)


def original_backend(config: Any) -> str:
    return _ORIGINAL_BACKEND.get(id(config), "sdpa")


def backend_function(name: str, module: torch.nn.Module) -> Callable[..., tuple[torch.Tensor, Any]]:
    """The attention function a backend name stands for; ``eager`` is the module's own modeling-file function."""
    if name != "eager" and name in ALL_ATTENTION_FUNCTIONS:
        return ALL_ATTENTION_FUNCTIONS[name]
    modeling = sys.modules[type(module).__module__]
    eager = getattr(modeling, "eager_attention_forward", None)
    if eager is None:  # pragma: no cover - every supported family has one
        raise RuntimeError(f"{type(module).__name__}: no eager_attention_forward in {modeling.__name__}")
    return eager


def steer_mask(*args: Any, **kwargs: Any) -> Any:
    """Mask function for ``"steer"``: build exactly the mask the original backend would get."""
    config = kwargs.get("config")
    name = original_backend(config) if config is not None else "sdpa"
    return ALL_MASK_ATTENTION_FUNCTIONS[name if name in ALL_MASK_ATTENTION_FUNCTIONS else "sdpa"](*args, **kwargs)


def register() -> None:
    """Register the attention and mask functions (idempotent, process-wide)."""
    if AttentionInterface._global_mapping.get(IMPLEMENTATION) is not steer_attention:
        AttentionInterface.register(IMPLEMENTATION, steer_attention)
    if AttentionMaskInterface._global_mapping.get(IMPLEMENTATION) is not steer_mask:
        AttentionMaskInterface.register(IMPLEMENTATION, steer_mask)


# --------------------------------------------------------------------------------------------------
# masks


def _materialize_block_mask(block_mask: Any, batch: int, q_len: int, k_len: int, device: torch.device) -> torch.Tensor:
    b = torch.arange(batch, device=device)[:, None, None, None]
    h = torch.zeros(1, 1, 1, 1, dtype=torch.long, device=device)
    q = torch.arange(q_len, device=device)[None, None, :, None]
    k = torch.arange(k_len, device=device)[None, None, None, :]
    return block_mask.mask_mod(b, h, q, k).expand(batch, 1, q_len, k_len).bool()


def bool_mask(
    attention_mask: Any, backend: str, batch: int, q_len: int, k_len: int, device: torch.device
) -> torch.Tensor:
    """The backend's mask as a boolean [B, 1, Lq, Lk] (True = may attend).

    ``None`` from the sdpa mask means SDPA's ``is_causal`` (upper-left aligned: key k <= query row q)
    when q_len > 1, and "attend to every key" for a single query row. Flash masks are 2-D padding masks
    with lower-right aligned causality.
    """
    if attention_mask is None:
        if q_len == 1:
            return torch.ones(batch, 1, 1, k_len, dtype=torch.bool, device=device)
        q = torch.arange(q_len, device=device)[:, None]
        k = torch.arange(k_len, device=device)[None, :]
        return (k <= q)[None, None].expand(batch, 1, q_len, k_len)
    if isinstance(attention_mask, torch.Tensor):
        if attention_mask.dim() == 2:  # flash: padding mask [B, Lk]
            return lse.causal_mask(q_len, k_len, device) & attention_mask.bool()[:, None, None, :k_len]
        mask = attention_mask[..., :k_len]
        if mask.dtype == torch.bool:
            return mask
        return mask > torch.finfo(mask.dtype).min / 2
    return _materialize_block_mask(attention_mask, batch, q_len, k_len, device)


def repeat_kv(x: torch.Tensor, heads: int) -> torch.Tensor:
    """[B, Hkv, L, D] -> [B, heads, L, D] (GQA)."""
    groups = heads // x.shape[1]
    return x if groups == 1 else x.repeat_interleave(groups, dim=1)


def masked_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    mask: torch.Tensor,
    bias: torch.Tensor | None,
    scale: float,
) -> torch.Tensor:
    """softmax(QK^T * scale + bias, masked) V with a boolean mask; fully masked rows give zeros. [B, H, Lq, D]."""
    heads = query.shape[1]
    k, v = repeat_kv(key, heads), repeat_kv(value, heads)
    if bias is None:
        attn_mask: torch.Tensor = mask
    else:
        floor = torch.finfo(query.dtype).min
        attn_mask = bias.to(query.dtype).masked_fill(~mask, floor)
    out = F.scaled_dot_product_attention(query, k, v, attn_mask=attn_mask, scale=scale)
    empty = ~mask.any(dim=-1, keepdim=True)
    if bool(empty.any()):
        out = out.masked_fill(empty, 0.0)
    return out


# --------------------------------------------------------------------------------------------------
# the registered function


def steer_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: Any,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs: Any,
) -> tuple[torch.Tensor, Any]:
    """Attention for steered models; same signature and return convention as transformers' backends.

    query [B, Hq, Lq, D]; key/value [B, Hkv, Lk, D] (cache included, GQA not repeated); returns the
    output [B, Lq, Hq, D] (contiguous) and ``None`` for the weights on edited layers.
    """
    config = getattr(module, "config", None)
    backend_name = original_backend(config)
    backend = backend_function(backend_name, module)
    tag: LayerTag | None = getattr(module, "_steer_layer", None)
    if tag is None:
        return backend(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)
    runtime = tag.runtime
    run = runtime.run
    if run is None:
        return backend(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)
    phase = runtime.context.phase
    edits = [e for e in runtime.attention_edits.get(tag.layer, ()) if runtime.active(e, phase, run)]
    if not edits:
        return backend(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)

    main_rows = runtime.main_rows
    if main_rows is not None and query.shape[0] > main_rows:
        # a batched auxiliary branch: its rows (after the caller's) run the original backend, unedited
        first = _batch_slice(attention_mask, 0, main_rows, query.shape[0])
        rest = _batch_slice(attention_mask, main_rows, query.shape[0], query.shape[0])
        out_main = _steered_attention(
            module, runtime, tag.layer, edits, backend_name, backend,
            query[:main_rows], key[:main_rows], value[:main_rows], first, scaling, dropout, kwargs,
        )  # fmt: skip
        out_rest, _ = backend(
            module, query[main_rows:], key[main_rows:], value[main_rows:], rest, scaling=scaling, dropout=dropout, **kwargs
        )
        return torch.cat([out_main, out_rest.to(out_main.dtype)], dim=0).contiguous(), None
    out = _steered_attention(
        module, runtime, tag.layer, edits, backend_name, backend, query, key, value, attention_mask, scaling, dropout, kwargs
    )
    return out, None


def _batch_slice(mask: Any, start: int, stop: int, total: int) -> Any:
    """Rows ``start:stop`` of a mask whose batch dimension is ``total`` (broadcast masks and None unchanged)."""
    if isinstance(mask, torch.Tensor) and mask.dim() >= 1 and mask.shape[0] == total and total > 1:
        return mask[start:stop]
    if mask is None or isinstance(mask, torch.Tensor):
        return mask
    raise NotImplementedError(
        "a batched auxiliary branch cannot split this attention mask (a block mask); use batch='sequential'"
    )


def _steered_attention(
    module: torch.nn.Module,
    runtime: Runtime,
    layer: int,
    edits: list[Any],
    backend_name: str,
    backend: Callable[..., tuple[torch.Tensor, Any]],
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: Any,
    scaling: float | None,
    dropout: float,
    kwargs: dict[str, Any],
) -> torch.Tensor:
    """The edited layer's output [B, Lq, H, D] (contiguous, the query's dtype)."""
    batch, heads, q_len, head_dim = query.shape
    k_len = key.shape[2]
    scale = scaling if scaling is not None else head_dim**-0.5
    mask_edits = [e for e in edits if isinstance(e, AttentionMask)]
    reweights = [e for e in edits if isinstance(e, GroupReweight)]
    score_edits: list[ScoreEdit] = [e for e in edits if isinstance(e, ScoreEdit)]
    prob_collects: list[Collect] = [e for e in edits if isinstance(e, Collect) and e.site == "layer.attn.probs"]
    edited_collects: list[Collect] = [
        e for e in edits if isinstance(e, Collect) and e.site == "layer.attn.probs.edited"
    ]
    output_edits = [
        e for e in edits if isinstance(e, (HeadScale, HeadOutputEdit)) or (isinstance(e, Collect) and e.site == "layer.attn.head_out")
    ]

    def context_for(edit: Any) -> EditContext:
        return runtime.edit_context(edit, layer, q_len, k_len)

    if mask_edits or reweights or score_edits or prob_collects or edited_collects:
        # SDPA's is_causal prefill: the triangle stays implicit (an [Lq, Lk] tensor is O(L²)) until a mask
        # edit needs it; the reweight then builds only its edited rows' part, or none (Triton)
        causal = attention_mask is None and q_len == k_len and q_len > 1
        mask = None if causal else bool_mask(attention_mask, backend_name, batch, q_len, k_len, query.device)
        bias = None
        changed = False
        for edit in mask_edits:
            value_ = evaluate(edit.mask, context_for(edit))
            if value_ is None:
                continue
            changed = True
            if mask is None:
                mask = bool_mask(attention_mask, backend_name, batch, q_len, k_len, query.device)
                causal = False
            value_ = value_.to(query.device)
            if edit.mode == "and":
                mask = mask & value_.bool()
            elif edit.mode == "or":
                mask = mask | value_.bool()
            elif edit.mode == "replace":
                mask = value_.bool().expand(batch, -1, q_len, k_len)
            else:
                bias = value_ if bias is None else bias + value_
        if prob_collects or edited_collects:
            if edited_collects and score_edits:
                raise NotImplementedError("Collect(site='layer.attn.probs.edited') on a layer with a ScoreEdit")
            allowed = mask if mask is not None else lse.causal_mask(q_len, k_len, query.device)
            if prob_collects or not reweights:  # without a reweight the edited probabilities are these
                plain = attention_probs(query, key, allowed, bias, scale)
                for collect in (*prob_collects, *([] if reweights else edited_collects)):
                    store(collect, context_for(collect), plain)
            if reweights and edited_collects:
                edited = reweighted_probs(reweights[0], context_for, query, key, value, allowed, bias, scale)
                for collect in edited_collects:
                    store(collect, context_for(collect), edited)
        base_lse = None
        base: torch.Tensor | Callable[[], torch.Tensor]
        if changed:
            assert mask is not None  # built by the first mask edit that returned a value
            base = masked_attention(query, key, value, mask, bias, scale)
        elif reweights and q_len > lse.MATH_MAX_ROWS and query.device.type == "cpu":
            # many rows to reweight: one fused pass gives the output and the log-sum-exp the merge needs
            base, base_lse = lse.attention_with_lse(query, key, value, mask, scale, causal=causal)
        else:

            def backend_output() -> torch.Tensor:
                out, _ = backend(
                    module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs
                )
                return out.transpose(1, 2)

            # a reweight may not need it (the Triton path computes decode rows and their base in one pass), nor
            # explicit scores that edit every row (a decode step)
            base = backend_output if (reweights or score_edits) else backend_output()
        if reweights:
            if len(reweights) > 1:
                raise RuntimeError(
                    f"layer {layer}: {len(reweights)} GroupReweight edits are active; combine them into one "
                    "(one coefficient function over the union of groups)"
                )
            if bias is not None:
                raise NotImplementedError("GroupReweight together with an additive mask on one layer")
            if score_edits:
                raise NotImplementedError(
                    f"layer {layer}: a GroupReweight and a ScoreEdit on one layer; apply the methods to different layers"
                )
            base = run_group_reweight(
                runtime, reweights[0], context_for(reweights[0]), query, key, value, mask, scale, base, base_lse, causal
            )
        for score_edit in score_edits:
            rows_mask = mask if mask is not None else (lse.causal_mask(q_len, k_len, query.device) if causal else None)
            base = run_score_edit(score_edit, context_for(score_edit), query, key, value, rows_mask, bias, scale, base)
        if callable(base):
            base = base()
        out = base.transpose(1, 2)
    else:
        out, _ = backend(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)
    for out_edit in output_edits:
        if isinstance(out_edit, Collect):
            collect_head_out(out_edit, out, context_for(out_edit))
        else:
            out = out_edit.apply(out, context_for(out_edit))
    return out.to(query.dtype).contiguous()


def reweighted_probs(
    edit: GroupReweight,
    context_for: Callable[[Any], EditContext],
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    mask: torch.Tensor,
    bias: torch.Tensor | None,
    scale: float,
) -> torch.Tensor:
    """The probabilities a reweighted layer's output is made of, [B, H, Lq, Lk] fp32: ``p'_qj = c_g(j) p_qj``
    after the layer's mask edits (``mask``), on the materialised rows (see
    `steer.kernels.reference.group_reweight_reference`)."""
    if bias is not None:
        raise NotImplementedError("GroupReweight together with an additive mask on one layer")
    from steer.kernels.reference import group_reweight_reference

    ectx = context_for(edit)
    labels = group_labels(edit, ectx, key.shape[2], key.device)
    rows = edited_rows(edit, ectx, query.shape[2], query.shape[0], query.device)
    _, probs = group_reweight_reference(
        query, key, value, mask, scale, labels, coefficient_fn(edit, ectx), rows=rows,
        renormalize=edit.renormalize, return_probs=True,
    )  # fmt: skip
    return probs


def attention_probs(
    query: torch.Tensor, key: torch.Tensor, mask: torch.Tensor, bias: torch.Tensor | None, scale: float
) -> torch.Tensor:
    """Post-softmax probabilities of the call's query rows, [B, H, Lq, Lk] fp32 (masked keys 0)."""
    scores = torch.matmul(query.float(), repeat_kv(key, query.shape[1]).float().transpose(-1, -2)) * scale
    if bias is not None:
        scores = scores + bias.float()
    scores = scores.masked_fill(~mask.to(scores.device), float("-inf"))
    return torch.nan_to_num(torch.softmax(scores, dim=-1), nan=0.0)


# --------------------------------------------------------------------------------------------------
# explicit scores for a few rows


def score_rows(edit: ScoreEdit, ectx: EditContext, batch: int, q_len: int, device: torch.device) -> torch.Tensor | None:
    """bool [B, Lq]: the rows ``edit`` changes (``"last"``: each row's last real query position of the call)."""
    if callable(edit.rows):
        rows = edit.rows(ectx)
        return None if rows is None else rows.to(device).bool()
    ctx = ectx.forward
    out = torch.zeros(batch, q_len, dtype=torch.bool, device=device)
    padding = ctx.padding_mask
    past = ctx.past_length
    if padding is None or padding.shape[1] < past + q_len or padding.shape[0] != batch:
        out[:, -1] = True
        return out
    real = padding[:, past : past + q_len].to(device).bool()
    has = real.any(dim=1)
    last = (q_len - 1) - real.flip(dims=[1]).long().argmax(dim=1)
    out[torch.arange(batch, device=device)[has], last[has]] = True
    return out


def run_score_edit(
    edit: ScoreEdit,
    ectx: EditContext,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    mask: torch.Tensor | None,
    bias: torch.Tensor | None,
    scale: float,
    base: torch.Tensor | Callable[[], torch.Tensor],
) -> torch.Tensor | Callable[[], torch.Tensor]:
    """Apply one :class:`ScoreEdit` to the layer's output ``base`` [B, H, Lq, D] (or the function computing it)."""
    from steer.kernels.reference import explicit_score_reference

    batch, _, q_len, _ = query.shape
    k_len = key.shape[2]
    rows = score_rows(edit, ectx, batch, q_len, query.device)
    if rows is None or not bool(rows.any()):
        return base
    if edit.keys == "image":
        keys = ectx.forward.key_image_mask(k_len, query.device)
        if keys is None:
            raise MissingImageTokensError(
                "ScoreEdit(keys='image') needs input_ids to find the image tokens; the model was called with "
                "inputs_embeds only."
            )
    else:
        keys = edit.keys(ectx)
        if keys is None:
            return base
    keys = keys.to(query.device).bool()

    def fn(scores: torch.Tensor) -> torch.Tensor:
        return edit.fn(scores, ectx)

    if bias is not None:
        raise NotImplementedError("a ScoreEdit together with an additive mask on one layer")
    if edit.impl == "reference":
        full = explicit_score_reference(query, key, value, mask, scale, rows, keys, fn)
        plain = base() if callable(base) else base
        return torch.where(rows[:, None, :, None], full.to(plain.dtype), plain)
    return lse.explicit_score_attention(query, key, value, mask, scale, rows, keys, fn, base)


def collect_head_out(edit: Collect, out: torch.Tensor, ectx: EditContext) -> None:
    """Store ``edit.fn`` of the per-head output [B, Lq, H, d] at the selected positions."""
    store(edit, ectx, select(out, edit.select, ectx))


# --------------------------------------------------------------------------------------------------
# group reweighting


def group_labels(edit: GroupReweight, ectx: EditContext, k_len: int, device: torch.device) -> torch.Tensor:
    """Key-group labels [B, <= k_len] of this call: the image group, or the edit's labels (keys decoded later
    are in no group: the kernels pad shorter rows with 0)."""
    ctx = ectx.forward
    if edit.groups == "image":
        image = ctx.key_image_mask(k_len, device)
        if image is None:
            raise MissingImageTokensError(
                "GroupReweight(groups='image') needs input_ids to find the image tokens; the model was "
                "called with inputs_embeds only."
            )
        return image.long()
    labels = edit.groups(ectx).to(device).long()
    if ctx.key_offset(k_len) > 0:  # a sliding-window layer's cache holds the last keys only
        return ctx.align_keys(labels, k_len, 0)
    return labels[:, :k_len]  # the kernels pad shorter rows with 0


def edited_rows(edit: GroupReweight, ectx: EditContext, q_len: int, batch: int, device: torch.device) -> torch.Tensor | None:
    """bool [B, Lq] of the rows the edit changes (None = every row)."""
    ctx = ectx.forward
    if edit.rows == "all" or edit.rows is None:
        return None
    if edit.rows == "after_image":
        rows = ctx.rows_after_first_image(device)
    elif edit.rows == "new":
        rows = None if ctx.phase == "decode" else torch.zeros(batch, q_len, dtype=torch.bool)
    else:
        rows = edit.rows(ectx)
    return None if rows is None else rows.to(device)


def coefficient_fn(edit: GroupReweight, ectx: EditContext) -> Callable[[torch.Tensor], torch.Tensor]:
    """The coefficients of this call as a function of the group masses."""
    if callable(edit.coefficients):
        fn = edit.coefficients
        return lambda masses: fn(masses, ectx)
    values = torch.tensor([float(c) for c in edit.coefficients], dtype=torch.float32)

    def constant(masses: torch.Tensor) -> torch.Tensor:
        if values.numel() < masses.shape[-1]:
            raise ValueError(
                f"GroupReweight: {values.numel()} coefficients for {masses.shape[-1]} groups (incl. group 0)"
            )
        # fewer groups than coefficients: the keys of this call hold no key of the higher groups (e.g. a
        # sliding-window layer whose window holds no image token); their coefficients have nothing to act on
        return values[: masses.shape[-1]].to(masses.device)

    return constant


def coefficient_rule(edit: GroupReweight, ectx: EditContext) -> Any:
    """The kernel form of the coefficients for this call: ``rule`` (evaluated), else the constant rule."""
    if edit.rule is not None:
        return edit.rule(ectx) if callable(edit.rule) else edit.rule
    if callable(edit.coefficients):
        return None
    from steer.kernels.rules import CoefficientRule

    try:
        return CoefficientRule.constant(edit.coefficients)
    except ValueError:
        return None


def run_group_reweight(
    runtime: Runtime,
    edit: GroupReweight,
    ectx: EditContext,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    mask: torch.Tensor | None,
    scale: float,
    base: torch.Tensor | Callable[[], torch.Tensor],
    base_lse: torch.Tensor | None = None,
    causal: bool = False,
) -> torch.Tensor:
    """Apply ``edit`` to one layer's attention; ``base`` is the unedited output [B, H, Lq, D], or the
    function that computes it when needed (see ``reweighted_attention``), and ``base_lse`` its
    log-sum-exp, when the caller has it. ``causal``: the mask is the causal triangle (then ``mask`` is
    None and nobody builds it)."""
    from steer.kernels.dispatch import kernel_may_run, reweighted_attention

    labels = group_labels(edit, ectx, key.shape[2], key.device)
    rows = edited_rows(edit, ectx, query.shape[2], query.shape[0], query.device)
    if rows is not None and not bool(rows.any()):
        return base() if callable(base) else base
    return reweighted_attention(
        query,
        key,
        value,
        mask,
        scale,
        labels,
        coefficient_fn(edit, ectx),
        rows=rows,
        renormalize=edit.renormalize,
        base_out=base,
        impl=edit.impl,
        rule=coefficient_rule(edit, ectx) if kernel_may_run(edit.impl, query.device) else None,
        base_lse=base_lse,
        causal=causal,
    )
