"""``steer.apply(pipe, ...)`` for diffusers pipelines and the handle it returns.

    h = steer.apply(pipe, "detector_guidance", objects=["a red cat", "a blue dog"])
    image = pipe("a red cat and a blue dog").images[0]          # the caller's own call does the work
    h.remove()                                                  # processors restored, pipe as before

    h = steer.apply(pipe, "astar", tokens=["cat", "dog"])
    image = h.pipe("a cat and a dog").images[0]                 # latent-update methods run in handle.pipe
    h.state["astar"]["log"]                                     # per step and image: L_seg, L_ret, ‖g‖, α

Methods that update the latent (A-STAR, Attend-and-Excite) need a hook before the first UNet call that a stock
pipeline does not have, so their handle's ``pipe`` is a pipeline made with ``from_pipe`` on the same modules
(:mod:`steer.diffusers.pipelines`); Detector Guidance works on the caller's pipeline itself (and inside
``handle.pipe`` when combined).
"""

from __future__ import annotations

import contextlib
import dataclasses
from pathlib import Path
from typing import Any

from steer.diffusers.common import PipelineAdapter
from steer.diffusers.methods import Controller, PipelineMethod
from steer.diffusers.runtime import CallInfo, PipelineRuntime
from steer.errors import (
    AlreadySteeredError,
    InvalidParameterError,
    SteeringRemovedError,
    UnsupportedModelError,
)
from steer.hooks.manager import Steering


class PipelineSteering(Steering):
    """The handle `steer.apply` returns for a pipeline; the same public surface as :class:`steer.Steering`.

    - ``pipe``: the pipeline to call — ``from_pipe``-built for A-STAR / Attend-and-Excite, else the caller's own;
    - ``source``: the pipeline given to ``steer.apply``;
    - ``params``: resolved parameters per method; ``state``: per method, what the last generation computed
      (losses per step and image, recorded concept maps, retention masks, detection attempts and masks);
    - ``remove()`` (idempotent) / context manager: every processor object restored, hooks and wrappers gone.
    """

    def __init__(
        self,
        source: Any,
        adapter: PipelineAdapter,
        controllers: list[Controller],
        params: dict[str, dict[str, Any]],
        state: dict[str, Any],
        pipe: Any,
    ) -> None:
        super().__init__(source, adapter, [], params, state)  # type: ignore[arg-type]
        self.source = source
        self.pipe = pipe
        self.controllers = controllers
        self._pipe_runtime: PipelineRuntime | None = None

    # ---- Steering surface ------------------------------------------------------------------------------
    @property
    def active(self) -> bool:
        return self._pipe_runtime is not None

    @property
    def runtime(self) -> PipelineRuntime:  # type: ignore[override]
        if self._pipe_runtime is None:
            raise SteeringRemovedError("this Steering handle was removed; call steer.apply again")
        return self._pipe_runtime

    def install(self) -> PipelineSteering:
        runtime = PipelineRuntime.ensure(self.source.unet)
        for controller in self.controllers:
            controller.runtime = runtime
        if self.pipe is not self.source:
            self.pipe._steer_controller = next(
                (c for c in self.controllers if hasattr(c, "wants_latents_after")), None
            )
        try:
            runtime.attach(self)
        except BaseException:
            if self.pipe is not self.source:
                self.pipe._steer_controller = None
            raise
        self._pipe_runtime = runtime
        return self

    def remove(self) -> None:
        """Remove this handle's processors and hooks; idempotent. Other handles on the same UNet stay."""
        runtime, self._pipe_runtime = self._pipe_runtime, None
        if runtime is None:
            return
        runtime.detach(self)
        if self.pipe is not self.source:
            self.pipe._steer_controller = None
        for controller in self.controllers:
            controller.detach()

    def disabled(self) -> contextlib.AbstractContextManager[None]:
        """``with handle.disabled():`` runs the UNet with every steer processor and update off."""
        return self.runtime.aux()

    def __repr__(self) -> str:
        status = "active" if self.active else "removed"
        return f"<Steering {', '.join(self.methods)} on {type(self.source).__name__} ({status})>"

    # ---- what the runtime asks ----------------------------------------------------------------------------
    def pipelines(self) -> list[Any]:
        return [self.source] if self.pipe is self.source else [self.source, self.pipe]

    def wrap_processors(self, processors: dict[str, Any]) -> dict[str, Any]:
        for controller in self.controllers:
            processors = controller.wrap(processors)
        return processors

    def on_call(self, info: CallInfo) -> None:
        for controller in self.controllers:
            controller.on_call(info)

    def before_unet(self, call: CallInfo, i: int, t: Any, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        changed = None
        for controller in self.controllers:
            result = controller.before_unet(call, i, t, args, kwargs)
            if result is not None:
                args, kwargs = result
                changed = result
        return changed

    def after_unet(self, call: CallInfo, i: int, t: Any) -> None:
        for controller in self.controllers:
            controller.after_unet(call, i, t)

    # ---- maps --------------------------------------------------------------------------------------------
    def save_attention_maps(
        self, path: str | Path, method: str | None = None, step: int | None = None, **kwargs: Any
    ) -> Path:
        """Save the recorded per-token maps of ``method`` at ``step`` (default: its last recorded step) as an
        image grid (rows: images, columns: concepts); see :func:`steer.diffusers.maps.save_attention_grid`."""
        from steer.diffusers.maps import save_attention_grid

        recorded = [m for m in self.methods if self.state.get(m, {}).get("maps")]
        name = method or (recorded[0] if recorded else None)
        if name is None or not self.state.get(name, {}).get("maps"):
            raise ValueError("no attention maps were recorded yet: run handle.pipe(...) first")
        maps = self.state[name]["maps"]
        key = max(maps) if step is None else step
        if key not in maps:
            raise ValueError(f"no maps recorded at step {key}; recorded steps: {sorted(maps)}")
        labels = kwargs.pop("labels", None)
        if labels is None:
            labels = self.state[name].get("labels")
        return save_attention_grid(maps[key], path, labels=labels, **kwargs)


def apply_pipeline(pipe: Any, method: Any, **params: Any) -> PipelineSteering:
    """`steer.apply` for a diffusers pipeline (see the module docstring)."""
    from steer.api import _distribute_params, _split_spec
    from steer.diffusers.pipelines import latent_pipeline_for
    from steer.registry import get_method, resolve_params

    adapter = PipelineAdapter.of(pipe)  # raises UnsupportedModelError naming the supported pipelines
    source = getattr(pipe, "_steer_source", None) or pipe
    if source is not pipe:
        adapter = PipelineAdapter.of(source)
    named, edits = _split_spec(method)
    if edits:
        raise InvalidParameterError(
            "low-level edits (steer.edits) act on vision-language models; pipelines take the methods "
            "astar, attend_and_excite, detector_guidance"
        )
    names = [n for n, _ in named]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise AlreadySteeredError(f"method(s) {', '.join(duplicates)} given twice in one apply call")
    if params and not named:
        raise InvalidParameterError("parameters were given but no method name to apply them to")
    found = {n: get_method(n) for n in names}
    for name, cls in found.items():
        if adapter.family not in cls.families or not issubclass(cls, PipelineMethod):
            raise UnsupportedModelError(
                f"{name} does not support {adapter.family} pipelines ({type(pipe).__name__}); it supports "
                f"{', '.join(cls.families)}. Pipeline methods: astar, attend_and_excite, detector_guidance."
            )
    classes: dict[str, type[PipelineMethod]] = {n: c for n, c in found.items() if issubclass(c, PipelineMethod)}
    merged = _distribute_params(named, dict(found), params)

    runtime = PipelineRuntime.of(source.unet)
    if runtime is not None:
        active = {m: h for h in runtime.handles for m in h.methods}
        clash = [n for n in names if n in active]
        if clash:
            raise AlreadySteeredError(
                f"{', '.join(clash)} is already applied to this pipeline ({active[clash[0]]!r}). Remove that handle "
                "first (handle.remove()), or apply different methods: they compose."
            )
    latent = [n for n in names if classes[n].updates_latents]
    if runtime is not None:
        latent += [m for h in runtime.handles for m in h.methods if getattr(get_method(m), "updates_latents", False)]
    if len(latent) > 1:
        raise InvalidParameterError(
            f"{' and '.join(latent)} both update the latent before each step; apply one of them (each composes "
            "with detector_guidance)"
        )

    order = sorted(names, key=lambda n: not classes[n].updates_latents)  # latent updates first, then edits
    resolved: dict[str, dict[str, Any]] = {}
    state: dict[str, Any] = {}
    controllers: list[Controller] = []
    instances: list[PipelineMethod] = []
    for name in order:
        cls = classes[name]
        p = resolve_params(cls, merged[name])
        state[name] = {}
        instance = cls(p, adapter, state[name])  # type: ignore[arg-type]
        instance.check()
        resolved[name] = {f.name: getattr(p, f.name) for f in dataclasses.fields(p)}
        instances.append(instance)
    steer_pipe = latent_pipeline_for(source) if latent and any(classes[n].updates_latents for n in names) else source
    for instance in instances:
        instance.adapter = dataclasses.replace(adapter, pipe=steer_pipe) if instance.updates_latents else adapter
        controllers.append(instance.controller())
    handle = PipelineSteering(source, adapter, controllers, resolved, state, steer_pipe)
    return handle.install()


__all__ = ["PipelineSteering", "apply_pipeline"]
