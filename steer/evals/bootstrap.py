"""Bootstrap 95% intervals over images for every CHAIR and POPE metric, and for differences between runs.

The unit is the image: CHAIR has one caption per image (repeated captions of one image stay together), POPE
has the questions about one image (all of its splits together, since the three splits share their images).
A run's per-image counts are its :class:`Units`; a metric is a function of the counts summed over images,
so a bootstrap replicate is the same function of the counts summed with multinomial weights
(``W ~ Multinomial(n, 1/n)``, ``B`` replicates). The interval is the percentile interval
``[q_{2.5%}, q_{97.5%}]`` of the replicates, rounded as the metric is displayed.

Everything is seeded (``SEED``) and deterministic: the same counts give the same interval on any machine.

A difference between two runs of the same images (:func:`paired_differences`) resamples the images once and
applies the same weights to both runs (a paired bootstrap over the images both runs scored). A difference
whose interval contains 0 is not distinguishable from no difference at this sample size.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from steer.errors import EvalInputError
from steer.evals.metrics import CHAIR_METRICS, POPE_METRICS

__all__ = [
    "LEVEL",
    "N_BOOT",
    "SEED",
    "Units",
    "chair_units",
    "describe",
    "intervals",
    "metric_functions",
    "paired_differences",
    "pope_units",
]

N_BOOT = 1000
"""Bootstrap replicates."""

LEVEL = 0.95
"""Coverage of the intervals."""

SEED = 0
"""Seed of the bootstrap weights (fixed: intervals are a function of the counts only)."""

CHAIR_COUNTS = (
    "captions",
    "hallucinated_captions",
    "mentions",
    "hallucinated_mentions",
    "gt_objects",
    "recalled",
    "distinct_mentions",
    "tokens",
)
POPE_COUNTS = ("tp", "fp", "tn", "fn", "unknown_yes", "unknown_no", "off_format")

Array = Any  # numpy arrays (numpy's own typing of ufuncs is more precise than this module needs)
MetricFn = Callable[[Mapping[str, Array]], Array]


@dataclass(frozen=True)
class Units:
    """Per-image counts of one run: ``keys`` (image ids, as strings) and ``counts[name]`` (one int per key).

    POPE counts are named ``<split>.<count>``; ``splits`` lists the splits in metric order.
    """

    task: str
    keys: tuple[str, ...]
    counts: Mapping[str, Array]
    splits: tuple[str, ...] = field(default=())

    def __len__(self) -> int:
        return len(self.keys)

    def to_json(self) -> dict[str, Any]:
        """The JSON form (``per_image.json`` of a run)."""
        return {
            "task": self.task,
            "unit": "image",
            "splits": list(self.splits),
            "keys": list(self.keys),
            "counts": {name: [int(v) for v in values] for name, values in self.counts.items()},
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Units:
        """Read the JSON form back."""
        try:
            keys = tuple(str(k) for k in data["keys"])
            counts = {name: np.asarray(values, dtype=np.int64) for name, values in data["counts"].items()}
            if any(len(values) != len(keys) for values in counts.values()):
                raise ValueError("counts and keys differ in length")
            return cls(str(data["task"]), keys, counts, tuple(data.get("splits") or ()))
        except (KeyError, TypeError, ValueError) as err:
            raise EvalInputError(f"not a per-image counts file ({err})") from None

    def subset(self, keys: Sequence[str]) -> Units:
        """The units of ``keys`` (in that order)."""
        index = {k: i for i, k in enumerate(self.keys)}
        rows = np.asarray([index[k] for k in keys], dtype=np.int64)
        return Units(self.task, tuple(keys), {n: v[rows] for n, v in self.counts.items()}, self.splits)


def _units(
    task: str, rows: Mapping[str, Mapping[str, int]], names: Iterable[str], splits: tuple[str, ...] = ()
) -> Units:
    keys = tuple(rows)
    names = list(names)
    counts = {name: np.asarray([rows[k].get(name, 0) for k in keys], dtype=np.int64) for name in names}
    return Units(task, keys, counts, splits)


def chair_units(scored: Iterable[Mapping[str, Any]]) -> Units:
    """Per-image CHAIR counts from `steer.evals.chair.score_captions`'s ``captions`` records."""
    rows: dict[str, dict[str, int]] = {}
    for rec in scored:
        row = rows.setdefault(str(rec["image_id"]), dict.fromkeys(CHAIR_COUNTS, 0))
        mentions = rec["mentions"]
        row["captions"] += 1
        row["hallucinated_captions"] += int(bool(rec["hallucinated"]))
        row["mentions"] += len(mentions)
        row["hallucinated_mentions"] += len(rec["hallucinated"])
        row["gt_objects"] += len(rec["gt"])
        row["recalled"] += int(rec["recalled"])
        row["distinct_mentions"] += len({m["node"] for m in mentions})
        row["tokens"] += int(rec["n_tokens"])
    return _units("chair", rows, CHAIR_COUNTS)


def pope_units(scored: Iterable[Mapping[str, Any]], splits: Sequence[str]) -> Units:
    """Per-image POPE counts from `steer.evals.pope.score_answers`'s records, each with its ``split``."""
    rows: dict[str, dict[str, int]] = {}
    for rec in scored:
        split = rec["split"]
        row = rows.setdefault(str(rec["image"]), {})
        prediction, label = rec["prediction"], rec["label"]
        if prediction == "unknown":
            key = f"unknown_{label}"
        elif label == "yes":
            key = "tp" if prediction == "yes" else "fn"
        else:
            key = "fp" if prediction == "yes" else "tn"
        row[f"{split}.{key}"] = row.get(f"{split}.{key}", 0) + 1
        if rec.get("off_format"):
            row[f"{split}.off_format"] = row.get(f"{split}.off_format", 0) + 1
    names = [f"{s}.{c}" for s in splits for c in POPE_COUNTS]
    return _units("pope", rows, names, tuple(splits))


def _div(num: Array, den: Array) -> Array:
    num, den = np.asarray(num, dtype=np.float64), np.asarray(den, dtype=np.float64)
    return np.divide(num, den, out=np.zeros(np.broadcast(num, den).shape), where=den != 0)


def _f1(p: Array, r: Array) -> Array:
    return _div(2 * p * r, p + r)


def _chair_functions() -> dict[str, MetricFn]:
    def precision(s: Mapping[str, Array]) -> Array:
        return 100 * _div(s["recalled"], s["distinct_mentions"])

    def recall(s: Mapping[str, Array]) -> Array:
        return 100 * _div(s["recalled"], s["gt_objects"])

    fns: dict[str, MetricFn] = {
        "CHAIR_s": lambda s: 100 * _div(s["hallucinated_captions"], s["captions"]),
        "CHAIR_i": lambda s: 100 * _div(s["hallucinated_mentions"], s["mentions"]),
        "Recall": recall,
        "Len": lambda s: _div(s["tokens"], s["captions"]),
        "Precision": precision,
        "F1": lambda s: _f1(precision(s), recall(s)),
    }
    assert tuple(fns) == CHAIR_METRICS
    return fns


def _pope_split(split: str) -> dict[str, MetricFn]:
    def c(s: Mapping[str, Array], name: str) -> Array:
        return s[f"{split}.{name}"]

    def n(s: Mapping[str, Array]) -> Array:
        return sum(c(s, k) for k in ("tp", "fp", "tn", "fn", "unknown_yes", "unknown_no"))

    def precision(s: Mapping[str, Array]) -> Array:
        return 100 * _div(c(s, "tp"), c(s, "tp") + c(s, "fp"))

    def recall(s: Mapping[str, Array]) -> Array:
        return 100 * _div(c(s, "tp"), c(s, "tp") + c(s, "fn") + c(s, "unknown_yes"))

    fns: dict[str, MetricFn] = {
        "Accuracy": lambda s: 100 * _div(c(s, "tp") + c(s, "tn"), n(s)),
        "Precision": precision,
        "Recall": recall,
        "F1": lambda s: _f1(precision(s), recall(s)),
        "Yes-ratio": lambda s: 100 * _div(c(s, "tp") + c(s, "fp"), n(s)),
        "Off-format": lambda s: 100 * _div(c(s, "off_format"), n(s)),
    }
    assert tuple(fns) == POPE_METRICS
    return fns


def metric_functions(units: Units) -> dict[str, MetricFn]:
    """Each displayed metric of the run (names as in ``metrics.json``) as a function of summed counts."""
    if units.task == "chair":
        return _chair_functions()
    if len(units.splits) == 1:
        return _pope_split(units.splits[0])
    per = {split: _pope_split(split) for split in units.splits}
    k = len(units.splits)
    out: dict[str, MetricFn] = {
        "F1 (mean)": lambda s: sum(per[sp]["F1"](s) for sp in units.splits) / k,
        "Accuracy (mean)": lambda s: sum(per[sp]["Accuracy"](s) for sp in units.splits) / k,
    }
    for split in units.splits:
        for name, fn in per[split].items():
            out[f"{name} ({split})"] = fn
    return out


def _weights(n: int, n_boot: int, seed: int) -> Array:
    rng = np.random.default_rng(seed)
    return rng.multinomial(n, np.full(n, 1.0 / n), size=n_boot).astype(np.float64)  # [B, n]


def _sums(units: Units, weights: Array) -> dict[str, Array]:
    return {name: weights @ values.astype(np.float64) for name, values in units.counts.items()}


def _interval(values: Array, level: float, decimals: int) -> list[float]:
    lo, hi = np.percentile(values, [100 * (1 - level) / 2, 100 * (1 + level) / 2])
    return [round(float(lo), decimals), round(float(hi), decimals)]


def _decimals(task: str) -> int:
    return 1 if task == "chair" else 2


def point_estimates(units: Units) -> dict[str, float]:
    """The metrics of the full sample, from the counts (equal to the scorer's, before rounding)."""
    sums = {name: np.asarray(values.sum(), dtype=np.float64) for name, values in units.counts.items()}
    return {name: float(fn(sums)) for name, fn in metric_functions(units).items()}


def intervals(
    units: Units, *, n_boot: int = N_BOOT, seed: int = SEED, level: float = LEVEL
) -> dict[str, list[float]]:
    """``{metric: [lo, hi]}``: the bootstrap percentile interval of every metric over the run's images."""
    if not len(units):
        return {}
    sums = _sums(units, _weights(len(units), n_boot, seed))
    decimals = _decimals(units.task)
    return {name: _interval(fn(sums), level, decimals) for name, fn in metric_functions(units).items()}


def paired_differences(
    base: Units, other: Units, *, n_boot: int = N_BOOT, seed: int = SEED, level: float = LEVEL
) -> dict[str, dict[str, Any]]:
    """``{metric: {"delta", "interval": [lo, hi], "spans_zero", "n"}}`` for ``other - base`` over the images
    both runs scored (a paired bootstrap: the same resampled images in both runs)."""
    if base.task != other.task or base.splits != other.splits:
        raise EvalInputError("paired differences need two runs of the same task and splits")
    mine = set(other.keys)
    common = [k for k in base.keys if k in mine]
    if not common:
        return {}
    a, b = base.subset(common), other.subset(common)
    weights = _weights(len(common), n_boot, seed)
    sums_a, sums_b = _sums(a, weights), _sums(b, weights)
    point_a, point_b = point_estimates(a), point_estimates(b)
    decimals = _decimals(base.task)
    out: dict[str, dict[str, Any]] = {}
    for name, fn in metric_functions(base).items():
        lo, hi = _interval(fn(sums_b) - fn(sums_a), level, decimals)
        out[name] = {
            "delta": round(point_b[name] - point_a[name], decimals),
            "interval": [lo, hi],
            "spans_zero": lo <= 0 <= hi,
            "n": len(common),
        }
    return out


def describe(n_units: int, *, n_boot: int = N_BOOT, seed: int = SEED, level: float = LEVEL) -> dict[str, Any]:
    """How the intervals were computed (stored beside them in ``metrics.json``)."""
    return {
        "method": "percentile bootstrap over images",
        "unit": "image",
        "n_units": n_units,
        "replicates": n_boot,
        "seed": seed,
        "level": level,
    }
