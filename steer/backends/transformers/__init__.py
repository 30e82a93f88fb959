"""The transformers backend: installs edits on a Hugging Face vision-language model.

* `runtime` — one runtime per model: the union of the active handles' edits, the per-thread call state;
* `installers` — one installer per edit kind;
* `attention` — steer's attention function (registered with transformers' ``AttentionInterface``);
* `images` — image sizes / grids noted across ``generate``; `masks` — padding out of transformers' masks.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from steer.adapters import FAMILIES, adapter_for
from steer.backends.lifecycle import Steering
from steer.backends.transformers.runtime import Runtime
from steer.backends.transformers.wrappers import unwrap
from steer.edits.kinds import Edit, HeadScale, LayerEdit, ResidualAdd
from steer.errors import InvalidParameterError, UnsupportedModelError


class TransformersBackend:
    """`steer.backends.Backend` for vision-language models."""

    kind = "vlm"

    def adapter(self, target: nn.Module) -> Any:
        inner, chain = unwrap(target)
        adapter = adapter_for(inner) if not chain else _inner_adapter(inner, chain, target)
        adapter.wrappers = chain
        return adapter

    def families(self) -> tuple[str, ...]:
        return FAMILIES

    def info(self, adapter: Any) -> Any:
        return adapter.info

    def active_methods(self, target: nn.Module) -> dict[str, Any]:
        runtime = Runtime.of(unwrap(target)[0])
        return {} if runtime is None else {m: h for h in runtime.handles for m in h.methods}

    def check(self, adapter: Any, edits: list[Edit], methods: list[Any]) -> None:
        from steer.backends.transformers.installers import check

        for edit in edits:
            check_layers(adapter, edit)
            check(adapter, edit)

    def handle(
        self,
        target: nn.Module,
        adapter: Any,
        edits: list[Edit],
        params: dict[str, dict[str, Any]],
        state: dict[str, Any],
        methods: list[Any],
    ) -> Steering:
        needing = tuple(m.name for m in methods if m.image_tokens_needed())
        whole = tuple(m.name for m in methods if m.whole_prefill)
        model = adapter.model  # the model inside known wrappers
        if adapter.wrappers:
            state["steered"] = {"class": type(model).__name__, "inside": list(adapter.wrappers)}
        return Steering(model, adapter, edits, params, state, needing, whole, runtime_class=Runtime)


def _inner_adapter(inner: Any, chain: list[str], target: Any) -> Any:
    try:
        return adapter_for(inner)
    except UnsupportedModelError as exc:
        raise UnsupportedModelError(
            f"{type(target).__name__} wraps {type(inner).__name__} (through {' -> '.join(chain)}): {exc}"
        ) from None


def check_layers(adapter: Any, edit: Edit) -> None:
    """Layer and head indices of a low-level edit must exist in the model, and a fixed head scale or
    residual vector must fit its width (typed error at apply, not a shape error in the middle of generate)."""
    what = type(edit).__name__ if not edit.owner else f"{edit.owner} ({type(edit).__name__})"
    if isinstance(edit, LayerEdit):
        try:
            edit.resolve_layers(adapter.num_layers)
        except ValueError as exc:
            raise InvalidParameterError(
                f"{what}: {exc} (valid: 0..{adapter.num_layers - 1}, or negative from the end)"
            ) from None
    if isinstance(edit, HeadScale) and edit.heads is not None:
        bad = [h for h in edit.heads if not 0 <= int(h) < adapter.num_heads]
        if bad:
            raise InvalidParameterError(
                f"{what}: head(s) {bad} do not exist; the model has {adapter.num_heads} query heads "
                f"(valid: 0..{adapter.num_heads - 1})"
            )
    if isinstance(edit, HeadScale) and isinstance(edit.scale, torch.Tensor):
        shape = tuple(edit.scale.shape)
        if not shape or shape[-1] != adapter.num_heads or len(shape) > 2:
            raise InvalidParameterError(
                f"{what}: a scale tensor has shape [H] or [B, H] with H = {adapter.num_heads} query heads, "
                f"got {list(shape)}"
            )
    if isinstance(edit, ResidualAdd) and isinstance(edit.vector, torch.Tensor):
        shape = tuple(edit.vector.shape)
        if not shape or shape[-1] != adapter.hidden_size or len(shape) > 2:
            raise InvalidParameterError(
                f"{what}: the vector has shape [D] or [B, D] with D = {adapter.hidden_size} (the language "
                f"model's hidden size), got {list(shape)}"
            )


BACKEND = TransformersBackend()

__all__ = ["BACKEND", "Runtime", "TransformersBackend", "check_layers"]
