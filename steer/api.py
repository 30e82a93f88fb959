"""The front door: `apply`, `methods`, `recipe`.

``apply`` turns names and recipes into method instances (parameters validated, model facts from the
backend's adapter), checks the set (families, artifacts, order), collects their edits and hands them to the
backend, which installs them and returns the handle.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any, Union

import steer.methods  # noqa: F401  (registers the built-in methods)
from steer.edits.kinds import Edit
from steer.errors import (
    AlreadySteeredError,
    IncompatibleMethodsError,
    InvalidParameterError,
    UnsupportedModelError,
)
from steer.recipe_files import Recipe, recipe
from steer.registry import STAGES, Method, describe_params, get_method, registered, resolve_params

MethodSpec = Union[str, Recipe, Edit, Mapping[str, Mapping[str, Any]], Sequence[Union[str, Recipe, Edit]]]


def _split_spec(spec: MethodSpec) -> tuple[list[tuple[str, dict[str, Any]]], list[Edit]]:
    """Method names with recipe parameters, and raw edits, in the order given. A mapping is
    ``{name: params}`` (as a recipe's ``methods``: a configuration that serialises)."""
    if isinstance(spec, Mapping):
        bad = [k for k, v in spec.items() if not isinstance(k, str) or not isinstance(v, Mapping)]
        if bad:
            raise InvalidParameterError(
                f"cannot apply {spec!r}: a mapping must be {{method name: {{parameter: value}}}}, e.g. "
                "{'vhr': {'alpha': 0.5}}"
            )
        return [(name, dict(p)) for name, p in spec.items()], []
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


def _param_values(params: Any) -> dict[str, Any]:
    """The resolved parameters as a dict: containers copied, other objects (e.g. a mask provider holding a
    detector model) by reference, not deep-copied as ``dataclasses.asdict`` would."""
    plain = (list, tuple, dict, set)
    return {
        f.name: copy.deepcopy(value) if isinstance(value := getattr(params, f.name), plain) else value
        for f in dataclasses.fields(params)
    }


def check_artifacts(instances: Sequence[Method], already: Sequence[Method] = ()) -> None:
    """Refuse a set of methods whose artifacts do not line up (:class:`IncompatibleMethodsError`).

    An artifact is published during the call before the language model runs (the backend orders the edit
    kinds), so consumers see it whatever their stage. Refused: a method that ``requires`` an artifact nobody
    provides, and a method that ``uses`` a fact another method's artifact invalidates without consuming it.
    ``already``: methods active on the target from earlier handles.
    """
    everyone = [*already, *instances]
    for method in instances:
        for kind in method.requires:
            if not any(kind in other.provides for other in everyone if other is not method):
                raise IncompatibleMethodsError(
                    f"{method.name} needs {kind.__name__}, which none of the applied methods provides"
                )
    for method in everyone:
        for other in everyone:
            if other is method or (method not in instances and other not in instances):
                continue
            for kind in other.provides:
                broken = [fact for fact in kind.invalidates if fact in method.uses]
                if broken and kind not in method.consumes:
                    raise IncompatibleMethodsError(
                        f"{other.name} provides {kind.__name__}, which changes the {broken[0].replace('_', ' ')} "
                        f"{method.name} relies on, and {method.name} cannot read it; apply them separately"
                    )


def apply(target: Any, method: MethodSpec, **params: Any) -> Any:
    """Steer ``target`` in place and return the :class:`Steering` handle (also a context manager).

    ``method``: a registered method name, a recipe (`steer.recipe`), a low-level edit (`steer.edits`),
    a mapping ``{name: {parameter: value}}``, or a list of names, recipes and edits (composed; methods are ordered by stage: input, vision, attention, residual,
    logits). ``params`` override the method's defaults; with several methods pass ``name={...}`` per
    method or parameter names that only one of them has. Applying a method that is already active on
    the target raises :class:`AlreadySteeredError`; different methods and further handles compose.
    """
    from steer.backends import backend_for

    backend = backend_for(target)
    adapter = backend.adapter(target)  # raises UnsupportedModelError naming the supported classes
    named, raw_edits = _split_spec(method)
    family = getattr(adapter, "family", "")
    for item in [method] if isinstance(method, Recipe) else (method if isinstance(method, (list, tuple)) else []):
        if isinstance(item, Recipe) and not item.fits(family):
            raise InvalidParameterError(
                f"recipe {item.full_name} is written for {item.family}; this model is {family} "
                f"({type(target).__name__}). Use a {family} recipe (see recipes/), or steer.recipe("
                f"{item.full_name!r}, force=True) to apply these settings anyway."
            )
    names = [n for n, _ in named]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise AlreadySteeredError(f"method(s) {', '.join(duplicates)} given twice in one apply call")
    classes = {n: get_method(n) for n in names}
    if params and not named:
        raise InvalidParameterError("parameters were given but no method name to apply them to")
    merged = _distribute_params(named, classes, params)
    for name, cls in classes.items():
        if cls.target != backend.kind or (cls.families is not None and family not in cls.families):
            supported = ", ".join(cls.families or ()) or f"every {cls.target} family"
            raise UnsupportedModelError(
                f"{name} does not support {family} ({type(target).__name__}); it supports {supported}"
            )

    active = backend.active_methods(target)
    clash = [n for n in names if n in active]
    if clash:
        raise AlreadySteeredError(
            f"{', '.join(clash)} is already applied to this model ({active[clash[0]]!r}). Remove that handle "
            "first (handle.remove()), or apply different methods: they compose."
        )

    info = backend.info(adapter)
    order = sorted(names, key=lambda n: STAGES.index(classes[n].stage))
    resolved: dict[str, dict[str, Any]] = {}
    state: dict[str, Any] = {}
    instances: list[Method] = []
    for name in order:
        instance = classes[name](resolve_params(classes[name], merged[name]), info, {})
        instance.params = instance.resolve()
        instance.check()
        resolved[name] = _param_values(instance.params)
        state[name] = instance.state
        instances.append(instance)
    running = [m for m in instances if not m.is_noop()]
    others = [m for h in {id(h): h for h in active.values()}.values() for m in getattr(h, "instances", [])]
    check_artifacts(running, others)

    all_edits: list[Edit] = []
    for instance in running:
        instance.state.update(instance.initial_state())
        for edit in instance.edits():
            edit.owner = instance.name
            all_edits.append(edit)
    all_edits.extend(raw_edits)
    backend.check(adapter, all_edits, running)
    handle = backend.handle(target, adapter, all_edits, resolved, state, running)
    handle.instances = running
    return handle.install()


def methods() -> list[dict[str, Any]]:
    """Every registered method: name, one-line description, supported families, stage and parameters."""
    from steer.adapters import FAMILIES
    from steer.backends.diffusers.families import PIPELINE_FAMILIES  # imports no diffusers

    out = []
    for name, cls in sorted(registered().items()):
        every = FAMILIES if cls.target == "vlm" else PIPELINE_FAMILIES
        out.append(
            {
                "name": name,
                "description": cls.description,
                "families": list(cls.families or every),
                "target": cls.target,
                "stage": cls.stage,
                "needs_image_tokens": cls.needs_image_tokens,
                "params": describe_params(cls.Params),
            }
        )
    return out


__all__ = ["apply", "check_artifacts", "methods", "recipe"]
