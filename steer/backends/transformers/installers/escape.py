"""The escape hatches for users: ``ModuleHook`` (a forward (pre-)hook on any submodule) and ``MethodWrap``
(wrap a method of a submodule). Built-in methods do not use them."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from torch import nn

from steer.backends.transformers.installers.registry import installer
from steer.edits.kinds import MethodWrap, ModuleHook
from steer.errors import InvalidParameterError

if TYPE_CHECKING:
    from steer.backends.transformers.runtime import Runtime


def target_of(runtime: Runtime, module: Any) -> nn.Module:
    """A dotted path under the model, or a callable of the family adapter returning the module."""
    if callable(module):
        return module(runtime.adapter)
    return runtime.model.get_submodule(module)


def check_target(adapter: Any, edit: ModuleHook | MethodWrap) -> None:
    """The module path (and for ``MethodWrap`` the method) must exist: a typed error at apply."""
    what = type(edit).__name__
    if callable(edit.module):
        return  # resolved at install, against the adapter
    try:
        target = adapter.model.get_submodule(edit.module)
    except AttributeError:
        children = ", ".join(name for name, _ in adapter.model.named_children())
        raise InvalidParameterError(
            f"{what}: {type(adapter.model).__name__} has no submodule {edit.module!r} (a dotted path from the "
            f"model, as in model.named_modules(); top level: {children})"
        ) from None
    if isinstance(edit, MethodWrap) and not callable(getattr(target, edit.name, None)):
        raise InvalidParameterError(f"{what}: {type(target).__name__} at {edit.module!r} has no method {edit.name!r}")


def _allowed(runtime: Runtime, edit: ModuleHook) -> bool:
    run = runtime.run
    if run is None or run != "main":
        return bool(edit.in_aux)
    return True


@installer(ModuleHook, check=check_target)
def install_module_hook(runtime: Runtime, edit: ModuleHook) -> None:
    target = target_of(runtime, edit.module)
    if edit.pre:

        def pre(module: nn.Module, args: tuple, kwargs: dict) -> Any:
            if not _allowed(runtime, edit):
                return None
            return edit.fn(module, args, kwargs, runtime.edit_context(edit))

        runtime.add_hook(target.register_forward_pre_hook(pre, with_kwargs=True, prepend=edit.prepend))
    else:

        def post(module: nn.Module, args: tuple, output: Any) -> Any:
            if not _allowed(runtime, edit):
                return None
            return edit.fn(module, args, output, runtime.edit_context(edit))

        runtime.add_hook(target.register_forward_hook(post, prepend=edit.prepend))


@installer(MethodWrap, check=check_target)
def install_method_wrap(runtime: Runtime, edit: MethodWrap) -> None:
    def make(original: Any) -> Any:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            if runtime.run != "main":
                return original(*args, **kwargs)
            return edit.fn(original, args, kwargs, runtime.edit_context(edit))

        return wrapper

    runtime.wrap(target_of(runtime, edit.module), edit.name, make)


__all__ = ["check_target", "install_method_wrap", "install_module_hook", "target_of"]
