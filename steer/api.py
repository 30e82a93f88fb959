"""The front door: `apply`, `methods`, `recipe`."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any, Union

from torch import nn

from steer.adapters import adapter_for
from steer.edits import Edit
from steer.errors import AlreadySteeredError, InvalidParameterError, UnsupportedModelError
from steer.hooks.manager import Runtime, Steering
from steer.recipe_files import Recipe, recipe
from steer.registry import STAGES, Method, describe_params, get_method, registered, resolve_params

MethodSpec = Union[str, Recipe, Edit, Sequence[Union[str, Recipe, Edit]]]


def _is_pipeline(obj: Any) -> bool:
    return hasattr(obj, "unet") or hasattr(obj, "transformer") and hasattr(obj, "scheduler")


def _split_spec(spec: MethodSpec) -> tuple[list[tuple[str, dict[str, Any]]], list[Edit]]:
    """Method names with recipe parameters, and raw edits, in the order given."""
    items = [spec] if isinstance(spec, (str, Recipe, Edit)) else list(spec)
    named: list[tuple[str, dict[str, Any]]] = []
    edits: list[Edit] = []
    for item in items:
        if isinstance(item, str):
            named.append((item, {}))
        elif isinstance(item, Recipe):
            named.extend((name, dict(p)) for name, p in item.methods.items())
        elif isinstance(item, Edit):
            edits.append(item)
        else:
            raise InvalidParameterError(
                f"cannot apply {item!r}: give a method name (see steer.methods()), a recipe (steer.recipe(...)), "
                "an edit from steer.edits, or a list of those"
            )
    return named, edits


def _distribute_params(
    named: list[tuple[str, dict[str, Any]]], classes: dict[str, type[Method]], params: dict[str, Any]
) -> dict[str, dict[str, Any]]:
    """Merge user parameters into each method's: ``apply(m, ["a", "b"], a={...})`` or unambiguous flat names."""
    merged = {name: dict(p) for name, p in named}
    for key, value in params.items():
        if key in merged and isinstance(value, dict):
            merged[key].update(value)
            continue
        owners = [n for n in merged if key in {f.name for f in dataclasses.fields(classes[n].Params)}]
        if len(owners) == 1:
            merged[owners[0]][key] = value
        elif len(owners) > 1:
            raise InvalidParameterError(
                f"parameter {key!r} belongs to several methods ({', '.join(owners)}); pass it per method, "
                f"e.g. {owners[0]}={{{key!r}: {value!r}}}"
            )
        elif len(merged) == 1:
            name = next(iter(merged))
            resolve_params(classes[name], {key: value})  # raises the detailed unknown-parameter error
        else:
            raise InvalidParameterError(
                f"parameter {key!r} belongs to none of {', '.join(merged)}; "
                "see steer.methods() for each method's parameters"
            )
    return merged


def apply(target: nn.Module, method: MethodSpec, **params: Any) -> Steering:
    """Steer ``target`` in place and return the :class:`Steering` handle (also a context manager).

    ``method``: a registered method name, a recipe (`steer.recipe`), a low-level edit (`steer.edits`),
    or a list of those (composed; methods are ordered by stage: input, vision, attention, residual,
    logits). ``params`` override the method's defaults; with several methods pass ``name={...}`` per
    method or parameter names that only one of them has. Applying a method that is already active on
    the model raises :class:`AlreadySteeredError`; different methods and further handles compose.
    """
    if _is_pipeline(target):
        # diffusers pipelines: StableDiffusionPipeline / StableDiffusionXLPipeline go to the plugin, which raises
        # UnsupportedModelError naming the supported pipelines for any other one.
        from steer.diffusers.plugin import apply_pipeline

        return apply_pipeline(target, method, **params)
    adapter = adapter_for(target)
    named, edits = _split_spec(method)
    names = [n for n, _ in named]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise AlreadySteeredError(f"method(s) {', '.join(duplicates)} given twice in one apply call")
    classes = {n: get_method(n) for n in names}
    if params and not named:
        raise InvalidParameterError("parameters were given but no method name to apply them to")
    merged = _distribute_params(named, classes, params)

    runtime = Runtime.of(target)
    if runtime is not None:
        active = {m: h for h in runtime.handles for m in h.methods}
        clash = [n for n in names if n in active]
        if clash:
            raise AlreadySteeredError(
                f"{', '.join(clash)} is already applied to this model ({active[clash[0]]!r}). Remove that handle "
                "first (handle.remove()), or apply different methods: they compose."
            )

    order = sorted(names, key=lambda n: STAGES.index(classes[n].stage))
    resolved: dict[str, dict[str, Any]] = {}
    state: dict[str, Any] = {}
    all_edits: list[Edit] = []
    needing_images: list[str] = []
    for name in order:
        cls = classes[name]
        if adapter.family not in cls.families:
            raise UnsupportedModelError(
                f"{name} does not support {adapter.family} ({type(target).__name__}); it supports "
                f"{', '.join(cls.families)}"
            )
        p = resolve_params(cls, merged[name])
        state[name] = {}
        instance = cls(p, adapter, state[name])
        instance.check()
        resolved[name] = dataclasses.asdict(p)
        if instance.is_noop():
            continue
        all_edits.extend(instance.edits())
        if instance.needs_image_tokens:  # a method may need them only in some settings
            needing_images.append(name)
    all_edits.extend(edits)
    handle = Steering(target, adapter, all_edits, resolved, state, tuple(needing_images))
    return handle.install()


def methods() -> list[dict[str, Any]]:
    """Every registered method: name, one-line description, supported families, stage and parameters."""
    out = []
    for name, cls in sorted(registered().items()):
        out.append(
            {
                "name": name,
                "description": cls.description,
                "families": list(cls.families),
                "stage": cls.stage,
                "needs_image_tokens": cls.needs_image_tokens,
                "params": describe_params(cls.Params),
            }
        )
    return out


__all__ = ["apply", "methods", "recipe"]
