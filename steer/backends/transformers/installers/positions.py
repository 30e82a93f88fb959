"""``Positions`` (site ``lm.inputs``): new position ids for the prompt, 1-D RoPE or M-RoPE.

* 1-D (LLaVA): a pre-hook on the language model. At prefill the model's ids (given, or ``past..past+T``) go
  through every Positions edit in apply order; decode steps add each row's shift of the last prompt token
  (the decoded tokens follow it).
* M-RoPE (Qwen): the model builds its ids with ``get_rope_index`` (``generate`` calls it before the prefill,
  a direct forward inside); the wrapper runs the edits on what it returns and recomputes
  ``rope_deltas = max position + 1 - real tokens`` per row, which the model adds at decode steps.

Pruning installs its own position step earlier (`steer.backends.transformers.installers.prune`), so these
edits see the ids of the pruned prompt.
"""

from __future__ import annotations

import inspect
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from steer.backends.transformers.installers.registry import installer
from steer.edits.context import ForwardFacts
from steer.edits.kinds import MAIN, Positions
from steer.errors import ImageLayoutError

if TYPE_CHECKING:
    from steer.backends.transformers.runtime import Runtime


def rope_deltas(positions: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
    """``max position + 1 - real tokens`` per row of M-RoPE ids [3, B, T] (real: bool [B, T]), as [B, 1]."""
    masked = torch.where(real[None].to(positions.device), positions, torch.full_like(positions, -1))
    top = masked.amax(dim=(0, 2))
    return (top + 1 - real.to(positions.device).sum(dim=1)).view(-1, 1)


def _apply(runtime: Runtime, edits: list[Positions], positions: torch.Tensor, facts: ForwardFacts) -> torch.Tensor | None:
    new, changed = positions, False
    for edit in edits:
        if not runtime.active(edit, "prefill"):
            continue
        out = edit.fn(new, runtime.edit_context(edit, facts=facts))
        if out is not None:
            new, changed = out, True
    return new if changed else None


@installer(Positions, rank=10)
def install_positions(runtime: Runtime, edit: Positions) -> None:
    edits: list[Positions] = runtime.shared("positions", list)
    edits.append(edit)
    if len(edits) > 1:
        return  # one hook / wrapper serves every Positions edit, in apply order
    if runtime.adapter.position_scheme == "mrope":
        _install_rope_wrapper(runtime, edits)
    else:
        _install_1d_hook(runtime, edits)


def _install_1d_hook(runtime: Runtime, edits: list[Positions]) -> None:
    def hook(module: nn.Module, args: tuple, kwargs: dict) -> Any:
        if runtime.run != MAIN:
            return None
        ctx = runtime.context
        ref = kwargs.get("inputs_embeds")
        if ref is None:
            ref = kwargs.get("input_ids")
        if ref is None:
            return None
        batch, length = ref.shape[0], ref.shape[1]
        pos0 = kwargs.get("position_ids")
        if pos0 is None:
            pos0 = torch.arange(ctx.past_length, ctx.past_length + length, device=ref.device)[None]
        pos0 = pos0.expand(batch, length)
        memo = ctx.call.backend.setdefault("positions", {})
        if ctx.phase == "prefill":
            new = _apply(runtime, edits, pos0, ctx)
            memo["offset"] = None if new is None else (new[:, -1] - pos0[:, -1])
            if new is None:
                return None
        else:
            offset = memo.get("offset")
            if offset is None:
                return None
            if offset.shape[0] != batch:
                if batch % offset.shape[0]:
                    raise ImageLayoutError(
                        f"decode batch {batch} does not match the prefill batch {offset.shape[0]} (position edits "
                        "keep one shift per prompt row)"
                    )
                offset = offset.repeat_interleave(batch // offset.shape[0])
            new = pos0 + offset.to(pos0.device)[:, None]
        kwargs["position_ids"] = new
        return args, kwargs

    runtime.add_hook(runtime.adapter.text_model.register_forward_pre_hook(hook, with_kwargs=True))


def _install_rope_wrapper(runtime: Runtime, edits: list[Positions]) -> None:
    adapter: Any = runtime.adapter

    def make(original: Any) -> Any:
        signature = inspect.signature(original)

        def get_rope_index(*args: Any, **kwargs: Any) -> Any:
            position_ids, deltas = original(*args, **kwargs)
            if runtime.run != MAIN:
                return position_ids, deltas
            bound = signature.bind_partial(*args, **kwargs).arguments
            input_ids = bound.get("input_ids")
            grid = bound.get("image_grid_thw")
            if input_ids is None or bound.get("mm_token_type_ids") is None or grid is None:
                return position_ids, deltas
            mask = bound.get("attention_mask")
            real = mask.bool() if isinstance(mask, torch.Tensor) else torch.ones_like(input_ids, dtype=torch.bool)
            layout = adapter.image_layout(input_ids, adapter.images_from_inputs({"image_grid_thw": grid}))
            facts = ForwardFacts(
                phase="prefill", batch_size=int(input_ids.shape[0]), query_len=int(input_ids.shape[1]),
                prompt_ids=input_ids, image_layout=layout, padding_mask=real, call=runtime.call_store(),
            )  # fmt: skip
            new = _apply(runtime, edits, position_ids, facts)
            if new is None:
                return position_ids, deltas
            return new, rope_deltas(new, real).to(deltas.dtype)

        return get_rope_index

    runtime.wrap(adapter.rope_index_owner, "get_rope_index", make)


__all__ = ["install_positions", "rope_deltas"]
