"""Pipelines for methods that update the latent before a denoising step (A-STAR, Attend-and-Excite).

A stock pipeline gives no hook before its first UNet call that can change the loop's latent bit-exactly (the
``latents=`` input is multiplied by ``init_noise_sigma`` in ``prepare_latents``), so ``steer.apply`` builds one
of these with ``from_pipe(pipe)`` (same module objects, no copies) and returns it as ``handle.pipe``. They are
not forks: ``__call__`` is the stock one (``super().__call__``), with three diffusers-conventional additions:

* ``prepare_latents`` (overridden, calls the stock one) hands the loop's initial latent to the latent update's
  track (``_steer_track``, a `steer.backends.diffusers.latents.LatentTrack`, set while a handle is installed);
* ``to`` is skipped while ``from_pipe`` builds it (from_pipe would cast the shared modules to float32);
* a ``callback_on_step_end`` composed with the caller's own (function, `PipelineCallback` or
  `MultiPipelineCallbacks`; it still receives exactly the tensors it asked for) hands the track each new latent
  as a copy it owns, before the steps the update wants;
* the UNet forward pre-hook of the steer runtime updates that latent in place before step i's UNet call and
  rebuilds the call's input with the stock expression (``cat([z]*2)`` under CFG, ``scale_model_input``).

Without an update nothing is changed, so outputs are bit-identical to the stock pipeline's.
"""

from __future__ import annotations

import inspect
from typing import Any

from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback

from steer.errors import SteerInputError

_OFFLOAD_ATTRS = ("_all_hooks", "_offload_device", "_offload_gpu_id")


class _LatentUpdateMixin:
    """The additions shared by the SD and SDXL variants (see the module docstring)."""

    _steer_track: Any = None
    _steer_source: Any = None
    _steer_building: bool = False

    def to(self, *args: Any, **kwargs: Any) -> Any:
        # ``from_pipe`` ends with ``new_pipeline.to(dtype=torch_dtype or float32)``, which would cast the caller's
        # shared modules (fp16 UNet, fp32 VAE, ...); while steer builds the pipeline the modules keep their dtypes.
        if _LatentUpdateMixin._steer_building:
            return self
        return super().to(*args, **kwargs)  # type: ignore[misc]

    def prepare_latents(self, *args: Any, **kwargs: Any) -> Any:
        latents = super().prepare_latents(*args, **kwargs)  # type: ignore[misc]
        if self._steer_track is not None:
            self._steer_track.latents = latents
        return latents

    def _steer_check_call(self, bound: inspect.BoundArguments) -> None:
        args = bound.arguments
        name = type(self).__name__
        for key in ("timesteps", "sigmas"):
            if args.get(key) is not None:
                raise SteerInputError(f"{name}: custom {key}= are not supported while steering; use num_inference_steps")
        for key in ("ip_adapter_image", "ip_adapter_image_embeds"):
            if args.get(key) is not None:
                raise SteerInputError(f"{name}: IP-Adapter inputs are not supported while steering")
        if args.get("denoising_end") is not None:
            raise SteerInputError(f"{name}: denoising_end is not supported while steering (the steps would not match)")
        prompt_2 = args.get("prompt_2")
        if prompt_2 is not None and prompt_2 != args.get("prompt"):
            raise SteerInputError(f"{name}: prompt_2 must be None or equal to prompt while steering")

    def _steer_callback(self, bound: inspect.BoundArguments) -> None:
        """Compose the caller's callback_on_step_end with the latent hand-over to the track."""
        args = bound.arguments
        user = args.get("callback_on_step_end")
        if isinstance(user, (PipelineCallback, MultiPipelineCallbacks)):
            user_inputs = list(user.tensor_inputs)
        else:
            user_inputs = list(args.get("callback_on_step_end_tensor_inputs") or ["latents"])
        inputs = user_inputs + ([] if "latents" in user_inputs else ["latents"])
        pipeline = self

        def callback_on_step_end(pipe: Any, i: int, t: Any, callback_kwargs: dict[str, Any]) -> dict[str, Any]:
            outputs: dict[str, Any] = {}
            if user is not None:
                outputs = dict(user(pipe, i, t, {k: callback_kwargs[k] for k in user_inputs}) or {})
            latents = outputs.get("latents", callback_kwargs["latents"])
            track = pipeline._steer_track
            if track is not None and track.wants_latents_after(i):
                latents = latents.clone()  # the update overwrites this one in place before step i + 1
                outputs["latents"] = latents
                track.latents = latents
            return outputs

        args["callback_on_step_end"] = callback_on_step_end
        args["callback_on_step_end_tensor_inputs"] = inputs

    def _steer_sync_offload(self) -> None:
        source = self._steer_source
        if source is None:
            return
        for attr in _OFFLOAD_ATTRS:
            if attr in source.__dict__:
                self.__dict__[attr] = source.__dict__[attr]

    def _steer_call(self, parent: type, *args: Any, **kwargs: Any) -> Any:
        track = self._steer_track
        if track is None:
            return parent.__call__(self, *args, **kwargs)
        bound = inspect.signature(parent.__call__).bind(self, *args, **kwargs)
        self._steer_check_call(bound)
        self._steer_callback(bound)
        self._steer_sync_offload()
        track.latents = None
        try:
            return parent.__call__(*bound.args, **bound.kwargs)
        finally:
            track.latents = None


class AStarStableDiffusionPipeline(_LatentUpdateMixin, StableDiffusionPipeline):
    """`StableDiffusionPipeline` that lets steer update the latent before each step (A-STAR, Attend-and-Excite).

    Built by ``steer.apply(pipe, "astar" | "attend_and_excite", ...)`` with ``from_pipe(pipe)``; call it like the
    stock pipeline (``handle.pipe(prompt, ...)``).
    """

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._steer_call(StableDiffusionPipeline, *args, **kwargs)


class AStarStableDiffusionXLPipeline(_LatentUpdateMixin, StableDiffusionXLPipeline):
    """`StableDiffusionXLPipeline` counterpart of :class:`AStarStableDiffusionPipeline`."""

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._steer_call(StableDiffusionXLPipeline, *args, **kwargs)


def latent_pipeline_for(pipe: Any) -> Any:
    """``AStar…Pipeline.from_pipe(pipe)`` for an SD or SDXL pipeline (the same UNet, VAE, encoders, scheduler)."""
    cls = AStarStableDiffusionXLPipeline if isinstance(pipe, StableDiffusionXLPipeline) else AStarStableDiffusionPipeline
    if isinstance(pipe, cls):
        source = pipe._steer_source or pipe
    else:
        source = pipe
    _LatentUpdateMixin._steer_building = True
    try:
        new = cls.from_pipe(source)
    finally:
        _LatentUpdateMixin._steer_building = False
    new._steer_source = source
    if hasattr(source, "_progress_bar_config"):
        new.set_progress_bar_config(**source._progress_bar_config)
    return new


__all__ = ["AStarStableDiffusionPipeline", "AStarStableDiffusionXLPipeline", "latent_pipeline_for"]
