"""The lifecycle every steer runtime shares (a model's in `steer.hooks.manager`, a UNet's in
`steer.diffusers.runtime`): one runtime per steered object, kept in the object's ``__dict__``; the list of
active handles; a guard that disables every edit for auxiliary passes; and "uninstall everything, install the
union again" whenever a handle comes or goes, so the installed state is always a function of the handles."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any, ClassVar, TypeVar

R = TypeVar("R", bound="HandleRuntime")


class HandleRuntime:
    """Base class; subclasses set ``attr`` and implement :meth:`_reinstall`."""

    attr: ClassVar[str]

    def __init__(self, target: Any) -> None:
        self.target = target
        self.handles: list[Any] = []
        self._bypass = 0

    @classmethod
    def of(cls: type[R], target: Any) -> R | None:
        return target.__dict__.get(cls.attr)

    @classmethod
    def ensure(cls: type[R], target: Any, *args: Any) -> R:
        runtime = cls.of(target)
        if runtime is None:
            runtime = cls(target, *args)
            target.__dict__[cls.attr] = runtime
        return runtime

    # ---- the guard for auxiliary passes -----------------------------------------------------------
    @property
    def bypassed(self) -> bool:
        return self._bypass > 0

    @contextlib.contextmanager
    def disabled(self) -> Iterator[None]:
        """Run with every edit disabled (auxiliary passes)."""
        self._bypass += 1
        try:
            yield
        finally:
            self._bypass -= 1

    # ---- handles ----------------------------------------------------------------------------------
    def attach(self, handle: Any) -> None:
        self.handles.append(handle)
        try:
            self._reinstall()
        except BaseException:
            self.handles.remove(handle)
            self._reinstall()
            raise

    def detach(self, handle: Any) -> None:
        if handle in self.handles:
            self.handles.remove(handle)
        self._reinstall()
        if not self.handles:
            self.target.__dict__.pop(self.attr, None)

    def _reinstall(self) -> None:
        raise NotImplementedError
