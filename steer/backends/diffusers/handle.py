"""The handle `steer.apply` returns for a pipeline: the shared :class:`~steer.backends.lifecycle.Steering` with the
pipeline-only surface.

    h = steer.apply(pipe, "detector_guidance", objects=["a red cat", "a blue dog"])
    image = pipe("a red cat and a blue dog").images[0]          # the caller's own call does the work
    h.remove()                                                  # processors restored, pipe as before

    h = steer.apply(pipe, "astar", tokens=["cat", "dog"])
    image = h.pipe("a cat and a dog").images[0]                 # latent updates run in handle.pipe
    h.state["astar"]["log"]                                     # per step and image: L_seg, L_ret, ‖g‖, α
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from steer.backends.diffusers.adapter import PipelineAdapter
from steer.backends.diffusers.latents import LatentTrack
from steer.backends.diffusers.runtime import PipelineRuntime
from steer.backends.lifecycle import Steering
from steer.edits.kinds import Edit
from steer.edits.pipeline import LatentUpdate


class PipelineSteering(Steering):
    """The handle of a steered pipeline; the same public surface as :class:`steer.Steering`, plus:

    - ``pipe``: the pipeline to call — a ``from_pipe``-built one when a method updates the latent (A-STAR,
      Attend-and-Excite), else the caller's own;
    - ``source``: the pipeline whose modules are steered (the one given to ``steer.apply``);
    - :meth:`save_attention_maps`: the recorded concept maps as an image grid.

    ``remove()`` (idempotent) / the context manager restore every processor object and remove hooks and wrappers.
    The runtime lives on the UNet (:class:`~steer.backends.diffusers.runtime.PipelineRuntime`), shared by every
    handle on it.
    """

    runtime_class = PipelineRuntime

    def __init__(
        self,
        source: Any,
        adapter: PipelineAdapter,
        edits: list[Edit],
        params: dict[str, dict[str, Any]],
        state: dict[str, Any],
        pipe: Any,
    ) -> None:
        super().__init__(source, adapter, edits, params, state)
        self.source = source
        self.pipe = pipe
        latent = [e for e in edits if isinstance(e, LatentUpdate)]
        self.track = LatentTrack(pipe, latent[0], adapter.info) if latent else None

    def runtime_target(self) -> Any:
        return self.source.unet

    def runtime_args(self) -> tuple[Any, ...]:
        return ()

    def pipelines(self) -> list[Any]:
        """The pipelines whose generations this handle's edits act in."""
        return [self.source] if self.pipe is self.source else [self.source, self.pipe]

    def save_attention_maps(
        self, path: str | Path, method: str | None = None, step: int | None = None, **kwargs: Any
    ) -> Path:
        """Save the recorded per-token maps of ``method`` at ``step`` (default: its last recorded step) as an
        image grid (rows: images, columns: concepts); see :func:`steer.backends.diffusers.maps.save_attention_grid`."""
        from steer.backends.diffusers.maps import save_attention_grid

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


__all__ = ["PipelineSteering"]
