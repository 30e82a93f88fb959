"""The method registry: a method is a named declaration of edits with validated parameters.

A method subclasses :class:`Method`, gives its parameters as a dataclass (defaults from the paper; ranges
and choices in field metadata), and turns resolved parameters into edits in :meth:`Method.edits`. It sees
the model only as facts (:class:`~steer.edits.facts.ModelInfo`, or a pipeline's info), never a module.
Register with ``@register``; third-party packages register through the ``steer.methods`` entry point
(the entry point loads a module or a `Method` subclass). The registry imports no method: `steer.api`
imports the built-in ones.
"""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Callable, Mapping
from dataclasses import MISSING, dataclass, field, fields
from importlib.metadata import entry_points
from typing import Any, ClassVar

from steer.edits.artifacts import Artifact
from steer.edits.kinds import Edit
from steer.errors import InvalidParameterError, UnknownMethodError


def param(
    default: Any = MISSING,
    *,
    help: str,
    range: tuple[float | None, float | None] | None = None,
    choices: tuple[Any, ...] | None = None,
    default_factory: Callable[[], Any] | None = None,
) -> Any:
    """A method parameter: its default, one-line help, and its valid range (inclusive) or choices."""
    metadata = {"help": help, "range": range, "choices": choices}
    if default_factory is not None:
        return field(default_factory=default_factory, metadata=metadata)
    return field(default=default, metadata=metadata)


class Method:
    """Base class of a registered method.

    Class attributes:

    - ``name``, ``description`` (one line), ``Params`` (a dataclass of validated parameters);
    - ``target``: ``"vlm"`` (a vision-language model) or ``"pipeline"`` (a diffusers pipeline); ``families``:
      the families it supports, None = every family of its target (unsupported settings are refused in
      :meth:`check` with a typed error);
    - ``stage`` (input, vision, attention, residual, logits: the composition order);
    - ``needs_image_tokens``: every prompt row must hold image tokens; ``whole_prefill``: image blocks must not be
      split over several prefill calls;
    - ``provides`` / ``consumes`` / ``requires``: artifact types it publishes / reads when another method
      publishes them / cannot run without; ``uses``: facts it relies on (an artifact that invalidates one of
      them must be consumed).

    An instance holds the resolved params, the model's facts (``model``: a
    :class:`~steer.edits.facts.ModelInfo` for VLMs) and the handle's state dict for this method
    (``Steering.state[name]``). Lifecycle at ``steer.apply``: :meth:`resolve` (fill model-dependent defaults),
    :meth:`check`, :meth:`is_noop`, :meth:`initial_state`, :meth:`edits`; none of them touches the model.
    """

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    target: ClassVar[str] = "vlm"
    families: ClassVar[tuple[str, ...] | None] = None
    stage: ClassVar[str] = "attention"
    needs_image_tokens: ClassVar[bool] = False
    whole_prefill: ClassVar[bool] = False
    provides: ClassVar[tuple[type[Artifact], ...]] = ()
    consumes: ClassVar[tuple[type[Artifact], ...]] = ()
    requires: ClassVar[tuple[type[Artifact], ...]] = ()
    uses: ClassVar[tuple[str, ...]] = ()
    Params: ClassVar[type] = dataclass(type("NoParams", (), {}))

    def __init__(self, params: Any, model: Any, state: dict[str, Any]) -> None:
        self.params = params
        self.model = model
        self.state = state

    def resolve(self) -> Any:
        """The parameters with model-dependent defaults filled in (a new Params; default: unchanged)."""
        return self.params

    def check(self) -> None:
        """Validate the params against the model (layer indices, head indices...); raise InvalidParameterError."""

    def is_noop(self) -> bool:
        """True when the parameters make the method the identity (then nothing is installed)."""
        return False

    def image_tokens_needed(self) -> bool:
        """Whether every prompt row must hold image tokens with these parameters (default: the class's flag)."""
        return self.needs_image_tokens

    def initial_state(self) -> dict[str, Any]:
        """What ``Steering.state[name]`` holds before the first call (resolved settings)."""
        return {}

    def edits(self) -> list[Edit]:
        raise NotImplementedError


_REGISTRY: dict[str, type[Method]] = {}
_ENTRY_POINTS_LOADED = False

STAGES = ("input", "vision", "attention", "residual", "logits")


def register(cls: type[Method]) -> type[Method]:
    """Class decorator: make a method available to `steer.apply` by its ``name``."""
    if not cls.name:
        raise ValueError(f"{cls.__name__} has no name")
    if cls.stage not in STAGES:
        raise ValueError(f"{cls.__name__}.stage must be one of {STAGES}, got {cls.stage!r}")
    if not dataclasses.is_dataclass(cls.Params):
        raise TypeError(f"{cls.__name__}.Params must be a dataclass")
    _REGISTRY[cls.name] = cls
    return cls


def _load_entry_points() -> None:
    global _ENTRY_POINTS_LOADED
    if _ENTRY_POINTS_LOADED:
        return
    _ENTRY_POINTS_LOADED = True
    for ep in entry_points(group="steer.methods"):
        obj = ep.load()
        if isinstance(obj, type) and issubclass(obj, Method) and obj.name not in _REGISTRY:
            register(obj)


def registered() -> dict[str, type[Method]]:
    """Every registered method by name (built-in ones once `steer.methods` is imported, as `steer` does)."""
    _load_entry_points()
    return dict(_REGISTRY)


def get_method(name: str) -> type[Method]:
    methods = registered()
    if name not in methods:
        import difflib

        close = difflib.get_close_matches(name, list(methods), n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise UnknownMethodError(
            f"unknown method {name!r}.{hint} Registered methods: {', '.join(sorted(methods))} "
            "(see steer.methods() for what each does)."
        )
    return methods[name]


# ---------------------------------------------------------------------------------------------------
# parameter validation


def describe_params(params_cls: type) -> list[dict[str, Any]]:
    """Name, default, help and valid range/choices of each parameter."""
    out = []
    for f in fields(params_cls):
        default = f.default if f.default is not MISSING else (f.default_factory() if f.default_factory is not MISSING else None)
        out.append({"name": f.name, "default": default, **f.metadata})
    return out


def _valid_text(meta: Mapping[str, Any]) -> str:
    if meta.get("choices"):
        return "one of " + ", ".join(repr(c) for c in meta["choices"])
    if meta.get("range"):
        lo, hi = meta["range"]
        lo_text = "-inf" if lo is None else f"{lo:g}"
        hi_text = "inf" if hi is None else f"{hi:g}"
        return f"in [{lo_text}, {hi_text}]"
    return ""


def _check_type(method: str, name: str, value: Any, annotation: Any) -> Any:
    """Coerce ints to floats where a float is expected; reject values of the wrong type."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if annotation is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if annotation in (float, int, bool, str):
        ok = isinstance(value, annotation) and not (annotation is not bool and isinstance(value, bool))
        if not ok:
            raise InvalidParameterError(
                f"{method}: parameter {name!r} must be {annotation.__name__}, got {type(value).__name__} {value!r}"
            )
        return value
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        for arg in args:
            if arg is type(None) and value is None:
                return value
            try:
                return _check_type(method, name, value, arg)
            except InvalidParameterError:
                continue
        raise InvalidParameterError(f"{method}: parameter {name!r} has the wrong type: {value!r} (expected {annotation})")
    if origin in (list, tuple) or annotation in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise InvalidParameterError(f"{method}: parameter {name!r} must be a list, got {value!r}")
        inner = args[0] if args else None
        if inner is not None and inner is not Ellipsis:
            value = [_check_type(method, name, v, inner) for v in value]
        return list(value)
    if origin is typing.Literal:
        if value not in args:
            raise InvalidParameterError(
                f"{method}: parameter {name!r} must be one of {', '.join(repr(a) for a in args)}, got {value!r}"
            )
        return value
    return value


def resolve_params(method_cls: type[Method], given: dict[str, Any]) -> Any:
    """Build the method's Params from ``given``: unknown names, wrong types and out-of-range values raise
    :class:`InvalidParameterError` with the valid names and ranges."""
    params_cls = method_cls.Params
    hints = typing.get_type_hints(params_cls)
    known = {f.name: f for f in fields(params_cls)}
    unknown = [k for k in given if k not in known]
    if unknown:
        listing = "; ".join(
            f"{d['name']} (default {d['default']!r}{', ' + _valid_text(d) if _valid_text(d) else ''})"
            for d in describe_params(params_cls)
        ) or "none"
        raise InvalidParameterError(
            f"{method_cls.name}: unknown parameter(s) {', '.join(map(repr, unknown))}. Valid parameters: {listing}."
        )
    values = {}
    for name, value in given.items():
        meta = known[name].metadata
        value = _check_type(method_cls.name, name, value, hints.get(name, Any))
        choices = meta.get("choices")
        if choices and value not in choices:
            raise InvalidParameterError(
                f"{method_cls.name}: {name}={value!r} is not valid; use {_valid_text(meta)} ({meta.get('help', '')})"
            )
        bounds = meta.get("range")
        if bounds and isinstance(value, (int, float)) and not isinstance(value, bool):
            lo, hi = bounds
            if (lo is not None and value < lo) or (hi is not None and value > hi):
                raise InvalidParameterError(
                    f"{method_cls.name}: {name}={value!r} is out of range; it must be {_valid_text(meta)} "
                    f"({meta.get('help', '')})"
                )
        values[name] = value
    return params_cls(**values)
