"""`LatentUpdate`: bound to its handle's from_pipe pipeline (`steer.backends.diffusers.latents.LatentTrack`);
the runtime's UNet pre-hook runs it before the steps it wants. At most one per pipeline."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from steer.backends.diffusers.installers.registry import installer
from steer.edits.kinds import Edit
from steer.edits.pipeline import LatentUpdate
from steer.errors import InvalidParameterError

if TYPE_CHECKING:
    from steer.backends.diffusers.handle import PipelineSteering
    from steer.backends.diffusers.runtime import PipelineRuntime


def check_exclusive(adapter: Any, edits: list[Edit], runtime: PipelineRuntime | None) -> None:
    """Refuse a second latent update on one pipeline (given together or already active): both would own the
    loop latent."""
    names = [e.owner or "LatentUpdate" for e in edits if isinstance(e, LatentUpdate)]
    if runtime is not None:
        names += [e.owner or "LatentUpdate" for e in runtime.edits() if isinstance(e, LatentUpdate)]
    if len(names) > 1:
        raise InvalidParameterError(
            f"{' and '.join(names)} both update the latent before each step; apply one of them (each composes "
            "with methods that only edit attention, e.g. detector_guidance)"
        )


@installer(LatentUpdate, rank=10)
def install_latent_update(runtime: PipelineRuntime, handle: PipelineSteering, edit: LatentUpdate) -> None:
    track = handle.track
    if track is None or track.edit is not edit:
        raise RuntimeError("steer: a LatentUpdate reached a handle without its pipeline")
    track.runtime = runtime
    track.pipe._steer_track = track
    runtime.tracks.append(track)
