"""The installer registry of the diffusers backend: which function installs each pipeline edit kind."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from steer.edits.kinds import Edit
from steer.errors import InvalidParameterError

if TYPE_CHECKING:
    from steer.backends.diffusers.handle import PipelineSteering
    from steer.backends.diffusers.runtime import PipelineRuntime

Install = Callable[["PipelineRuntime", "PipelineSteering", Any], None]


@dataclass(frozen=True)
class Installer:
    install: Install
    rank: int = 50
    check: Callable[[Any, Any, Any], None] | None = None


INSTALLERS: dict[type, Installer] = {}


def installer(kind: type[Edit], rank: int = 50, check: Callable[[Any, Any, Any], None] | None = None) -> Callable[[Install], Install]:
    """Register the decorated function as the installer of ``kind``."""

    def register(fn: Install) -> Install:
        INSTALLERS[kind] = Installer(fn, rank, check)
        return fn

    return register


def installer_for(edit: Any) -> Installer:
    for kind in type(edit).__mro__:
        found = INSTALLERS.get(kind)
        if found is not None:
            return found
    raise InvalidParameterError(
        f"{type(edit).__name__} does not act on diffusers pipelines; pipelines take the pipeline edits "
        "steer.edits.ProcessorEdit and steer.edits.LatentUpdate (the other kinds act on vision-language models), "
        "or the methods listed by steer.methods() for the families sd, sdxl"
    )


def ordered(edits: Iterable[Edit]) -> list[Edit]:
    """``edits`` in install order: by their installer's rank, then as given."""
    return sorted(edits, key=lambda e: installer_for(e).rank)


def install(runtime: PipelineRuntime, handle: PipelineSteering, edit: Edit) -> None:
    installer_for(edit).install(runtime, handle, edit)


def check(adapter: Any, edit: Edit, runtime: PipelineRuntime | None) -> None:
    """Refuse an edit the pipeline cannot take (typed error) before anything is installed; ``runtime``: the
    UNet's runtime when other handles are active."""
    found = installer_for(edit)
    if found.check is not None:
        found.check(adapter, edit, runtime)


__all__ = ["INSTALLERS", "Installer", "check", "install", "installer", "installer_for", "ordered"]
