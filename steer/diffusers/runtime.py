"""The pipeline runtime: all steer state attached to one UNet, shared by every handle steering it.

One :class:`PipelineRuntime` per UNet holds the active handles. Any change (a handle added or removed) restores
the processor dict saved before the first handle and installs the union again, so what is installed is always a
function of the active handles; when the last handle goes, ``unet.set_attn_processor(saved)`` puts back the
very processor objects that were there, the hooks are removed and the pipelines' ``encode_prompt`` wrappers
deleted.

Per generation: every steered pipeline's ``encode_prompt`` (an instance-level wrapper, removed on ``remove()``)
starts a :class:`CallInfo` (prompt, images per prompt, CFG, the pipeline); a UNet forward pre-hook counts the
UNet calls of that generation (step i) and lets handles change the call (latent updates); a forward post-hook
runs what is due after the call (Detector Guidance attempts). Auxiliary passes (loss forwards) run inside
:meth:`PipelineRuntime.aux`: hooks and edits ignore them and they are not counted.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import weakref
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from steer.hooks.lifecycle import HandleRuntime

if TYPE_CHECKING:
    from steer.diffusers.plugin import PipelineSteering

_RUNTIME_ATTR = "_steer_pipeline_runtime"


@dataclass
class CallInfo:
    """One pipeline call (one generation), as seen by ``encode_prompt`` and the UNet hooks."""

    pipe: Any
    prompts: list[str] | None
    n_prompts: int
    per_prompt: int
    cfg: bool
    prompt_2: Any = None
    unet_calls: int = 0
    current: int = -1
    finished: bool = False
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def n_images(self) -> int:
        return self.n_prompts * self.per_prompt

    def num_steps(self) -> int:
        return len(self.pipe.scheduler.timesteps) if self.pipe is not None else 0


def call_info_from_encode_prompt(pipe: Any, bound: inspect.BoundArguments) -> CallInfo:
    args = bound.arguments
    prompt = args.get("prompt")
    embeds = args.get("prompt_embeds")
    if isinstance(prompt, str):
        prompts: list[str] | None = [prompt]
    elif isinstance(prompt, (list, tuple)):
        prompts = list(prompt)
    else:
        prompts = None
    n_prompts = len(prompts) if prompts is not None else (int(embeds.shape[0]) if embeds is not None else 1)
    return CallInfo(
        pipe=pipe,
        prompts=prompts,
        n_prompts=n_prompts,
        per_prompt=int(args.get("num_images_per_prompt", 1) or 1),
        cfg=bool(args.get("do_classifier_free_guidance", True)),
        prompt_2=args.get("prompt_2"),
    )


class PipelineRuntime(HandleRuntime):
    """All steer state attached to one UNet."""

    attr = _RUNTIME_ATTR

    def __init__(self, unet: Any) -> None:
        super().__init__(unet)
        self.unet = unet
        self.saved: dict[str, Any] | None = None
        self.call: CallInfo | None = None
        self._hooks: list[Any] = []
        self._wrapped: list[tuple[Any, bool, Any]] = []

    def aux(self) -> contextlib.AbstractContextManager[None]:
        """Run the UNet outside the generation: not counted, no edits (loss forwards, baselines)."""
        return self.disabled()

    def attach(self, handle: PipelineSteering) -> None:
        if self.saved is None:
            self.saved = dict(self.unet.attn_processors)
        super().attach(handle)

    def _reinstall(self) -> None:
        self._uninstall()
        if not self.handles:
            self.unet.__dict__.pop(_RUNTIME_ATTR, None)
            self.saved = None
            return
        assert self.saved is not None
        processors = dict(self.saved)
        for handle in self.handles:
            processors = handle.wrap_processors(processors)
        self.unet.set_attn_processor(processors)
        self._hooks.append(self.unet.register_forward_pre_hook(self._pre_hook, with_kwargs=True))
        self._hooks.append(self.unet.register_forward_hook(self._post_hook, with_kwargs=True))
        pipes: list[Any] = []
        for handle in self.handles:
            for pipe in handle.pipelines():
                if all(pipe is not p for p in pipes):
                    pipes.append(pipe)
        for pipe in pipes:
            self._wrap_encode_prompt(pipe)

    def _uninstall(self) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks.clear()
        for pipe, had, previous in reversed(self._wrapped):
            if had:
                pipe.__dict__["encode_prompt"] = previous
            else:
                pipe.__dict__.pop("encode_prompt", None)
        self._wrapped.clear()
        if self.saved is not None:
            self.unet.set_attn_processor(dict(self.saved))
        self.call = None

    # ---- per-call information ----------------------------------------------------------------------------------
    def _wrap_encode_prompt(self, pipe: Any) -> None:
        had = "encode_prompt" in pipe.__dict__
        previous = pipe.__dict__.get("encode_prompt")
        original = pipe.encode_prompt
        signature = inspect.signature(original)
        runtime_ref = weakref.ref(self)
        pipe_ref = weakref.ref(pipe)

        @functools.wraps(original)
        def encode_prompt(*args: Any, **kwargs: Any) -> Any:
            runtime = runtime_ref()
            target = pipe_ref()
            if runtime is not None and target is not None and not runtime.bypassed:
                bound = signature.bind(*args, **kwargs)
                bound.apply_defaults()
                runtime.begin_call(call_info_from_encode_prompt(target, bound))
            return original(*args, **kwargs)

        pipe.__dict__["encode_prompt"] = encode_prompt
        self._wrapped.append((pipe, had, previous))

    def begin_call(self, info: CallInfo) -> None:
        self.call = info
        for handle in self.handles:
            handle.on_call(info)

    # ---- UNet hooks ----------------------------------------------------------------------------------------
    def _pre_hook(self, module: torch.nn.Module, args: tuple, kwargs: dict) -> Any:
        if self.bypassed:
            return None
        call = self.call
        if call is None or call.finished:
            call = CallInfo(pipe=None, prompts=None, n_prompts=0, per_prompt=1, cfg=False)
            self.call = call
        i = call.unet_calls
        call.unet_calls += 1
        call.current = i
        timestep = args[1] if len(args) > 1 else kwargs.get("timestep")
        changed: tuple[tuple, dict] | None = None
        for handle in list(self.handles):
            result = handle.before_unet(call, i, timestep, args, kwargs)
            if result is not None:
                args, kwargs = result
                changed = result
        return changed

    def _post_hook(self, module: torch.nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        if self.bypassed:
            return None
        call = self.call
        if call is None:
            return None
        timestep = args[1] if len(args) > 1 else kwargs.get("timestep")
        for handle in list(self.handles):
            handle.after_unet(call, call.current, timestep)
        total = call.num_steps()
        if call.pipe is None or (total and call.unet_calls >= total):
            call.finished = True
        return None


__all__ = ["CallInfo", "PipelineRuntime"]
