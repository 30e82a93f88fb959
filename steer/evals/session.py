"""What a run needs before it generates: the model loaded, the steer methods applied, the template resolved.

:func:`open_session` does it once; :func:`session_loader` wraps it as the ``load()`` that
`steer.evals.run.generate_shard` calls only when something is left to generate, and records what loading
revealed in the run's ``settings.json``.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import steer
from steer.errors import EvalInputError
from steer.evals.loading import LoadedModel, load_model
from steer.evals.prompts import build_prompt, resolve_template
from steer.evals.provenance import environment, generation_record, model_record
from steer.evals.settings import EvalSettings, record_resolved

__all__ = ["Loader", "Session", "open_session", "session_loader"]

Loader = Callable[[], tuple[LoadedModel, str]]
"""What `steer.evals.run` calls to get the model: ``() -> (loaded model, resolved template name)``."""


@dataclass
class Session:
    """A loaded, steered model ready to generate: ``handle`` is the steering handle (``None`` for the baseline),
    ``resolved`` what loading revealed (stored under ``resolved`` in ``settings.json``)."""

    loaded: LoadedModel
    template: str
    handle: Any = None
    resolved: dict[str, Any] = field(default_factory=dict)


def _steer(loaded: LoadedModel, settings: EvalSettings) -> tuple[Any, str | None, dict[str, Any]]:
    """Apply the recipe and methods of ``settings``: ``(handle or None, recipe name, resolved parameters)``."""
    spec: list[Any] = []
    recipe_name = None
    if settings.recipe:
        recipe_name = settings.recipe if "/" in settings.recipe else f"{loaded.family}/{settings.recipe}"
        chosen = steer.recipe(recipe_name, force=settings.force_recipe)
        if not chosen.fits(loaded.family):
            raise EvalInputError(
                f"--recipe {recipe_name} is written for {chosen.family}; --model is a {loaded.family} model. "
                f"Use a {loaded.family} recipe (steer methods lists them), or add --force-recipe to apply "
                "these settings anyway."
            )
        spec.append(chosen)
    spec += list(settings.methods)
    if not spec:
        if settings.params:
            raise EvalInputError("--param was given but no --method or --recipe")
        return None, recipe_name, {}
    handle = steer.apply(loaded.model, spec, **settings.params)
    return handle, recipe_name, json.loads(json.dumps(handle.params, default=str))


def open_session(settings: EvalSettings, *, device_map: Any = None, record: bool = True) -> Session:
    """Load ``settings.model``, apply its recipe and methods, resolve the prompt template.

    ``device_map`` is the one to load with (under ``accelerate launch``: this process's device); the rest comes
    from ``settings`` (dtype, quantization, attention backend). ``record``: also collect the provenance
    (versions, the model's files and weights hash: `steer.evals.provenance`), which only the process that
    writes ``settings.json`` needs.
    """
    loaded = load_model(
        settings.model,
        dtype=settings.dtype,
        device_map=device_map,
        load_in_4bit=settings.quantization == "4bit",
        load_in_8bit=settings.quantization == "8bit",
        attn_implementation=settings.attn_implementation,
    )
    handle, recipe_name, params = _steer(loaded, settings)
    template = resolve_template(settings.template, loaded.model_type, loaded.processor)
    text_config = getattr(loaded.model.config, "text_config", loaded.model.config)
    resolved = {
        "family": loaded.family,
        "model_type": loaded.model_type,
        "source": loaded.source,
        "template": template,
        "prompt_example": build_prompt(
            settings.prompt.replace("{question}", "<question>"),
            template,
            loaded.model_type,
            loaded.processor,
        ),
        "recipe": recipe_name,
        "params": params,
        "text_hidden_size": getattr(text_config, "hidden_size", None),
        "text_layers": getattr(text_config, "num_hidden_layers", None),
        **loaded.info,
    }
    if record:
        resolved["provenance"] = {
            "environment": environment(),
            "model": model_record(loaded.model, loaded.name, loaded.source),
            "generation": generation_record(loaded.model, settings.generation_kwargs, settings.seed),
        }
    return Session(loaded, template, handle, resolved)


def session_loader(
    settings: EvalSettings, run_dir: Path, *, device_map: Any = None, write: bool = True
) -> Loader:
    """The ``load()`` of a run: :func:`open_session`, then (when ``write``: process 0) record what was resolved
    in ``RUN_DIR/settings.json``. The steering handle stays active for the rest of the process."""
    sessions: list[Session] = []  # keeps the handle referenced

    def load() -> tuple[LoadedModel, str]:
        session = open_session(settings, device_map=device_map, record=write)
        sessions.append(session)
        if write:
            record_resolved(run_dir, session.resolved)
        return session.loaded, session.template

    return load
