"""``PruneVisionTokens`` (site ``vision.out``): encode the images once, keep some of their tokens, shorten the
prompt to them, and hand the model the kept features as ``mm_encoder_outputs`` (transformers >= 5.18).

Entry points: a wrapper around ``generate`` (prune before its bookkeeping: mask, positions, cache sizing; the
caller gets their own prompt back followed by the new tokens) and a top-level forward pre-hook, before the
per-forward context is captured (a direct forward with ``pixel_values`` and an empty cache). The adapter
encodes and scores (`steer.adapters.pruning`); here each image's run of ``stock`` placeholders becomes its
``sent`` tokens and the rows are re-padded on the left. Positions:

* ``"contiguous"``: ordinary positions of the shorter sequence (nothing to do);
* ``"original"`` (1-D RoPE): ``p' = p + gap`` where ``gap`` counts the pruned tokens before each column
  (prefill), ``p + sum_i (N_i - T_i)`` for every decoded token;
* M-RoPE models always keep the original ids: ``get_rope_index`` runs on the unpruned prompt, the pruned
  columns are dropped and ``rope_deltas = max_pos + 1 - new_len`` per row.

The call's :class:`~steer.edits.artifacts.PrunedLayout` is published (for consumers such as CCA) and handed to
``edit.on_pruned``.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from steer.backends.transformers.installers.registry import installer
from steer.edits.artifacts import PrunedImage, PrunedLayout
from steer.edits.context import CallStore
from steer.edits.facts import runs
from steer.edits.kinds import MAIN, PruneVisionTokens
from steer.errors import MissingImageTokensError, UnsupportedModelError, VisionPruningError

if TYPE_CHECKING:
    from steer.backends.transformers.runtime import Runtime

_PLAN = "__prune_plan__"


@dataclass
class Plan:
    """How one call's prompt was shortened (rows of the un-expanded batch)."""

    ids: Tensor  # the shortened input_ids [B, L']
    origin: Tensor  # [B, L'] column of each kept token in the caller's row (-1: new padding)
    orig_ids: Tensor
    orig_mask: Tensor | None
    orig_types: Tensor | None  # the caller's mm_token_type_ids (M-RoPE ids are built from them)
    gap_cumsum: Tensor  # [B, L'] pruned tokens before each column (mask-cumsum positions)
    gap_arange: Tensor  # [B, L'] the same for plain arange positions
    total_cumsum: Tensor  # [B] pruned tokens per row
    total_arange: Tensor  # [B] L - L'
    mask: Tensor | None
    types: Tensor | None  # the shortened mm_token_type_ids
    tokens: dict[str, Tensor] = field(default_factory=dict)  # every per-token input, shortened


def check_prune(adapter: Any, edit: PruneVisionTokens) -> None:
    """The model must take precomputed image features (``mm_encoder_outputs``, transformers >= 5.18) and the
    scoring layer must be scorable through its own projection modules."""
    from steer.adapters.scores import scoring_problem

    layer = edit.layer if edit.layer is not None else adapter.info.default_score_layer
    problem = scoring_problem(adapter.vision_attention(layer), adapter.vision_score)
    if problem is not None:
        raise UnsupportedModelError(
            f"pruning scores visual tokens at vision layer {layer}, but {problem}; this vision tower is not "
            "supported for pruning"
        )
    base_forward = adapter.image_encoder.forward
    if "mm_encoder_outputs" not in inspect.signature(base_forward).parameters:
        import transformers

        raise UnsupportedModelError(
            f"pruning hands the kept image features to the model as `mm_encoder_outputs`, which "
            f"{type(adapter.image_encoder).__name__}.forward does not take in transformers "
            f"{transformers.__version__}; it does from 5.18 on: pip install -U 'transformers>=5.18'"
        )


@installer(PruneVisionTokens, rank=0, check=check_prune)
def install_prune(runtime: Runtime, edit: PruneVisionTokens) -> None:
    pruner = Pruner(runtime, edit)
    runtime.wrap(runtime.model, "generate", pruner.wrap_generate)
    runtime.add_hook(runtime.model.register_forward_pre_hook(pruner.before_forward, with_kwargs=True, prepend=True))
    if runtime.adapter.position_scheme == "mrope":
        runtime.wrap(pruner.adapter.rope_index_owner, "get_rope_index", pruner.wrap_rope_index)
    elif edit.positions == "original":
        runtime.add_hook(runtime.adapter.text_model.register_forward_pre_hook(pruner.positions, with_kwargs=True))


class Pruner:
    """The pruning of one edit on one runtime (the functions its hooks and wrappers call)."""

    def __init__(self, runtime: Runtime, edit: PruneVisionTokens) -> None:
        self.runtime = runtime
        self.edit = edit
        self.adapter: Any = runtime.adapter
        self.layer = edit.layer if edit.layer is not None else runtime.info.default_score_layer
        if self.layer < 0:
            self.layer += runtime.info.vision_layers

    # ---- entry points ---------------------------------------------------------------------------------
    def wrap_generate(self, original: Any) -> Any:
        def generate(*args: Any, **kwargs: Any) -> Any:
            """Prune before HF's bookkeeping; return the caller's prompt + the new tokens."""
            runtime = self.runtime
            if runtime.run != MAIN:
                return original(*args, **kwargs)
            kwargs = dict(kwargs)
            if args and isinstance(args[0], Tensor) and "input_ids" not in kwargs:
                kwargs["input_ids"], args = args[0], args[1:]
            if kwargs.get("pixel_values") is None:
                return original(*args, **kwargs)
            call = runtime.new_pending_call()
            try:
                with torch.no_grad():
                    new, plan = self.prepare(kwargs, call)
                out = original(*args, **new)
            finally:
                if runtime.pending_call() is call:
                    runtime.clear_pending()
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

        return generate

    def before_forward(self, module: nn.Module, args: tuple, kwargs: dict) -> Any:
        """Top-level pre-hook (before the context capture): prune a direct forward call's prompt."""
        if self.runtime.run != MAIN:
            return None
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        past = int(cache.get_seq_length()) if cache is not None and hasattr(cache, "get_seq_length") else 0
        if past > 0 or kwargs.get("pixel_values") is None:
            return None
        kwargs = dict(kwargs)
        if args and isinstance(args[0], Tensor) and "input_ids" not in kwargs:
            kwargs["input_ids"], args = args[0], args[1:]
        new, _ = self.prepare(kwargs, self.runtime.new_pending_call())
        return args, new

    # ---- the pruning ----------------------------------------------------------------------------------
    def prepare(self, kwargs: dict[str, Any], call: CallStore) -> tuple[dict[str, Any], Plan]:
        """Encode the images with scoring on, keep the top tokens, shorten the prompt; returns new kwargs."""
        ids = kwargs.get("input_ids")
        if ids is None:
            raise MissingImageTokensError(
                "pruning shortens each image's run of placeholder tokens, but the model was called with "
                "pixel_values and inputs_embeds only. Call it (or generate) with input_ids from the processor."
            )
        if kwargs.get("position_ids") is not None:
            raise VisionPruningError(
                "position_ids were passed with pixel_values; the prompt gets shorter, so let the model build "
                "positions (use positions='original' to keep the stock ones)"
            )
        out, images = self.adapter.encode_pruned(kwargs, self.edit.keep, self.layer, self.edit.layout)
        plan, rows = self.shorten(kwargs, images)
        call.backend[_PLAN] = plan
        positions = "original" if self.adapter.position_scheme == "mrope" else self.edit.positions
        layout = PrunedLayout(images=rows, origin=plan.origin, positions=positions)
        call.artifacts[PrunedLayout] = layout
        if self.edit.on_pruned is not None:
            self.edit.on_pruned(layout)
        new = dict(kwargs)
        new.pop("pixel_values")
        new["input_ids"] = plan.ids
        if plan.mask is not None:
            new["attention_mask"] = plan.mask
        new.update(plan.tokens)  # the adapter's per-token inputs (mm_token_type_ids, token_type_ids)
        encoded = dict(new.get("mm_encoder_outputs") or {})
        encoded["image"] = out
        new["mm_encoder_outputs"] = encoded
        return new, plan

    def shorten(self, kwargs: dict[str, Any], images: list[PrunedImage]) -> tuple[Plan, list[list[PrunedImage]]]:
        """Replace each image's run of ``stock`` placeholders by its ``sent`` tokens and re-pad on the left.

        A sent token stands for the stock column ``start + offset`` (its ``offsets`` entry), which is what
        the original positions (1-D gap, M-RoPE gather) are computed from.
        """
        ids: Tensor = kwargs["input_ids"]
        mask = kwargs.get("attention_mask")
        mask = mask if isinstance(mask, Tensor) and mask.dim() == 2 else None
        types = kwargs.get("mm_token_type_ids") if self.adapter.position_scheme == "mrope" else None
        per_token = {
            k: kwargs[k]
            for k in self.adapter.per_token_inputs
            if isinstance(kwargs.get(k), Tensor) and tuple(kwargs[k].shape) == tuple(ids.shape)
        }
        batch, length = ids.shape
        flags = self.adapter.image_token_mask(ids).cpu()
        if mask is not None:
            flags &= mask.cpu().bool()
        queue = list(range(len(images)))
        rows: list[list[PrunedImage]] = []
        sources: list[Tensor] = []  # per row: the caller's column each new token copies (id, mask, type)
        origins: list[Tensor] = []  # per row: the caller's column each new token stands for (positions)
        for b in range(batch):
            row_images: list[PrunedImage] = []
            src: list[Tensor] = []
            orig: list[Tensor] = []
            cursor = 0
            for start, end in runs(flags[b]):
                pos = start
                while pos < end:
                    if not queue:
                        raise VisionPruningError(
                            f"row {b} holds more image placeholder tokens than the images passed describe "
                            "(placeholders and images do not match)"
                        )
                    i = queue.pop(0)
                    stock, offsets = images[i].stock, images[i].offsets
                    if pos + stock > end:
                        raise VisionPruningError(
                            f"image {i} needs {stock} placeholder tokens but row {b} has a run of "
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
            rows.append(row_images)
        if queue:
            raise VisionPruningError(
                f"{len(queue)} image(s) have no placeholder tokens in the prompt (placeholders and images do not match)"
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
        new_tokens = {k: torch.zeros(batch, width, dtype=v.dtype, device=v.device) for k, v in per_token.items()}
        origin = torch.full((batch, width), -1, dtype=torch.long)
        for b in range(batch):
            offset = width - sources[b].numel()
            origin[b, offset:] = origins[b]
            cols = sources[b].to(device)
            new_ids[b, offset:] = ids[b, cols]
            new_mask[b, offset:] = base_mask[b, cols]
            for k, v in per_token.items():
                new_tokens[k][b, offset:] = v[b, cols.to(v.device)]
        pos0 = (base_mask.long().cumsum(-1) - 1).clamp(min=0).cpu()
        pos1 = (new_mask.long().cumsum(-1) - 1).clamp(min=0).cpu()
        real = (origin >= 0) & new_mask.cpu().bool()
        safe = origin.clamp(min=0, max=length - 1)
        plan = Plan(
            ids=new_ids,
            origin=origin,
            orig_ids=ids,
            orig_mask=mask,
            orig_types=types,
            gap_cumsum=torch.where(real, pos0.gather(1, safe) - pos1, torch.zeros_like(pos1)),
            gap_arange=torch.where(origin >= 0, origin - torch.arange(width)[None], torch.zeros_like(origin)),
            total_cumsum=base_mask.long().sum(dim=1).cpu() - new_mask.long().sum(dim=1).cpu(),
            total_arange=torch.full((batch,), length - width, dtype=torch.long),
            mask=new_mask if mask is not None or bool((kept != width).any()) else None,
            types=new_tokens.get("mm_token_type_ids") if types is not None else None,
            tokens=new_tokens,
        )
        return plan, rows

    # ---- positions ------------------------------------------------------------------------------------
    def positions(self, module: nn.Module, args: tuple, kwargs: dict) -> Any:
        """``positions="original"`` (1-D RoPE): ``p' = p + gap`` at prefill, ``p + sum_i (N_i - T_i)`` at decode."""
        runtime = self.runtime
        if runtime.run != MAIN:
            return None
        ctx = runtime.context
        plan: Plan | None = ctx.call.backend.get(_PLAN)
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
        if ctx.phase == "prefill":
            if length != plan.ids.shape[1]:
                raise VisionPruningError(
                    "positions='original' needs the whole prompt in one prefill call (chunked prefill)"
                )
            gap = plan.gap_arange if pos is None else plan.gap_cumsum
            base = torch.arange(length, device=ref.device)[None].expand(batch, length) if pos is None else pos
            shift = gap.to(ref.device).repeat_interleave(repeat, dim=0)
        else:
            past = ctx.past_length
            if pos is None:
                base = torch.arange(past, past + length, device=ref.device)[None].expand(batch, length)
                total = plan.total_arange
            else:
                base, total = pos, plan.total_cumsum
            shift = total.to(ref.device).repeat_interleave(repeat, dim=0)[:, None]
        kwargs["position_ids"] = base + shift.to(base.dtype)
        return args, kwargs

    def wrap_rope_index(self, original: Any) -> Any:
        signature = inspect.signature(original)

        def get_rope_index(*args: Any, **kwargs: Any) -> Any:
            """Stock ids of the unpruned prompt, pruned columns dropped, ``rope_deltas = max_pos + 1 - new_len``."""
            if self.runtime.run != MAIN:
                return original(*args, **kwargs)
            plan: Plan | None = self.runtime.call_store(last=True).backend.get(_PLAN)
            bound = signature.bind_partial(*args, **kwargs).arguments
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
            gathered = position_ids.gather(
                2, origin.clamp(min=0, max=position_ids.shape[2] - 1)[None].expand(position_ids.shape[0], -1, -1)
            )
            mask = bound.get("attention_mask")
            real = (origin >= 0) & (mask.bool().to(origin.device) if isinstance(mask, Tensor) else True)
            gathered = torch.where(real[None], gathered, torch.zeros_like(gathered))
            top = torch.where(real[None], gathered, torch.full_like(gathered, -1)).amax(dim=(0, 2))
            new_deltas = (top + 1 - real.sum(dim=1)).view(-1, 1).to(deltas.dtype)
            return gathered, new_deltas

        return get_rope_index


__all__ = ["Plan", "Pruner", "check_prune", "install_prune"]
