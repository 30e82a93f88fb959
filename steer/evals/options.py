"""The options ``steer eval chair`` and ``steer eval pope`` share, and the run settings built from them.

The command collects its options into one :class:`RunOptions`; :meth:`RunOptions.with_defaults` fills what was
left unset (from the built-in benchmark for ``--model builtin:demo``), :meth:`RunOptions.check` refuses bad
values before anything is loaded, and :meth:`RunOptions.settings` builds the run's
`steer.evals.settings.EvalSettings` once the task is known.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from steer.errors import EvalInputError
from steer.evals import builtin, formats
from steer.evals.loading import DTYPES, quantization_config, resolve_model_name
from steer.evals.prompts import TEMPLATES
from steer.evals.settings import EvalSettings

__all__ = ["Bench", "RunOptions", "check_choice", "default_out", "method_params"]

Bench = Callable[[], builtin.BuiltinSplit]
"""Gives the built-in benchmark split (materialised on its first call only)."""

_DEFAULTS: dict[str, dict[str, tuple[int, int]]] = {
    # option -> (COCO default, built-in benchmark default)
    "chair": {"max_new_tokens": (512, 64), "batch_size": (1, 16)},
    "pope": {"max_new_tokens": (128, 16), "batch_size": (1, 16)},
}


def check_choice(value: str, allowed: tuple[str, ...], option: str) -> str:
    """``value`` when it is one of ``allowed``, else an :class:`EvalInputError` naming ``option``."""
    if value not in allowed:
        raise EvalInputError(f"unknown {option} {value!r}; expected one of {', '.join(allowed)}")
    return value


def method_params(items: list[str], methods: list[str]) -> dict[str, Any]:
    """``-p NAME=VALUE`` (JSON value, else a string); ``-p METHOD.NAME=VALUE`` targets one method."""
    out: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise EvalInputError(f"--param expects NAME=VALUE or METHOD.NAME=VALUE, got {item!r}")
        key, raw = item.split("=", 1)
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        method, _, name = key.partition(".")
        if name and method in methods:
            out.setdefault(method, {})[name] = value
        else:
            out[key] = value
    return out


@dataclass(frozen=True)
class RunOptions:
    """The options of ``steer eval chair|pope`` that are not about the task, as given on the command line.

    ``None`` for ``images``, ``max_new_tokens`` and ``batch_size`` means "not given" (see :meth:`with_defaults`).
    """

    model: str
    method: list[str] = field(default_factory=list)
    param: list[str] = field(default_factory=list)
    recipe: str | None = None
    force_recipe: bool = False
    images: Path | None = None
    num_images: int = 500
    max_new_tokens: int | None = None
    batch_size: int | None = None
    out: Path | None = None
    dtype: str = "auto"
    device_map: str | None = None
    load_in_4bit: bool = False
    load_in_8bit: bool = False
    attn_implementation: str | None = None
    template: str = "auto"
    num_beams: int = 1
    do_sample: bool = False
    temperature: float | None = None
    top_p: float | None = None
    seed: int = 0
    retry_errors: bool = False
    progress: bool = True

    @classmethod
    def from_values(cls, values: Mapping[str, Any]) -> RunOptions:
        """The options among ``values`` (a command's parameters by name); other names are ignored."""
        return cls(**{f.name: values[f.name] for f in dataclasses.fields(cls) if f.name in values})

    @property
    def methods(self) -> list[str]:
        """``--method`` values, repeats dropped."""
        return list(dict.fromkeys(self.method))

    @property
    def images_dir(self) -> Path:
        """The ``--images`` folder (set by :meth:`with_defaults` when not given)."""
        if self.images is None:
            raise ValueError("RunOptions.images_dir needs the options of with_defaults()")
        return Path(self.images)

    @property
    def quantization(self) -> str | None:
        """``4bit``, ``8bit`` or ``None``."""
        return "4bit" if self.load_in_4bit else "8bit" if self.load_in_8bit else None

    def with_defaults(self, task_name: str) -> tuple[RunOptions, Bench | None]:
        """The options with what was left unset filled in, and the built-in benchmark (``None`` unless
        ``--model builtin:demo``).

        ``--images`` naming a Hugging Face dataset (`steer.evals.formats`) is replaced by the folder of its
        images (written once into the zoo cache). With ``builtin:demo`` the defaults come from the built-in benchmark (its images, batch 16, short
        generations, the ``plain`` template the demo model was trained on). The split is written to the zoo
        cache on the first call of the returned function only, so a run whose own files replace all of the
        split's never writes it.

        Raises:
            EvalInputError: no ``--images`` for a model other than ``builtin:demo``.
        """
        bench: Bench | None = functools.cache(builtin.split) if builtin.is_builtin(self.model) else None
        filled: dict[str, Any] = {}
        for name, (coco, demo) in _DEFAULTS[task_name].items():
            if getattr(self, name) is None:
                filled[name] = demo if bench is not None else coco
        if self.images is None:
            if bench is None:
                raise EvalInputError(
                    f"--images is required (the COCO val2014 folder); or run the built-in benchmark: "
                    f"steer eval {task_name} --model {builtin.BUILTIN_DEMO}"
                )
            filled["images"] = bench().images
        elif formats.is_dataset(self.images):
            filled["images"] = formats.extract_images(self.images, progress=self.progress)
        if bench is not None and self.template == "auto":
            filled["template"] = "plain"
        return dataclasses.replace(self, **filled), bench

    def check(self) -> None:
        """Refuse bad values before anything is loaded (call after :meth:`with_defaults`).

        Raises:
            EvalInputError: a count below 1, a negative seed, a temperature <= 0, a top-p outside (0, 1],
                --temperature/--top-p without --do-sample, an unknown dtype or template, both quantizations, or
                quantization without bitsandbytes.
        """
        for option, value in (
            ("--batch-size", self.batch_size),
            ("--max-new-tokens", self.max_new_tokens),
            ("--num-beams", self.num_beams),
        ):
            if value is None or value < 1:
                raise EvalInputError(f"{option} must be >= 1, got {value}")
        if self.seed < 0:
            raise EvalInputError(f"--seed must be >= 0, got {self.seed}")
        if self.temperature is not None and not self.temperature > 0:
            raise EvalInputError(f"--temperature must be > 0, got {self.temperature}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise EvalInputError(f"--top-p must be in (0, 1], got {self.top_p}")
        if not self.do_sample and (self.temperature is not None or self.top_p is not None):
            given = [
                o for o, v in (("--temperature", self.temperature), ("--top-p", self.top_p)) if v is not None
            ]
            raise EvalInputError(
                f"{' and '.join(given)} act only when sampling: add --do-sample (greedy decoding ignores them)"
            )
        check_choice(self.dtype, DTYPES, "--dtype")
        check_choice(self.template, TEMPLATES, "--template")
        if self.load_in_4bit or self.load_in_8bit:
            quantization_config(self.load_in_4bit, self.load_in_8bit, self.dtype)

    def settings(
        self, task_name: str, selection: dict[str, Any], prompt: str, device_map: Any
    ) -> EvalSettings:
        """The run's settings: these options (defaults filled in) with the task's ``selection`` and user
        ``prompt`` and the ``device_map`` the model will be loaded with."""
        if self.max_new_tokens is None or self.batch_size is None:
            raise ValueError("RunOptions.settings needs the options of with_defaults()")
        methods = self.methods
        return EvalSettings(
            task=task_name,
            model=resolve_model_name(self.model),
            methods=methods,
            params=method_params(self.param, methods),
            recipe=self.recipe,
            force_recipe=self.force_recipe,
            dtype=self.dtype,
            quantization=self.quantization,
            attn_implementation=self.attn_implementation,
            template=self.template,
            prompt=prompt,
            max_new_tokens=self.max_new_tokens,
            num_beams=self.num_beams,
            do_sample=self.do_sample,
            temperature=1.0 if self.temperature is None else float(self.temperature),
            top_p=1.0 if self.top_p is None else float(self.top_p),
            seed=self.seed,
            selection=selection,
            batch_size=self.batch_size,
            device_map=device_map if isinstance(device_map, (str, type(None))) else str(device_map),
            images=str(self.images_dir.resolve()),
        )


def default_out(settings: EvalSettings) -> Path:
    """``runs/<task>-<model>-<methods>-<settings hash>``: one folder per distinct run, resumed when repeated."""
    model = Path(settings.model).name if "/" in settings.model else settings.model
    slug = "".join(c if c.isalnum() or c in "-._" else "-" for c in f"{model}-{settings.method_label}")
    return Path("runs") / f"{settings.task}-{slug}-{settings.stable_hash()[:8]}"
