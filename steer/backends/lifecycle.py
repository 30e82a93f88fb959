"""The handle protocol both backends share.

* :class:`HandleRuntime` — one runtime per steered object (a model, a UNet), kept in the object's ``__dict__``;
  the list of active handles; "uninstall everything, install the union again" whenever a handle comes or
  goes, so the installed state is always a function of the handles; a guard that turns every edit off.
* :class:`Steering` — the handle `steer.apply` returns: ``remove()`` (idempotent), a context manager,
  ``params`` / ``state`` / ``edits`` and ``disabled()``. The backend supplies the runtime class.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from typing import Any, ClassVar, TypeVar

from steer.errors import ConcurrentSteeringError, SteeringRemovedError

R = TypeVar("R", bound="HandleRuntime")


class HandleRuntime:
    """Base class; subclasses set ``attr`` and implement :meth:`_reinstall`."""

    attr: ClassVar[str]

    def __init__(self, target: Any) -> None:
        self.target = target
        self.handles: list[Steering] = []
        self._local = threading.local()
        self._calls_lock = threading.Lock()
        self._calls: dict[int, int] = {}  # thread id -> calls of the target in flight there

    # ---- calls in flight (several threads may run the target at once; installs may not) -----------
    def enter_call(self) -> None:
        """A call of the target (a forward or a whole ``generate``) starts in this thread."""
        me = threading.get_ident()
        with self._calls_lock:
            self._calls[me] = self._calls.get(me, 0) + 1

    def exit_call(self) -> None:
        me = threading.get_ident()
        with self._calls_lock:
            left = self._calls.get(me, 0) - 1
            if left > 0:
                self._calls[me] = left
            else:
                self._calls.pop(me, None)

    def _refuse_while_running_elsewhere(self, what: str) -> None:
        me = threading.get_ident()
        with self._calls_lock:
            others = sorted(t for t in self._calls if t != me)
        if others:
            raise ConcurrentSteeringError(
                f"cannot {what} while {type(self.target).__name__} is running in another thread (thread id "
                f"{others[0]}): the change would reach that call half way. Apply or remove handles before the "
                "threads start, or after their calls return; calls of one steered model from several threads "
                "are fine."
            )

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

    # ---- the guard: every edit off (a user's baseline, auxiliary passes) -----------------------------
    @property
    def bypassed(self) -> bool:
        return getattr(self._local, "bypass", 0) > 0

    @contextlib.contextmanager
    def disabled(self) -> Iterator[None]:
        """Run with every edit disabled (in this thread)."""
        self._local.bypass = getattr(self._local, "bypass", 0) + 1
        try:
            yield
        finally:
            self._local.bypass -= 1

    # ---- handles ----------------------------------------------------------------------------------
    def attach(self, handle: Steering) -> None:
        self._refuse_while_running_elsewhere("apply a handle")
        self.handles.append(handle)
        try:
            self._reinstall()
        except BaseException:
            self.handles.remove(handle)
            self._reinstall()
            if not self.handles:
                self.target.__dict__.pop(self.attr, None)
            raise

    def detach(self, handle: Steering) -> None:
        self._refuse_while_running_elsewhere("remove a handle")
        if handle in self.handles:
            self.handles.remove(handle)
        self._reinstall()
        if not self.handles:
            self.target.__dict__.pop(self.attr, None)

    def _reinstall(self) -> None:
        raise NotImplementedError


class Steering:
    """The handle `steer.apply` returns: remove it (or leave its ``with`` block) and the target is as before.

    - ``params``: the resolved parameters per method name;
    - ``state``: what each method computed on the last call (sink tokens, chosen heads, kept indices...);
    - ``edits``: the edits this handle installed;
    - ``steered``: what was steered (the model class, or the inner model of a known wrapper).
    """

    runtime_class: type[HandleRuntime]  # a subclass sets it, or the backend passes one per handle
    instances: list[Any]

    def __init__(
        self,
        target: Any,
        adapter: Any,
        edits: list[Any],
        params: dict[str, dict[str, Any]] | None = None,
        state: dict[str, Any] | None = None,
        methods_needing_images: tuple[str, ...] = (),
        whole_prefill: tuple[str, ...] = (),
        runtime_class: type[HandleRuntime] | None = None,
    ) -> None:
        self.model = target
        self.adapter = adapter
        self.edits = list(edits)
        self.params: dict[str, dict[str, Any]] = params or {}
        self.state: dict[str, Any] = state if state is not None else {}
        self.methods_needing_images = methods_needing_images
        self.whole_prefill = whole_prefill
        if runtime_class is not None:
            self.runtime_class = runtime_class
        self.instances = []  # the method objects whose edits these are (set by steer.apply)
        self._runtime: HandleRuntime | None = None

    @property
    def methods(self) -> list[str]:
        return list(self.params)

    @property
    def active(self) -> bool:
        return self._runtime is not None

    @property
    def runtime(self) -> Any:
        if self._runtime is None:
            raise SteeringRemovedError("this Steering handle was removed; call steer.apply again")
        return self._runtime

    def runtime_args(self) -> tuple[Any, ...]:
        """Arguments of the runtime class after the target (the model's runtime also takes the adapter)."""
        return (self.adapter,)

    def runtime_target(self) -> Any:
        """The object the runtime lives on: the steered model (a pipeline handle: the pipeline's UNet)."""
        return self.model

    def install(self) -> Steering:
        runtime = self.runtime_class.ensure(self.runtime_target(), *self.runtime_args())
        runtime.attach(self)
        self._runtime = runtime
        return self

    def remove(self) -> None:
        """Remove every edit of this handle; idempotent. Other handles on the same target stay."""
        runtime = self._runtime
        if runtime is not None:
            runtime.detach(self)  # may refuse (another thread runs the model): the handle stays active
            self._runtime = None

    def disabled(self) -> contextlib.AbstractContextManager[None]:
        """``with handle.disabled():`` runs with every steer edit off (e.g. for a baseline)."""
        return self.runtime.disabled()

    def __enter__(self) -> Steering:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.remove()

    def __repr__(self) -> str:
        what = ", ".join(self.methods) or f"{len(self.edits)} edit(s)"
        status = "active" if self.active else "removed"
        return f"<Steering {what} on {type(self.model).__name__} ({status})>"


__all__ = ["HandleRuntime", "Steering"]
