"""`ProcessorEdit`: added to the steer processor of every ``attn2`` layer at its depths (one processor object per
layer, holding that layer's edits and state; `steer.backends.diffusers.processors`)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from steer.backends.diffusers.installers.registry import installer
from steer.backends.diffusers.processors import check_wrappable
from steer.edits.pipeline import ProcessorEdit
from steer.errors import InvalidParameterError

if TYPE_CHECKING:
    from steer.backends.diffusers.handle import PipelineSteering
    from steer.backends.diffusers.runtime import PipelineRuntime


def check_processor_edit(adapter: Any, edit: ProcessorEdit, runtime: PipelineRuntime | None) -> None:
    """The depths hold ``attn2`` layers and those layers run a stock processor."""
    info = adapter.info
    what = "ProcessorEdit" if not edit.owner else f"{edit.owner} (ProcessorEdit)"
    try:
        depths = edit.resolve_depths(info.available_depths())
    except ValueError as exc:
        raise InvalidParameterError(f"{what}: {exc}") from None
    current = runtime.saved if runtime is not None and runtime.saved is not None else adapter.unet.attn_processors
    for name in info.layers_at(depths):
        check_wrappable(name, current[name])


@installer(ProcessorEdit, rank=50, check=check_processor_edit)
def install_processor_edit(runtime: PipelineRuntime, handle: PipelineSteering, edit: ProcessorEdit) -> None:
    info = handle.adapter.info
    for name in info.layers_at(edit.resolve_depths(info.available_depths())):
        runtime.processor(name, info.depths[name]).add(edit, info)
    runtime.processor_edits.append((edit, info))
