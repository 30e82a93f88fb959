"""The installer registry: which function installs each edit kind (see the package docstring)."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from steer.edits.kinds import Edit
from steer.errors import InvalidParameterError

if TYPE_CHECKING:
    from steer.backends.transformers.runtime import Runtime


@dataclass(frozen=True)
class Installer:
    install: Callable[[Runtime, Any], None]
    rank: int = 50
    check: Callable[[Any, Any], None] | None = None


INSTALLERS: dict[type, Installer] = {}


def installer(
    *kinds: type[Edit], rank: int = 50, check: Callable[[Any, Any], None] | None = None
) -> Callable[[Callable[[Runtime, Any], None]], Callable[[Runtime, Any], None]]:
    """Register the decorated function as the installer of ``kinds``."""

    def register(fn: Callable[[Runtime, Any], None]) -> Callable[[Runtime, Any], None]:
        for kind in kinds:
            INSTALLERS[kind] = Installer(fn, rank, check)
        return fn

    return register


def installer_for(edit: Edit) -> Installer:
    for kind in type(edit).__mro__:
        found = INSTALLERS.get(kind)
        if found is not None:
            return found
    raise InvalidParameterError(
        f"{type(edit).__name__} does not act on vision-language models; they take the edits of steer.edits.kinds "
        "(HeadScale, GroupReweight, Transform, Collect, SourceRun, Positions, PruneVisionTokens, ...); "
        "ProcessorEdit and LatentUpdate are for diffusers pipelines"
    )


def ordered(edits: Iterable[Edit]) -> list[Edit]:
    """``edits`` in install order: by their installer's rank, then as given."""
    return sorted(edits, key=lambda e: installer_for(e).rank)


def install(runtime: Runtime, edit: Edit) -> None:
    installer_for(edit).install(runtime, edit)


def check(adapter: Any, edit: Edit) -> None:
    """Refuse an edit the model cannot take (typed error) before anything is installed."""
    found = installer_for(edit)
    if found.check is not None:
        found.check(adapter, edit)


__all__ = ["INSTALLERS", "Installer", "check", "install", "installer", "installer_for", "ordered"]
