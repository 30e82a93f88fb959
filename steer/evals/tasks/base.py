"""What every benchmark task shares: the sample, the task interface, and finding images and shipped data.

A task is the list of samples to generate (canonical order), the selection that identifies them (hashed into
the run's settings), the JSON record of one finished sample, and the scoring of the records.
"""

from __future__ import annotations

import hashlib
import os
from abc import ABC, abstractmethod
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from steer.errors import EvalInputError
from steer.evals import chair

__all__ = ["IMAGE_SUFFIXES", "Sample", "Task", "data_candidates", "list_images", "md5_lines"]

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")


@dataclass(frozen=True)
class Sample:
    """One generation to run: ``key`` is unique in the run; ``text`` the user text (caption prompt or POPE
    question); ``fields`` are copied into the record."""

    key: str
    image_path: Path
    text: str
    fields: Mapping[str, Any]


class Task(ABC):
    """A benchmark task: ``samples`` in canonical order, their ``selection``, records and scoring.

    The record of a finished sample is its JSON line, with the model output under ``answer_field``.
    """

    name: str
    answer_field = "answer"

    def __init__(self, samples: list[Sample], selection: dict[str, Any]) -> None:
        self.samples = samples
        self.selection = selection

    def record(
        self, sample: Sample, answer: str | None, n_tokens: int | None, error: str | None
    ) -> dict[str, Any]:
        """The JSON line of ``sample``: its key and fields, the answer, and the token count or the error."""
        out = {"key": sample.key, **sample.fields, self.answer_field: answer}
        if error is None:
            out["n_generated_tokens"] = n_tokens
        else:
            out["error"] = error
        return out

    @abstractmethod
    def score(self, records: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        """``{"metrics": {name: value}, "intervals": {name: [lo, hi]}, "units": bootstrap.Units, "details": {...},
        "scored": [per-sample records]}`` of ``records``."""


def list_images(images_dir: Path) -> dict[int, Path]:
    """``{image_id: path}`` for every image file in ``images_dir`` whose name ends in a number."""
    if not images_dir.is_dir():
        raise EvalInputError(f"--images: folder not found: {images_dir}")
    out: dict[int, Path] = {}
    clashes = []
    for entry in os.scandir(images_dir):
        name = entry.name
        if not entry.is_file() or not name.lower().endswith(IMAGE_SUFFIXES):
            continue
        try:
            image_id = chair.parse_image_id(name)
        except EvalInputError:
            continue
        if image_id in out:
            clashes.append(name)
        out[image_id] = Path(entry.path)
    if clashes:
        raise EvalInputError(
            f"{images_dir}: several files for one image id: {', '.join(sorted(clashes)[:5])}"
        )
    return out


def data_candidates(*parts: str) -> list[Path]:
    """Where shipped/reference data may be: the package, a source checkout's tests/data, ../shared/data."""
    package = Path(__file__).resolve().parent.parent  # steer/evals
    root = package.parent.parent
    return [
        package.joinpath("data", *parts[1:]),
        package.joinpath("data", *parts),
        root.joinpath("tests", "data", *parts[1:]),
        root.parent.joinpath("shared", "data", *parts),
    ]


def md5_lines(values: Iterable[Any]) -> str:
    """md5 of the values, one per line (identifies a selection of ids)."""
    return hashlib.md5("\n".join(map(str, values)).encode("utf-8")).hexdigest()
