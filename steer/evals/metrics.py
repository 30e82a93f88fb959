"""Metric names, directions and display rounding shared by every evaluation command.

One naming across ``steer chair score``, ``steer pope score``, ``steer eval`` (``metrics.json``, ``report.md``,
``report.html``) and ``steer eval compare``:

* CHAIR: ``CHAIR_s``, ``CHAIR_i``, ``Recall``, ``Len``, ``Precision``, ``F1`` (percent with one decimal;
  ``Len`` in tokens);
* POPE: ``Accuracy``, ``Precision``, ``Recall``, ``F1``, ``Yes-ratio``, ``Off-format`` (percent with two
  decimals); with several splits ``<metric> (<split>)`` plus ``F1 (mean)`` and ``Accuracy (mean)``.

Runs written before this naming (``CHAIRs``/``CHAIRi``) are read with :func:`canonical_metrics`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

__all__ = [
    "CHAIR_METRICS",
    "LEGACY_NAMES",
    "POPE_METRICS",
    "POPE_SCORER_KEYS",
    "base_name",
    "canonical_metrics",
    "chair_metrics",
    "decimals",
    "direction",
    "pope_metrics",
]

CHAIR_METRICS = ("CHAIR_s", "CHAIR_i", "Recall", "Len", "Precision", "F1")
"""The CHAIR metrics in display order."""

POPE_METRICS = ("Accuracy", "Precision", "Recall", "F1", "Yes-ratio", "Off-format")
"""The POPE metrics of one split in display order."""

POPE_SCORER_KEYS = {
    "Accuracy": "accuracy",
    "Precision": "precision",
    "Recall": "recall",
    "F1": "f1",
    "Yes-ratio": "yes_ratio",
    "Off-format": "off_format_rate",
}
"""Display name -> the key of `steer.evals.pope.metrics_from_counts`."""

LEGACY_NAMES = {"CHAIRs": "CHAIR_s", "CHAIRi": "CHAIR_i"}
"""Names older runs used."""

_DIRECTIONS = {
    "CHAIR_s": "↓",
    "CHAIR_i": "↓",
    "Recall": "↑",
    "Precision": "↑",
    "F1": "↑",
    "Accuracy": "↑",
    "Off-format": "↓",
}


def base_name(name: str) -> str:
    """``F1 (random)`` -> ``F1``; ``CHAIRs`` -> ``CHAIR_s``."""
    base = name.split(" (", 1)[0]
    return LEGACY_NAMES.get(base, base)


def direction(name: str) -> str:
    """``↓`` when lower is better, ``↑`` when higher is better, ``""`` for descriptive metrics (``Len``,
    ``Yes-ratio``: neither end is better)."""
    return _DIRECTIONS.get(base_name(name), "")


def decimals(name: str, task: str) -> int:
    """Display decimals: CHAIR one, POPE two (as the papers print them)."""
    return 1 if task == "chair" else 2


def canonical_metrics(metrics: Mapping[str, Any]) -> dict[str, Any]:
    """``metrics`` with legacy names (``CHAIRs``, ``CHAIRi``) renamed."""
    return {LEGACY_NAMES.get(k, k): v for k, v in metrics.items()}


def chair_metrics(overall: Mapping[str, Any]) -> dict[str, float]:
    """The display metrics of `steer.evals.chair.score_captions`'s ``overall`` (percent, one decimal)."""
    return {
        "CHAIR_s": round(100 * overall["CHAIR_s"], 1),
        "CHAIR_i": round(100 * overall["CHAIR_i"], 1),
        "Recall": round(100 * overall["Recall"], 1),
        "Len": round(overall["Len"], 1),
        "Precision": round(100 * overall["Precision"], 1),
        "F1": round(100 * overall["F1"], 1),
    }


def pope_metrics(row: Mapping[str, Any], suffix: str = "") -> dict[str, float]:
    """The display metrics of one split's `steer.evals.pope.metrics_from_counts` (percent, two decimals);
    ``suffix`` is appended to each name (``" (random)"``)."""
    return {f"{name}{suffix}": round(100 * row[key], 2) for name, key in POPE_SCORER_KEYS.items()}
