"""The settings of one ``steer eval`` run and the ``settings.json`` that guards resuming it.

``RUN_DIR/settings.json`` holds ``{"hash", "settings", "resolved", "created"}``: the run's settings
(:class:`EvalSettings`), their stable hash, and what loading the model revealed (family, template, the methods'
resolved parameters; written once by :func:`record_resolved`). A later invocation with the same ``--out``
resumes only when the hash is the same; otherwise it is refused with the list of settings that differ.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from steer.errors import EvalInputError
from steer.evals import journal

__all__ = [
    "SETTINGS_FILE",
    "EvalSettings",
    "SettingsMismatchError",
    "check_settings",
    "flatten",
    "read_settings",
    "record_resolved",
    "write_json_atomic",
]

SETTINGS_FILE = "settings.json"


class SettingsMismatchError(EvalInputError):
    """``RUN_DIR`` already holds a run whose settings differ from the ones asked for."""


def _canonical_json(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), default=str)


def flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    """Nested mappings as one ``{"a.b.c": leaf}`` mapping, keys sorted; an empty mapping is a leaf."""
    if isinstance(value, Mapping) and value:
        out: dict[str, Any] = {}
        for key in sorted(value):
            out.update(flatten(value[key], f"{prefix}.{key}" if prefix else str(key)))
        return out
    return {prefix: value}


def write_json_atomic(path: Path, payload: Any) -> None:
    """Write ``payload`` as indented JSON to ``path`` through a temporary file, so no reader sees half of it."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(payload, indent=1, default=str) + "\n", encoding="utf-8")
    os.replace(tmp, path)


@dataclass
class EvalSettings:
    """Everything that determines a run's generations; :meth:`stable_hash` guards resuming.

    Fields in ``NOT_HASHED`` (batch size, device map, the images folder, ``--force-recipe``) are recorded but
    may change between invocations of one run: they decide how, where or whether samples are produced, not
    which.
    """

    task: str
    model: str
    methods: list[str] = field(default_factory=list)
    params: dict[str, Any] = field(default_factory=dict)
    recipe: str | None = None
    force_recipe: bool = False
    dtype: str = "auto"
    quantization: str | None = None
    attn_implementation: str | None = None
    template: str = "auto"
    prompt: str = ""
    max_new_tokens: int = 512
    num_beams: int = 1
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int = 0
    selection: dict[str, Any] = field(default_factory=dict)
    batch_size: int = 1
    device_map: str | None = None
    images: str = ""

    NOT_HASHED: ClassVar[tuple[str, ...]] = ("batch_size", "device_map", "images", "force_recipe")
    ADDED_LATER: ClassVar[dict[str, Any]] = {"temperature": 1.0, "top_p": 1.0, "seed": 0}
    """Fields added after runs were made without them: hashed only when they differ from these defaults, so a
    run made before they existed (with what are now their defaults) keeps its hash and still resumes."""

    def to_dict(self) -> dict[str, Any]:
        """All fields as JSON-ready values."""
        return json.loads(_canonical_json(dataclasses.asdict(self)))

    def identity(self) -> dict[str, Any]:
        """The hashed fields (fields of ``ADDED_LATER`` only when they are not at their defaults)."""
        return {
            k: v
            for k, v in self.to_dict().items()
            if k not in self.NOT_HASHED and not (k in self.ADDED_LATER and v == self.ADDED_LATER[k])
        }

    def stable_hash(self) -> str:
        """sha256 (16 hex digits) of the canonical JSON of :meth:`identity`; stable across processes and runs."""
        return hashlib.sha256(_canonical_json(self.identity()).encode("utf-8")).hexdigest()[:16]

    @property
    def generation_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of ``model.generate``: greedy (or beam search with ``num_beams > 1``), or sampling
        with ``temperature`` and ``top_p`` when ``do_sample``."""
        kwargs: dict[str, Any] = {
            "max_new_tokens": self.max_new_tokens,
            "do_sample": self.do_sample,
            "num_beams": self.num_beams,
        }
        if self.do_sample:
            kwargs.update(temperature=self.temperature, top_p=self.top_p)
        return kwargs

    @property
    def method_label(self) -> str:
        """``recipe + methods`` for tables, ``baseline`` when nothing is applied."""
        parts = ([f"recipe:{self.recipe}"] if self.recipe else []) + list(self.methods)
        return "+".join(parts) or "baseline"


def _differences(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    a, b = flatten(old), flatten(new)
    lines = []
    for key in sorted(set(a) | set(b)):
        if a.get(key, "<unset>") != b.get(key, "<unset>"):
            lines.append(f"{key}: {a.get(key, '<unset>')!r} -> {b.get(key, '<unset>')!r}")
    return lines


def read_settings(run_dir: Path) -> dict[str, Any] | None:
    """The content of ``RUN_DIR/settings.json``, or ``None`` when there is none."""
    path = Path(run_dir) / SETTINGS_FILE
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as err:
        raise EvalInputError(
            f"{path}: unreadable settings file ({err}); remove it or choose another --out"
        ) from None
    if not isinstance(data, dict) or "hash" not in data or "settings" not in data:
        raise EvalInputError(f"{path}: not a steer eval settings file; choose another --out")
    return data


def _write_settings(run_dir: Path, settings: EvalSettings) -> None:
    payload = {
        "hash": settings.stable_hash(),
        "settings": settings.to_dict(),
        "resolved": {},
        "created": time.time(),
    }
    write_json_atomic(run_dir / SETTINGS_FILE, payload)


def check_settings(run_dir: Path, settings: EvalSettings, *, write: bool = True) -> bool:
    """Make sure ``run_dir`` holds this run (or nothing yet); return True when it resumes an earlier invocation.

    Writes ``settings.json`` for a new run when ``write`` (process 0 only under ``accelerate launch``).

    Raises:
        SettingsMismatchError: the folder holds a run with a different settings hash (the message lists the
            differing settings), or samples without a ``settings.json``.
    """
    run_dir = Path(run_dir)
    existing = read_settings(run_dir)
    digest = settings.stable_hash()
    if existing is None:
        if journal.sample_files(run_dir):
            raise SettingsMismatchError(
                f"{run_dir} holds samples but no {SETTINGS_FILE}, so it cannot be resumed safely; "
                "choose another --out or remove the folder"
            )
        if write:
            run_dir.mkdir(parents=True, exist_ok=True)
            _write_settings(run_dir, settings)
        return False
    if existing["hash"] != digest and not journal.has_records(run_dir):
        # nothing was generated under the old settings (e.g. the model failed to load): start afresh
        if write:
            for stale in ("metrics.json", "report.md", "report.html", "per_image.json"):
                (run_dir / stale).unlink(missing_ok=True)
            _write_settings(run_dir, settings)
        return False
    if existing["hash"] != digest:
        old = {
            k: v
            for k, v in existing["settings"].items()
            if k not in EvalSettings.NOT_HASHED
            and not (k in EvalSettings.ADDED_LATER and v == EvalSettings.ADDED_LATER[k])
        }
        diff = _differences(old, settings.identity()) or ["(the settings format changed)"]
        raise SettingsMismatchError(
            f"{run_dir} holds a run with different settings (hash {existing['hash']} != {digest}); "
            "resuming would mix them. Differences:\n  "
            + "\n  ".join(diff)
            + "\nUse the same command to resume, or another --out for a new run."
        )
    return True


def record_resolved(run_dir: Path, resolved: Mapping[str, Any]) -> None:
    """Store what loading revealed (family, template string, the methods' resolved parameters) once."""
    data = read_settings(run_dir)
    if data is None or data.get("resolved"):
        return
    data["resolved"] = dict(resolved)
    write_json_atomic(Path(run_dir) / SETTINGS_FILE, data)
