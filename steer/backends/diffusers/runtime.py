"""The pipeline runtime: every steer edit on one UNet, for all the handles steering it.

One :class:`PipelineRuntime` per UNet (kept in ``unet.__dict__``) holds the active handles. Any change (a handle
added or removed) restores the processor dict saved before the first handle and installs the union again,
one installer per edit kind (`steer.backends.diffusers.installers`), so what is installed is always a function
of the active handles; when the last handle goes, ``unet.set_attn_processor(saved)`` puts back the very
processor objects that were there, the hooks are removed and the pipelines' ``encode_prompt`` wrappers deleted.

Per generation: every steered pipeline's ``encode_prompt`` (an instance-level wrapper) starts a
:class:`~steer.backends.diffusers.generation.Generation` and calls the edits' ``begin``; a UNet forward pre-hook
counts the generation's UNet calls (step i), runs each processor edit's ``before_step`` and the latent update due
(which may change the call's input) and opens the step's *pass*; a forward post-hook hands each processor edit
what it kept (``after_step``). A probe (:meth:`PipelineRuntime.probe`) is a nested UNet forward in its own pass:
the hooks ignore it and only the probing method's probe edits act. ``handle.disabled()`` turns all of it off.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import weakref
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, cast

import torch

from steer.backends.diffusers.generation import Generation, generation_from_encode_prompt
from steer.backends.diffusers.installers import install, ordered
from steer.backends.diffusers.latents import LatentTrack
from steer.backends.diffusers.passes import Pass, step_pass
from steer.backends.diffusers.processors import EditProcessor
from steer.backends.lifecycle import HandleRuntime, Steering
from steer.edits.kinds import MAIN, Edit
from steer.edits.pipeline import PROBE, ProcessorEdit
from steer.edits.pipeline_context import GenerationFacts, PipelineContext

if TYPE_CHECKING:
    from steer.backends.diffusers.handle import PipelineSteering

_RUNTIME_ATTR = "_steer_pipeline_runtime"


class PipelineRuntime(HandleRuntime):
    """All steer state attached to one UNet."""

    attr = _RUNTIME_ATTR

    def __init__(self, unet: Any) -> None:
        super().__init__(unet)
        self.unet = unet
        self.saved: dict[str, Any] | None = None
        self.processors: dict[str, EditProcessor] = {}
        self.processor_edits: list[tuple[ProcessorEdit, Any]] = []  # (edit, its pipeline's facts), install order
        self.tracks: list[LatentTrack] = []
        self.generation: Generation | None = None
        self._hooks: list[Any] = []
        self._wrapped: list[tuple[Any, bool, Any]] = []

    # ---- install ------------------------------------------------------------------------------------------
    @property
    def steerings(self) -> list[PipelineSteering]:
        """The active handles (every handle on a UNet is a pipeline handle)."""
        return cast("list[PipelineSteering]", self.handles)

    def attach(self, handle: Steering) -> None:
        if self.saved is None:
            self.saved = dict(self.unet.attn_processors)
        super().attach(handle)

    def processor(self, name: str, depth: int) -> EditProcessor:
        """The steer processor of layer ``name`` (created on first use, wrapping the saved processor)."""
        assert self.saved is not None
        found = self.processors.get(name)
        if found is None:
            found = self.processors[name] = EditProcessor(name, depth, self.saved[name], self)
        return found

    def _reinstall(self) -> None:
        self._uninstall()
        if not self.handles:
            self.unet.__dict__.pop(_RUNTIME_ATTR, None)
            self.saved = None
            return
        assert self.saved is not None
        for handle in self.steerings:
            for edit in ordered(handle.edits):
                install(self, handle, edit)
        if self.processors:
            self.unet.set_attn_processor({**self.saved, **self.processors})
        self._hooks.append(self.unet.register_forward_pre_hook(self._pre_hook, with_kwargs=True))
        self._hooks.append(self.unet.register_forward_hook(self._post_hook, with_kwargs=True))
        pipes: list[Any] = []
        for handle in self.steerings:
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
        for track in self.tracks:
            track.pipe._steer_track = None
            track.runtime = None
            track.latents = None
        self.tracks.clear()
        if self.processors and self.saved is not None:
            self.unet.set_attn_processor(dict(self.saved))
        self.processors = {}
        self.processor_edits.clear()
        self.generation = None

    # ---- per generation -----------------------------------------------------------------------------------
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
            if runtime is not None and target is not None and not runtime.bypassed and not runtime.probing:
                bound = signature.bind(*args, **kwargs)
                bound.apply_defaults()
                runtime.begin(generation_from_encode_prompt(target, bound))
            return original(*args, **kwargs)

        pipe.__dict__["encode_prompt"] = encode_prompt
        self._wrapped.append((pipe, had, previous))

    def begin(self, generation: Generation) -> None:
        """A generation starts: fresh per-layer memos, then every edit's ``begin`` (latent updates: only in their
        own pipeline), handles in apply order."""
        self.generation = generation
        for processor in self.processors.values():
            processor.new_generation()
        for handle in self.steerings:
            info = handle.adapter.info
            for edit in handle.edits:
                if isinstance(edit, ProcessorEdit) and edit.begin is not None:
                    edit.begin(PipelineContext(generation.facts, info, edit.owner))
                elif handle.track is not None and edit is handle.track.edit and handle.track.runs_in(generation):
                    handle.track.begin(generation)

    # ---- passes --------------------------------------------------------------------------------------------
    def current_pass(self) -> Pass | None:
        """The UNet forward steer acts in now, in this thread (None: every edit off)."""
        if self.bypassed:
            return None
        probes = getattr(self._local, "probes", None)
        if probes:
            return probes[-1]
        return getattr(self._local, "main", None)

    @property
    def probing(self) -> bool:
        """Whether a probe forward is running in this thread."""
        return bool(getattr(self._local, "probes", None))

    def _clear_kept(self) -> None:
        for processor in self.processors.values():
            processor.kept.clear()

    def collect(self, edit: ProcessorEdit) -> dict[str, Any]:
        """Remove and return what ``edit`` kept per layer in the current forward, in call order."""
        found = []
        for name, processor in self.processors.items():
            taken = processor.take(edit)
            if taken is not None:
                found.append((taken[0], name, taken[1]))
        return {name: value for _, name, value in sorted(found, key=lambda item: item[0])}

    @contextlib.contextmanager
    def _probe_pass(self, current: Pass) -> Iterator[None]:
        probes = getattr(self._local, "probes", None)
        if probes is None:
            probes = self._local.probes = []
        probes.append(current)
        self._clear_kept()
        try:
            yield
        finally:
            probes.pop()

    def probe(self, owner: str, facts: GenerationFacts, i: int, t: Any, x: torch.Tensor, **unet_kwargs: Any) -> dict[str, Any]:
        """Run the UNet on ``x`` at ``t`` as ``owner``'s probe (only its probe edits act); what they kept, by
        layer (with several probe edits of one owner, the later one's value at a layer)."""
        current = step_pass(PROBE, facts, i, t, x, owner=owner)
        with self._probe_pass(current):
            self.unet(x, t, return_dict=False, **unet_kwargs)
            kept: dict[str, Any] = {}
            for edit, _ in self.processor_edits:
                if edit.owner == owner and PROBE in edit.runs:
                    kept.update(self.collect(edit))
        return kept

    # ---- UNet hooks ----------------------------------------------------------------------------------------
    def _steps_live(self) -> Generation | None:
        """The generation the next UNet call belongs to (None: the UNet is called outside any)."""
        generation = self.generation
        if generation is None or generation.finished:
            self.generation = None
            return None
        return generation

    def _pre_hook(self, module: torch.nn.Module, args: tuple, kwargs: dict) -> Any:
        if self.bypassed or self.probing:
            return None
        self._local.main = None
        generation = self._steps_live()
        if generation is None:
            for track in self.tracks:
                track.warn_outside()
            return None
        i = generation.unet_calls
        generation.unet_calls += 1
        if i == 0:
            generation.start_steps()
        timestep = args[1] if len(args) > 1 else kwargs.get("timestep")
        sample = args[0] if args else kwargs["sample"]
        main = step_pass(MAIN, generation.facts, i, timestep, sample)
        for edit, info in self.processor_edits:
            if edit.before_step is not None and MAIN in edit.runs:
                edit.before_step(main.step(edit.owner, info))
        changed: tuple[tuple, dict] | None = None
        for track in self.tracks:
            if not track.runs_in(generation):
                track.warn_outside()
                continue
            result = track.before_unet(generation, i, timestep, args, kwargs)
            if result is not None:
                args, kwargs = changed = result
        self._clear_kept()
        self._local.main = main
        return changed

    def _post_hook(self, module: torch.nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        if self.bypassed or self.probing:
            return None
        main: Pass | None = getattr(self._local, "main", None)
        self._local.main = None
        generation = self.generation
        if main is None or generation is None:
            return None
        for edit, info in self.processor_edits:
            if edit.after_step is not None and MAIN in edit.runs:
                edit.after_step(self.collect(edit), main.step(edit.owner, info))
        total = generation.facts.num_steps
        if total and generation.unet_calls >= total:
            generation.finished = True
        return None

    def edits(self) -> list[Edit]:
        return [e for h in self.handles for e in h.edits]


__all__ = ["PipelineRuntime"]
