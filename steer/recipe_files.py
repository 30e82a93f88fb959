"""Recipes: named method settings from the papers, one YAML file per model family.

File format (``recipes/<family>.yaml``)::

    family: llava-1.5
    recipes:
      image-attention:
        description: ...
        source: where the numbers come from
        methods:
          image_attention: {scale: 2.0}

``steer.recipe("llava-1.5/image-attention")`` returns a :class:`Recipe` that `steer.apply` accepts.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from steer.errors import UnknownMethodError


@dataclass(frozen=True)
class Recipe:
    """A named set of methods with their parameters."""

    name: str
    family: str
    methods: dict[str, dict[str, Any]]
    description: str = ""
    source: str = ""
    extra: dict[str, Any] = field(default_factory=dict)
    force: bool = False  # apply it to a model of another family anyway (steer.recipe(..., force=True))

    @property
    def full_name(self) -> str:
        return f"{self.family}/{self.name}"

    def fits(self, family: str) -> bool:
        """Whether the recipe was written for ``family`` (``stable-diffusion`` covers the sd and sdxl pipelines)."""
        return self.force or family == self.family or (self.family == "stable-diffusion" and family in ("sd", "sdxl"))


def recipes_dir() -> Path:
    """Installed wheels carry the recipes inside the package; a source checkout has them at the top level."""
    packaged = resources.files("steer") / "recipes"
    if packaged.is_dir():
        return Path(str(packaged))
    return Path(__file__).resolve().parent.parent / "recipes"


def _load_family(path: Path) -> dict[str, Recipe]:
    data = yaml.safe_load(path.read_text()) or {}
    family = data.get("family", path.stem)
    out = {}
    for name, body in (data.get("recipes") or {}).items():
        out[name] = Recipe(
            name=name,
            family=family,
            methods={m: dict(p or {}) for m, p in (body.get("methods") or {}).items()},
            description=body.get("description", ""),
            source=body.get("source", ""),
            extra={k: v for k, v in body.items() if k not in ("methods", "description", "source")},
        )
    return out


def all_recipes() -> dict[str, Recipe]:
    out: dict[str, Recipe] = {}
    folder = recipes_dir()
    for path in sorted(folder.glob("*.yaml")):
        for recipe in _load_family(path).values():
            out[recipe.full_name] = recipe
    return out


def recipe(name: str, force: bool = False) -> Recipe:
    """The recipe ``"<family>/<name>"``, e.g. ``"llava-1.5/image-attention"``. ``steer.apply`` refuses a recipe
    written for another family than the model's; ``force=True`` applies it anyway (settings do not transfer
    between families as they are: layer indices, widths, sink channels differ)."""
    known = all_recipes()
    if name not in known:
        listing = ", ".join(sorted(known)) or "none installed"
        raise UnknownMethodError(f"unknown recipe {name!r}; recipes are named '<family>/<name>'. Available: {listing}")
    return dataclasses.replace(known[name], force=True) if force else known[name]
