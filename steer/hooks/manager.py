"""The hook manager: the only code that touches a model.

One :class:`Runtime` per steered model holds the edits of every active :class:`Steering` handle and
the hooks that run them. Any change (a new handle, a removed one) uninstalls everything and installs
the union again, so the installed state is always a function of the active handles. When the last
handle goes, the model is exactly as it was: hooks removed, layer tags deleted, the text config's
``_attn_implementation`` restored.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from steer.edits import (
    ATTENTION_EDITS,
    AttentionEdit,
    Edit,
    EditContext,
    GroupReweight,
    InputEdit,
    LogitsTransform,
    MethodWrap,
    ModuleHook,
    ResidualAdd,
    evaluate,
)
from steer.errors import MissingImageTokensError, SteeringRemovedError
from steer.hooks import attention as attention_fn
from steer.hooks.context import ForwardContext
from steer.hooks.lifecycle import HandleRuntime

if TYPE_CHECKING:
    from steer.adapters.base import Adapter

_RUNTIME_ATTR = "_steer_runtime"
_PREFILL_INPUT_KEYS = ("image_grid_thw", "image_sizes", "pixel_values", "mm_token_type_ids", "video_grid_thw")


def _padding_from_mask(mask: Any, length: int) -> torch.Tensor | None:
    """bool [B, length] (True = real token) from the model's attention mask: 2-D as given; a 4-D mask
    (StaticCache generation passes one) is read off its last query row, which is a real token."""
    if not isinstance(mask, torch.Tensor):
        return None
    if mask.dim() == 2:
        return mask.bool()
    if mask.dim() == 4:
        last = mask[:, 0, -1, :length]
        return last if last.dtype == torch.bool else last > torch.finfo(last.dtype).min / 2
    return None


class Runtime(HandleRuntime):
    """All steer state attached to one model."""

    attr = _RUNTIME_ATTR

    def __init__(self, model: nn.Module, adapter: Adapter) -> None:
        super().__init__(model)
        self.model = model
        self.adapter = adapter
        self.context = ForwardContext()
        self.attention_edits: dict[int, list[AttentionEdit]] = {}
        self._hooks: list[Any] = []
        self._tagged: list[nn.Module] = []
        self._saved_impl: tuple[Any, Any] | None = None
        self._wrapped: list[tuple[nn.Module, str, bool, Any]] = []

    def edits(self) -> list[Edit]:
        return [e for h in self.handles for e in h.edits]

    # ---- install / uninstall ----------------------------------------------------------------------
    def _reinstall(self) -> None:
        self._uninstall()
        if self.handles:
            self._install()

    def _install(self) -> None:
        adapter = self.adapter
        model = self.model
        edits = self.edits()
        self._hooks.append(model.register_forward_pre_hook(self._capture_context, with_kwargs=True))

        attention_edits = [e for e in edits if isinstance(e, ATTENTION_EDITS)]
        for att_edit in attention_edits:
            for layer in att_edit.resolve_layers(adapter.num_layers):
                self.attention_edits.setdefault(layer, []).append(att_edit)
        if self.attention_edits:
            attention_fn.register()
            config = adapter.attention_config
            original = config._attn_implementation_internal
            self._saved_impl = (config, original)
            backend = original if original and original != attention_fn.IMPLEMENTATION else "sdpa"
            attention_fn.set_original_backend(config, backend)
            config._attn_implementation_internal = attention_fn.IMPLEMENTATION
            for layer in self.attention_edits:
                module = adapter.attention(layer)
                # nn.Module.__setattr__ is typed for Tensor | Module values; this is a plain attribute
                module._steer_layer = attention_fn.LayerTag(self, layer)  # type: ignore[assignment]
                self._tagged.append(module)

        for edit in edits:
            if isinstance(edit, ResidualAdd):
                for layer in edit.resolve_layers(adapter.num_layers):
                    hook = self._residual_hook(edit, layer)
                    self._hooks.append(adapter.decoder_layers[layer].register_forward_hook(hook))
            elif isinstance(edit, LogitsTransform):
                self._hooks.append(adapter.lm_head.register_forward_hook(self._logits_hook(edit)))
            elif isinstance(edit, InputEdit):
                hook = self._input_hook(edit)
                self._hooks.append(adapter.text_model.register_forward_pre_hook(hook, with_kwargs=True))
            elif isinstance(edit, ModuleHook):
                target = edit.target(adapter)
                if edit.pre:
                    hook = self._module_pre_hook(edit)
                    self._hooks.append(target.register_forward_pre_hook(hook, with_kwargs=True, prepend=edit.prepend))
                else:
                    self._hooks.append(target.register_forward_hook(self._module_hook(edit), prepend=edit.prepend))
            elif isinstance(edit, MethodWrap):
                self._wrap_method(edit)

    def _uninstall(self) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks.clear()
        for target, name, had, previous in reversed(self._wrapped):
            if had:
                target.__dict__[name] = previous
            else:
                target.__dict__.pop(name, None)
        self._wrapped.clear()
        for module in self._tagged:
            module.__dict__.pop("_steer_layer", None)
        self._tagged.clear()
        self.attention_edits = {}
        if self._saved_impl is not None:
            config, original = self._saved_impl
            config._attn_implementation_internal = original
            attention_fn.forget_original_backend(config)
            self._saved_impl = None
        self.context = ForwardContext()

    # ---- per-forward context ----------------------------------------------------------------------
    def _capture_context(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        if self.bypassed:
            return
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        embeds = kwargs.get("inputs_embeds")
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        past = int(cache.get_seq_length()) if cache is not None and hasattr(cache, "get_seq_length") else 0
        reference = input_ids if input_ids is not None else embeds
        if reference is None:
            return
        batch, q_len = reference.shape[0], reference.shape[1]
        padding = _padding_from_mask(kwargs.get("attention_mask"), past + q_len)
        if past == 0:
            inputs = {k: kwargs[k] for k in _PREFILL_INPUT_KEYS if kwargs.get(k) is not None}
            image_mask = spans = None
            if input_ids is not None:
                image_mask = self.adapter.image_token_mask(input_ids)
                spans = self.adapter.image_spans(input_ids, inputs)
            self.context = ForwardContext(
                phase="prefill",
                batch_size=batch,
                query_len=q_len,
                past_length=0,
                prompt_ids=input_ids,
                image_mask=image_mask,
                image_spans=spans,
                padding_mask=padding,
                inputs=inputs,
            )
            self._check_image_tokens()
        else:
            ctx = self.context
            ctx.phase = "decode"
            ctx.batch_size = batch
            ctx.query_len = q_len
            ctx.past_length = past
            ctx.padding_mask = padding
            ctx.forward_index += 1

    def _check_image_tokens(self) -> None:
        needing = [name for h in self.handles for name in h.methods_needing_images]
        if not needing:
            return
        ctx = self.context
        if ctx.image_mask is None:
            raise MissingImageTokensError(
                f"{', '.join(needing)} needs to know where the image tokens are, but the model was called with "
                "inputs_embeds only. Call it (or generate) with input_ids from the processor."
            )
        missing = [b for b in range(ctx.batch_size) if not bool(ctx.image_mask[b].any())]
        if missing:
            raise MissingImageTokensError(
                f"{', '.join(needing)} works on image tokens, but prompt row(s) {missing} contain none "
                f"(token id {self.adapter.image_token_id}). Put the image placeholder in the prompt (the "
                "processor expands it), pass images to the processor, or remove the method for text-only prompts."
            )

    def edit_context(self, edit: Edit, layer: int | None = None) -> EditContext:
        return EditContext(
            forward=self.context,
            adapter=self.adapter,
            layer=layer,
            scratch=self.context.scratch.setdefault(id(edit), {}),
            runtime=self,
        )

    # ---- hook factories ---------------------------------------------------------------------------
    def _residual_hook(self, edit: ResidualAdd, layer: int):
        def hook(module: nn.Module, args: tuple, output: Any) -> Any:
            if self.bypassed:
                return None
            phase = self.context.phase
            if (edit.positions == "prompt" and phase != "prefill") or (edit.positions == "new" and phase != "decode"):
                return None
            vector = evaluate(edit.vector, self.edit_context(edit, layer))
            if vector is None:
                return None
            hidden = output[0] if isinstance(output, tuple) else output
            vector = vector.to(device=hidden.device, dtype=hidden.dtype)
            if vector.dim() == 2:  # [B, D]
                vector = vector[:, None, :]
            hidden = hidden + vector
            return (hidden, *output[1:]) if isinstance(output, tuple) else hidden

        return hook

    def _logits_hook(self, edit: LogitsTransform):
        def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> Any:
            if self.bypassed:
                return None
            return edit.fn(output, self.edit_context(edit))

        return hook

    def _input_hook(self, edit: InputEdit):
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> Any:
            if self.bypassed:
                return None
            new = edit.fn(dict(kwargs), self.edit_context(edit))
            return None if new is None else (args, new)

        return hook

    def _module_hook(self, edit: ModuleHook):
        def hook(module: nn.Module, args: tuple, output: Any) -> Any:
            if self.bypassed and not edit.in_aux:
                return None
            return edit.fn(module, args, output, self.edit_context(edit))

        return hook

    def _module_pre_hook(self, edit: ModuleHook):
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> Any:
            if self.bypassed and not edit.in_aux:
                return None
            return edit.fn(module, args, kwargs, self.edit_context(edit))

        return hook

    def _wrap_method(self, edit: MethodWrap) -> None:
        target = edit.target(self.adapter)
        original = getattr(target, edit.name)
        had = edit.name in target.__dict__

        @functools.wraps(original)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            if self.bypassed:
                return original(*args, **kwargs)
            return edit.fn(original, args, kwargs, self.edit_context(edit))

        self._wrapped.append((target, edit.name, had, target.__dict__.get(edit.name)))
        target.__dict__[edit.name] = wrapper

    # ---- group reweighting (called by the attention function) -------------------------------------
    def run_group_reweight(
        self,
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
        from steer.kernels.dispatch import reweighted_attention

        ctx = self.context
        k_len = key.shape[2]
        if edit.groups == "image":
            image = ctx.key_image_mask(k_len, key.device)
            if image is None:
                raise MissingImageTokensError(
                    "GroupReweight(groups='image') needs input_ids to find the image tokens; the model was "
                    "called with inputs_embeds only."
                )
            labels = image.long()
        else:
            labels = edit.groups(ectx).to(key.device).long()
            if labels.shape[1] < k_len:
                pad = labels.new_zeros(labels.shape[0], k_len - labels.shape[1])
                labels = torch.cat([labels, pad], dim=1)
            labels = labels[:, :k_len]
        rows: torch.Tensor | None
        if edit.rows == "all" or edit.rows is None:
            rows = None
        elif edit.rows == "after_image":
            rows = ctx.rows_after_first_image(query.device)
        elif edit.rows == "new":
            rows = None if ctx.phase == "decode" else torch.zeros(query.shape[0], query.shape[2], dtype=torch.bool)
        else:
            rows = edit.rows(ectx)
        if rows is not None:
            rows = rows.to(query.device)
            if not bool(rows.any()):
                return base() if callable(base) else base
        return reweighted_attention(
            query,
            key,
            value,
            mask,
            scale,
            labels,
            edit.coefficient_fn(ectx),
            rows=rows,
            renormalize=edit.renormalize,
            base_out=base,
            impl=edit.impl,
            rule=edit.coefficient_rule(ectx),
            base_lse=base_lse,
            causal=causal,
        )


class Steering:
    """The handle `steer.apply` returns: remove it (or leave its ``with`` block) and the model is as before.

    - ``params``: the resolved parameters per method name;
    - ``state``: what each method computed on the last call (sink tokens, chosen heads, kept indices...);
    - ``edits``: the low-level edits this handle installed.
    """

    def __init__(
        self,
        model: nn.Module,
        adapter: Adapter,
        edits: list[Edit],
        params: dict[str, dict[str, Any]] | None = None,
        state: dict[str, Any] | None = None,
        methods_needing_images: tuple[str, ...] = (),
    ) -> None:
        self.model = model
        self.adapter = adapter
        self.edits = list(edits)
        self.params: dict[str, dict[str, Any]] = params or {}
        self.state: dict[str, Any] = state if state is not None else {}
        self.methods_needing_images = methods_needing_images
        self._runtime: Runtime | None = None

    @property
    def methods(self) -> list[str]:
        return list(self.params)

    @property
    def active(self) -> bool:
        return self._runtime is not None

    @property
    def runtime(self) -> Runtime:
        if self._runtime is None:
            raise SteeringRemovedError("this Steering handle was removed; call steer.apply again")
        return self._runtime

    def install(self) -> Steering:
        runtime = Runtime.ensure(self.model, self.adapter)
        runtime.attach(self)
        self._runtime = runtime
        return self

    def remove(self) -> None:
        """Remove every edit of this handle; idempotent. Other handles on the same model stay."""
        runtime, self._runtime = self._runtime, None
        if runtime is not None:
            runtime.detach(self)

    def disabled(self) -> contextlib.AbstractContextManager[None]:
        """``with handle.disabled():`` runs the model with every steer edit off (e.g. for a baseline)."""
        return self.runtime.disabled()

    def __enter__(self) -> Steering:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.remove()

    def __repr__(self) -> str:
        what = ", ".join(self.methods) or f"{len(self.edits)} edit(s)"
        status = "active" if self.active else "removed"
        return f"<Steering {what} on {type(self.model).__name__} ({status})>"
